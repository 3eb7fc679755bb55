"""Rebuild the bundled demo sample set from the full data sets.

    python samples/make_samples.py --data ../shared/data

Deterministic: the same data gives the same selection. Writes `samples/lfw/`,
`samples/digits/`, `samples/speech/` and `samples/identities.json` (the
chimeric identities: one LFW face identity paired with one speaker).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIGIT_SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--people", type=int, default=24)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--digit-takes", type=int, default=5)
    ap.add_argument("--speakers", type=int, default=24)
    ap.add_argument("--utterances", type=int, default=4)
    ap.add_argument("--seed", type=int, default=762)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    lfw = args.data / "lfw" / "images"
    people = sorted(p.name for p in lfw.iterdir() if p.is_dir() and len(list(p.glob("*.jpg"))) >= args.images)
    chosen = sorted(rng.sample(people, args.people))
    for d in ("lfw", "digits", "speech"):
        shutil.rmtree(HERE / d, ignore_errors=True)
    for name in chosen:
        (HERE / "lfw" / name).mkdir(parents=True)
        for i in range(1, args.images + 1):
            shutil.copy2(lfw / name / f"{name}_{i:04d}.jpg", HERE / "lfw" / name)

    (HERE / "digits").mkdir()
    for spk in DIGIT_SPEAKERS:
        for digit in range(10):
            for take in range(args.digit_takes):
                shutil.copy2(args.data / "digits" / f"{digit}_{spk}_{take}.flac", HERE / "digits")

    speech = args.data / "speech"
    speakers = sorted(p.name for p in speech.iterdir() if p.is_dir() and p.name.startswith("SPEAKER"))
    spk_chosen = sorted(rng.sample(speakers, args.speakers))
    transcripts = dict(ln.split(" ", 1) for ln in (speech / "text").read_text().splitlines() if ln.strip())
    durations = {k: float(v) for k, v in (ln.split() for ln in (speech / "utt2dur").read_text().splitlines() if ln.strip())}
    kept: list[str] = []
    for spk in spk_chosen:
        # each speaker's shortest recordings: short phrases, as a holder's app records them
        # (three enroll the voice, the fourth verifies)
        utts = sorted(sorted(speech.glob(f"{spk}/*.flac"), key=lambda u: (durations[u.stem], u.stem))[: args.utterances])
        (HERE / "speech" / spk).mkdir(parents=True)
        for u in utts:
            shutil.copy2(u, HERE / "speech" / spk)
            kept.append(f"{u.stem} {transcripts[u.stem].strip()}\n")
    # what each recording says, in the corpus's own format (for phrase challenges)
    (HERE / "speech" / "text").write_text("".join(sorted(kept)))

    identities = []
    for i, name in enumerate(chosen):
        identities.append(
            {
                "card_number": f"ID{100000 + i}",
                "name": name.replace("_", " "),
                "face": name,
                "digits_speaker": DIGIT_SPEAKERS[i] if i < len(DIGIT_SPEAKERS) else None,
                "speech_speaker": spk_chosen[i] if i < len(spk_chosen) else None,
            }
        )
    (HERE / "identities.json").write_text(json.dumps(identities, indent=1) + "\n")


if __name__ == "__main__":
    main()
