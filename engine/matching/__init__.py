"""Matching: 1:1 against a credential's own templates, 1:N duplicate search at enrollment."""

from __future__ import annotations

from .duplicates import DUPLICATE_FMR, DuplicateSearch, FaissDuplicateSearch, NoDuplicateSearch
from .index import normalise
from .one_to_one import Enrolled, Match, Matcher, StoreMatcher
from .templates import TemplateSealer

__all__ = [
    "DUPLICATE_FMR",
    "DuplicateSearch",
    "Enrolled",
    "FaissDuplicateSearch",
    "Match",
    "Matcher",
    "NoDuplicateSearch",
    "StoreMatcher",
    "TemplateSealer",
    "normalise",
]
