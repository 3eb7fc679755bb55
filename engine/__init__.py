"""netid-engine: verify people for online ID credentials, face + spoken challenge, signed and sealed.

The public surface: configuration, the engine runner, the clients, the wire
protocol and the error tree. Everything else is an implementation module.
The heavier names (the engine, the clients, the score model) are imported on
first use, so that ``import engine`` stays cheap for tools and worker processes.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .config import ChallengeSettings, EngineConfig, LimitsConfig  # noqa: E402
from .errors import EngineError  # noqa: E402

_LAZY = {
    "Engine": ".flows",
    "build_engine": ".app",
    "run_engine": ".app",
    "Running": ".app",
    "open_relying_party": ".wire.client",
    "open_holder": ".wire.client",
    "RelyingPartyClient": ".wire.client",
    "HolderClient": ".wire.client",
    "qr_text": ".wire.client",
    "parse_qr_text": ".wire.client",
    "open_result": ".wire.client",
    "ScoreModel": ".matching.calibration",
    "OperatingPoints": ".matching.calibration",
    "Decision": ".matching.calibration",
    "load_operating_points": ".matching.calibration",
    "open_store": ".store",
}

__all__ = ["__version__", "EngineConfig", "LimitsConfig", "ChallengeSettings", "EngineError", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
