"""netid-engine: verify people for online ID credentials, face + spoken challenge, signed and sealed.

The public surface: configuration, the engine runner, the clients, the wire
protocol and the error tree. Everything else is an implementation module.
"""

__version__ = "0.1.0"

from .config import ChallengeSettings, EngineConfig, LimitsConfig  # noqa: E402
from .errors import EngineError  # noqa: E402

__all__ = ["__version__", "EngineConfig", "LimitsConfig", "ChallengeSettings", "EngineError"]
