"""Challenges: fresh random words per session, the words they are said as, and phrase lists.

:func:`new_challenge` draws, with :mod:`secrets`, a digit string (``"409172"``, said one
digit at a time) or a sentence from the operator's phrase list; :func:`load_phrases` checks
such a list once, when it is loaded; :func:`challenge_words` gives the words to say.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError, ModelMissing
from .config import DIGIT_WORDS, ChallengeConfig

__all__ = ["challenge_kind", "challenge_words", "load_phrases", "new_challenge", "unknown_words"]

_MIN_DIGITS, _MAX_DIGITS = 1, 32
_WORD_RE = re.compile(r"[a-z']+")


def new_challenge(*, kind: str = "digits", length: int = 6, phrases: Sequence[str] = ()) -> str:
    """A fresh random challenge: ``length`` digits (``"409172"``) or one of ``phrases``."""
    if kind == "digits":
        if not _MIN_DIGITS <= length <= _MAX_DIGITS:
            raise ConfigError(f"digit challenge length must be {_MIN_DIGITS}..{_MAX_DIGITS}")
        return "".join(secrets.choice("0123456789") for _ in range(length))
    if kind == "phrase":
        if not phrases:
            raise ConfigError("a phrase challenge needs a non-empty phrase list")
        return secrets.choice(list(phrases))
    raise ConfigError("challenge kind must be 'digits' or 'phrase'")


def _is_digit_challenge(challenge: str) -> bool:
    compact = "".join(challenge.split())
    return bool(compact) and compact.isascii() and compact.isdigit()


def challenge_kind(challenge: str) -> str:
    """``"digits"`` for a digit string (spaces allowed), else ``"phrase"``."""
    return "digits" if _is_digit_challenge(challenge) else "phrase"


def challenge_words(challenge: str) -> list[str]:
    """The words a challenge is said as: ``"409172"`` -> ``["four", "zero", "nine", ...]``;
    a phrase -> its lower-case words (letters and apostrophes). Digits inside a phrase, or a
    challenge without words, are a :class:`ConfigError` (spell numbers out in phrases)."""
    if _is_digit_challenge(challenge):
        return [DIGIT_WORDS[int(c)] for c in challenge if not c.isspace()]
    text = challenge.lower()
    if any(c.isdigit() for c in text):
        raise ConfigError("a phrase challenge must spell numbers out")
    words = _WORD_RE.findall(text)
    words = [w.strip("'") for w in words if w.strip("'")]
    if not words:
        raise ConfigError("a challenge must contain at least one word")
    return words


@lru_cache(maxsize=4)
def _dictionary_words(path: Path) -> frozenset[str]:
    """Every word of a pocketsphinx dictionary (alternative pronunciations folded)."""
    if not path.is_file():
        raise ModelMissing(f"pronunciation dictionary {path.name} not found")
    words = set()
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            head = line.split(maxsplit=1)
            if head:
                words.add(head[0].split("(", 1)[0])
    return frozenset(words)


def unknown_words(words: Iterable[str], config: ChallengeConfig) -> list[str]:
    """The words, sorted, that the pocketsphinx pronunciation dictionary does not hold."""
    known = _dictionary_words(config.dictionary)
    return sorted({w for w in words if w not in known})


def load_phrases(phrases: Iterable[str], *, config: ChallengeConfig = ChallengeConfig()) -> tuple[str, ...]:
    """Check an operator's phrase list once, when it is loaded.

    Blank lines are dropped, whitespace is collapsed and duplicates removed (first kept).
    A phrase with digits, with more than ``max_phrase_words`` words, or, when pocketsphinx
    checks phrases, with a word its pronunciation dictionary does not hold, is a
    :class:`ConfigError` that names it (Whisper reads any word).
    """
    out: list[str] = []
    seen: set[str] = set()
    unknown: set[str] = set()
    for raw in phrases:
        phrase = " ".join(raw.split())
        if not phrase:
            continue
        if _is_digit_challenge(phrase):
            raise ConfigError(f"phrase {phrase!r} is a digit string; use the digits challenge")
        words = challenge_words(phrase)
        if len(words) > config.max_phrase_words:
            raise ConfigError(f"phrase {phrase!r} has more than {config.max_phrase_words} words")
        if config.recognisers["phrase"] == "pocketsphinx":
            unknown.update(unknown_words(words, config))
        key = " ".join(words)
        if key not in seen:
            seen.add(key)
            out.append(phrase)
    if unknown:
        raise ConfigError("words not in the pronunciation dictionary: " + ", ".join(sorted(unknown)))
    if not out:
        raise ConfigError("the phrase list is empty")
    return tuple(out)
