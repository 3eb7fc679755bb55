"""Pronunciation variants: how speakers whose first language is not English often say a word.

The spoken-challenge check (:mod:`engine.challenge`) aligns the expected words of a phrase
with these as well as with the dictionary's US-English pronunciations, and the aligner
picks whichever fits. Measured with ``netid bench challenge`` on speechocean762 (read
English by speakers whose first language is Mandarin): see ``benchmarks/TUNING.md``,
section 4.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["VARIANTS_VERSION", "pronunciation_variants"]

_VOWELS = frozenset("AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split())
_SUBSTITUTED = {"TH": "S", "DH": "D", "V": "W"}
_DEVOICED = {"Z": "S", "D": "T", "G": "K", "B": "P", "V": "F"}
_TENSE_LAX = {"IH": "IY", "IY": "IH", "UH": "UW", "UW": "UH", "AE": "EH"}
#: the version of the rules of :func:`pronunciation_variants`, recorded by a calibration
VARIANTS_VERSION = 1


def pronunciation_variants(phones: Sequence[str]) -> list[tuple[str, ...]]:
    """Other ways a speaker whose first language is not English often says a word, from its
    dictionary pronunciation (ARPAbet phones); one variant per rule:

    1. the consonants many learners replace, all at once: TH as S, DH as D, V as W, and a
       devoiced final consonant (Z as S, D as T, G as K, B as P, V as F);
    2. the final consonant dropped (words of three phones or more);
    3. a vowel (AH) added after a final consonant;
    4. tense and lax vowels exchanged (IH and IY, UH and UW; AE as EH).

    Variants equal to the pronunciation, or to each other, are left out.
    """
    phones = tuple(phones)
    if not phones:
        return []
    substituted = [_SUBSTITUTED.get(ph, ph) for ph in phones]
    substituted[-1] = _DEVOICED.get(phones[-1], substituted[-1])
    candidates = [tuple(substituted)]
    if phones[-1] not in _VOWELS:
        if len(phones) >= 3:
            candidates.append(phones[:-1])
        candidates.append((*phones, "AH"))
    candidates.append(tuple(_TENSE_LAX.get(ph, ph) for ph in phones))
    out: list[tuple[str, ...]] = []
    for variant in candidates:
        if variant != phones and variant not in out:
            out.append(variant)
    return out
