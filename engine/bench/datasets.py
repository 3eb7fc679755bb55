"""The benchmark data sets, their identity-disjoint split and the chimeric persons.

* LFW (``lfw/images/NAME/NAME_NNNN.jpg`` and ``lfw/pairs.txt``).
* speechocean762 (``speech/SPEAKERxxxx/UTTID.flac`` with Kaldi ``utt2spk``).

Split: identities (LFW names, speaker ids) are ordered by ``sha256(salt + ":" + id)``
and dealt alternately into part "A" (calibration) and part "B" (report), so both
parts hold half the identities and no identity is in both.

Chimeric persons: within each part, speakers sorted by id are paired one to one with
the LFW identities of that part having at least ``min_images`` images, sorted by name;
the i-th speaker gets the i-th face identity. The pairing is fixed by the data and the
split alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_SALT",
    "LfwImage",
    "LfwPair",
    "Lfw",
    "Utterance",
    "Speech",
    "Chimera",
    "split_of",
    "load_lfw",
    "load_speech",
    "chimeric_persons",
]

DEFAULT_SALT = "netid-split-v1"
PARTS = ("A", "B")


def split_of(ids: list[str], salt: str = DEFAULT_SALT, kind: str = "") -> dict[str, str]:
    """Deal identities alternately into parts "A" and "B" in hash order."""
    keyed = sorted(set(ids), key=lambda i: hashlib.sha256(f"{salt}:{kind}:{i}".encode()).hexdigest())
    return {ident: PARTS[k % 2] for k, ident in enumerate(keyed)}


@dataclass(frozen=True, slots=True)
class LfwImage:
    name: str
    number: int
    #: path relative to the data root, e.g. "lfw/images/Ab/Ab_0001.jpg" (the cache key)
    rel: str


@dataclass(frozen=True, slots=True)
class LfwPair:
    fold: int
    a: int  # index into Lfw.images
    b: int
    same: bool


@dataclass(frozen=True)
class Lfw:
    root: Path
    images: list[LfwImage]
    pairs: list[LfwPair]
    part: dict[str, str]  # identity -> "A" | "B"

    def identities(self) -> list[str]:
        return sorted({im.name for im in self.images})


def _image_rel(name: str, number: int) -> str:
    return f"lfw/images/{name}/{name}_{number:04d}.jpg"


def load_lfw(
    data_root: Path, *, salt: str = DEFAULT_SALT, pairs_per_fold: int | None = None
) -> Lfw:
    """All LFW images and the 10-fold pairs, or a small subset for quick runs.

    ``pairs_per_fold=n`` keeps the first ``n`` same-person and ``n`` different-person
    pairs of each fold and only the images they use (for tests and smoke runs).
    """
    root = Path(data_root)
    lines = (root / "lfw" / "pairs.txt").read_text().split("\n")
    n_folds, per = (int(x) for x in lines[0].split())
    rows = [ln.split() for ln in lines[1:] if ln.strip()]
    if len(rows) != n_folds * 2 * per:
        raise ValueError(f"pairs.txt: expected {n_folds * 2 * per} pairs, found {len(rows)}")
    raw_pairs: list[tuple[int, str, str, bool]] = []
    for k, r in enumerate(rows):
        fold, pos = divmod(k, 2 * per)
        same = pos < per
        if pairs_per_fold is not None and (pos % per) >= pairs_per_fold:
            continue
        if same:
            raw_pairs.append((fold, _image_rel(r[0], int(r[1])), _image_rel(r[0], int(r[2])), True))
        else:
            raw_pairs.append((fold, _image_rel(r[0], int(r[1])), _image_rel(r[2], int(r[3])), False))

    if pairs_per_fold is None:
        rels = sorted(
            str(p.relative_to(root)) for p in (root / "lfw" / "images").glob("*/*.jpg")
        )
    else:
        rels = sorted({p[1] for p in raw_pairs} | {p[2] for p in raw_pairs})
    images = []
    for rel in rels:
        stem = Path(rel).stem
        name, num = stem.rsplit("_", 1)
        images.append(LfwImage(name, int(num), rel))
    index = {im.rel: i for i, im in enumerate(images)}
    pairs = []
    for fold, a, b, same in raw_pairs:
        if a not in index or b not in index:
            raise ValueError(f"pairs.txt names an image that is not in the data: {a} / {b}")
        pairs.append(LfwPair(fold, index[a], index[b], same))
    part = split_of([im.name for im in images], salt, "lfw")
    return Lfw(root, images, pairs, part)


@dataclass(frozen=True, slots=True)
class Utterance:
    utt: str
    speaker: str
    rel: str  # relative to the data root (the cache key)


@dataclass(frozen=True)
class Speech:
    root: Path
    #: speaker id -> utterances sorted by utterance id
    speakers: dict[str, list[Utterance]]
    part: dict[str, str]


def load_speech(data_root: Path, *, salt: str = DEFAULT_SALT, max_speakers: int | None = None) -> Speech:
    """speechocean762 speakers and utterances (``max_speakers``: first n in hash order)."""
    root = Path(data_root)
    by_spk: dict[str, list[Utterance]] = {}
    for line in (root / "speech" / "utt2spk").read_text().splitlines():
        if not line.strip():
            continue
        utt, spk = line.split()
        rel = f"speech/SPEAKER{spk}/{utt}.flac"
        by_spk.setdefault(spk, []).append(Utterance(utt, spk, rel))
    for utts in by_spk.values():
        utts.sort(key=lambda u: u.utt)
    part = split_of(list(by_spk), salt, "speech")
    if max_speakers is not None:
        order = sorted(by_spk, key=lambda s: hashlib.sha256(f"{salt}:speech:{s}".encode()).hexdigest())
        keep = set(order[:max_speakers])
        by_spk = {s: u for s, u in by_spk.items() if s in keep}
        part = {s: p for s, p in part.items() if s in keep}
    return Speech(root, dict(sorted(by_spk.items())), part)


@dataclass(frozen=True, slots=True)
class Chimera:
    """One chimeric person: a speaker's voice with an LFW identity's face."""

    part: str
    speaker: str
    face: str


def chimeric_persons(lfw: Lfw, speech: Speech, *, min_images: int) -> list[Chimera]:
    """The fixed speaker -> face identity mapping, per part (see the module docstring)."""
    counts: dict[str, int] = {}
    for im in lfw.images:
        counts[im.name] = counts.get(im.name, 0) + 1
    out: list[Chimera] = []
    for part in PARTS:
        faces = sorted(n for n, c in counts.items() if c >= min_images and lfw.part[n] == part)
        spks = sorted(s for s in speech.speakers if speech.part[s] == part)
        out.extend(Chimera(part, s, f) for s, f in zip(spks, faces))
    return out
