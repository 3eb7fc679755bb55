"""Rebuild ``samples/reader_cohort/``: the recordings Whisper's phrase scores are relative to.

A phrase's log-probability under Whisper depends on the phrase as much as on the audio:
common words in a common order are likely whatever is said. The challenge check therefore
subtracts, word by word, the mean log-probability the phrase gets over a few recordings of
*other* sentences (:meth:`engine.challenge.reader.Reader.prior`). This script chooses them:

* eight speechocean762 recordings (``speech/`` of the shared data), one from each of four
  female and four male speakers, drawn with a fixed seed;
* only speakers of the challenge benchmark's calibration part (A of
  :func:`engine.bench.datasets.load_speech`), so that no recording of a speaker the benchmark
  reports on (part B) is part of the score;
* copied byte for byte (FLAC, 16 kHz), with what each says and its sha256 in
  ``reader_cohort/reader_cohort.json``, which the engine checks before using them. They sit
  beside the demo sample's speechocean762 recordings (credited in ``samples/README.md``).

Usage: ``python models/build_reader_cohort.py [--data ../shared/data]``; ``--check`` only
compares the selection with the files in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.bench.datasets import load_speech  # noqa: E402
from engine.challenge.reader import COHORT_FILE, DEFAULT_COHORT_DIR

SEED = 762
PER_GENDER = 4


def select(speech: Path) -> list[dict[str, str]]:
    """The cohort: one utterance of each of ``PER_GENDER`` female and male part-A speakers."""
    read = lambda name: dict(ln.split(" ", 1) for ln in (speech / name).read_text().splitlines() if ln.strip())  # noqa: E731
    text, gender = read("text"), read("spk2gender")
    corpus = load_speech(speech.parent)
    rng = np.random.default_rng(SEED)
    out = []
    for g in ("f", "m"):
        speakers = sorted(s for s, p in corpus.part.items() if p == "A" and gender[s].strip() == g)
        for spk in sorted(rng.choice(speakers, size=PER_GENDER, replace=False).tolist()):
            utts = [u.utt for u in corpus.speakers[spk]]  # sorted by utterance id
            utt = utts[int(rng.integers(len(utts)))]
            out.append({"file": f"{utt}.flac", "speaker": spk, "gender": g, "part": "A",
                        "words": " ".join(text[utt].lower().split())})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=DEFAULT_COHORT_DIR)
    p.add_argument("--check", action="store_true", help="compare with the files in place; write nothing")
    args = p.parse_args(argv)
    speech = args.data / "speech"
    chosen = select(speech)
    for c in chosen:
        src = speech / f"SPEAKER{c['speaker']}" / c["file"]
        c["sha256"] = hashlib.sha256(src.read_bytes()).hexdigest()
    doc = {
        "format": 1,
        "what": "recordings of other sentences: a phrase's Whisper score is its words' log-probabilities over the "
                "recording checked, less their mean over these (engine/challenge/reader.py, Reader.prior)",
        "source": "speechocean762 (Zhang et al., Interspeech 2021), commit 613968e; also OpenSLR SLR101; free for "
                  "commercial and non-commercial use (corpus README)",
        "selection": f"models/build_reader_cohort.py: seed {SEED}, {PER_GENDER} female and {PER_GENDER} male speakers of "
                     "part A of engine.bench.datasets.split_of (the challenge benchmark's calibration part), one utterance each",
        "recordings": chosen,
    }
    manifest = args.out / COHORT_FILE
    if args.check:
        same = manifest.is_file() and json.loads(manifest.read_text()) == doc
        print("cohort matches" if same else "cohort differs from the selection")
        return 0 if same else 1
    args.out.mkdir(parents=True, exist_ok=True)
    for c in chosen:
        shutil.copyfile(speech / f"SPEAKER{c['speaker']}" / c["file"], args.out / c["file"])
    manifest.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(chosen)} recordings and {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
