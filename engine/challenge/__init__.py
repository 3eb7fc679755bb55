"""The spoken challenge: fresh random words per session, and a check that a recording says them.

The modules, by concern: :mod:`.config` (settings), :mod:`.phrases` (challenges and phrase
lists), :mod:`.calibration` (``challenge.json``), :mod:`.scoring` (scores and verdicts),
:mod:`.decoder` (pocketsphinx passes), :mod:`.plan` (batch planning), :mod:`.checker`.
How the check works and how it was calibrated: docs/challenge.md.
"""

from .calibration import ChallengeCalibration, Screen, load_calibration
from .checker import ChallengeChecker
from .config import (
    CALIBRATION_FILE,
    DEFAULT_FRAME_RATES,
    DEFAULT_POCKETSPHINX_MODEL,
    DEFAULT_RECOGNISERS,
    DIGIT_WORDS,
    FAILURE_SCORE,
    KINDS,
    RECOGNISERS,
    SAMPLE_RATE,
    ChallengeConfig,
)
from .phrases import challenge_kind, challenge_words, load_phrases, new_challenge
from .plan import Pass
from .scoring import ScoreParts, Verdict

__all__ = [
    "KINDS",
    "RECOGNISERS",
    "DEFAULT_RECOGNISERS",
    "DEFAULT_FRAME_RATES",
    "DEFAULT_POCKETSPHINX_MODEL",
    "DIGIT_WORDS",
    "FAILURE_SCORE",
    "CALIBRATION_FILE",
    "SAMPLE_RATE",
    "ChallengeConfig",
    "ChallengeCalibration",
    "ChallengeChecker",
    "ScoreParts",
    "Screen",
    "Verdict",
    "Pass",
    "new_challenge",
    "challenge_words",
    "challenge_kind",
    "load_phrases",
    "load_calibration",
]
