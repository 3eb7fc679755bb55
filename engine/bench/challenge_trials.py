"""The trials of ``netid bench challenge``: which recordings are scored against which
challenges, drawn from speechocean762 (``speech/``) and the Free Spoken Digit Dataset
(``digits/``), and the audio each trial's recording is built from.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import soxr

from engine.inference.audio import decode_audio
from engine.bench.datasets import DEFAULT_SALT, split_of
from engine.challenge import ChallengeConfig, ScoreParts, challenge_words, load_phrases
from engine.errors import ConfigError
from engine.challenge.reader import COHORT_FILE

__all__ = ["KIND_OF_SET", "DIGIT_LEN", "Task", "Result", "speech_tasks", "bandlimited_tasks", "digit_tasks", "load_audio"]

#: the challenge kind each set stands for
KIND_OF_SET = {"speech": "phrase", "digits": "digits"}
DIGIT_LEN = 6
_GAP_DBFS = -60.0
_SR = 16000


@dataclass(frozen=True, slots=True)
class Task:
    """One recording and the challenges it is scored against (first one: genuine)."""

    set: str  # "speech", "digits" or "speech-8k"
    part: str  # "A" or "B"
    group: str  # speaker (speech) or speaker name (digits)
    audio: tuple  # ("file", path) | ("file8k", path) | ("digits", paths, gaps, lead, trail, seed)
    expected: tuple[str, ...]
    labels: tuple[str, ...]  # "genuine" | "wrong" | "near_miss", one per expected


@dataclass
class Result:
    task: Task
    #: one per expected challenge: the score's parts, None where nothing could be aligned
    parts: list[ScoreParts | None] = field(default_factory=list)
    #: the scores at the silence weight chosen for the task's set (filled in by ``main``)
    scores: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    genuine_cpu_s: float = 0.0
    #: the genuine check's CPU by decoding pass ("align", "loop")
    pass_cpu_s: dict[str, float] = field(default_factory=dict)
    audio_s: float = 0.0
    #: per expected challenge, the engine's decision with the screen (filled in by ``main``)
    passed: list[bool] = field(default_factory=list)
    #: CPU seconds of what the genuine challenge needs once, before its first check in a
    #: worker: a phrase's cohort passes (0: done before, or a kind without them)
    prepare_cpu_s: float = 0.0
    #: per expected challenge, whether the screen decided it without the phone loop
    screened: list[bool] = field(default_factory=list)


def _speech_root(root: Path) -> Path:
    return root / "speech"


def speech_tasks(root: Path, *, per_part: int | None, wrong: int, rng: np.random.Generator,
                 config: ChallengeConfig) -> tuple[list[Task], dict[str, int]]:
    """Genuine + wrong-phrase tasks on speechocean762, ``per_part`` utterances per part."""
    sroot = _speech_root(root)
    text = dict(ln.split(" ", 1) for ln in (sroot / "text").read_text().splitlines() if ln.strip())
    utt2spk = dict(ln.split() for ln in (sroot / "utt2spk").read_text().splitlines() if ln.strip())
    usable: dict[str, str] = {}
    excluded = 0
    for utt, sentence in sorted(text.items()):
        try:
            # the sentences pocketsphinx can align too, whichever recogniser reads them: both
            # are measured on the same trials
            load_phrases([sentence], config=dataclasses.replace(config, recognisers={**config.recognisers, "phrase": "pocketsphinx"}))
        except ConfigError:
            excluded += 1
            continue
        usable[utt] = sentence.strip()
    part_of = split_of(sorted(set(utt2spk.values())), DEFAULT_SALT, "speech")
    if config.relative_kinds:
        # the reader's cohort: calibration speakers only, and none of its recordings a trial
        cohort = json.loads((Path(config.reader_cohort_dir) / COHORT_FILE).read_text())["recordings"]
        outside = sorted({c["speaker"] for c in cohort if part_of.get(c["speaker"]) != "A"})
        if outside:
            raise ConfigError(f"the reader cohort holds speakers outside part A: {', '.join(outside)}")
        for c in cohort:
            usable.pop(Path(c["file"]).stem, None)
    sentences = sorted({" ".join(challenge_words(s)) for s in usable.values()})
    tasks: list[Task] = []
    for part in ("A", "B"):
        utts = [u for u in sorted(usable) if part_of[utt2spk[u]] == part]
        if per_part is not None and per_part < len(utts):
            utts = sorted(rng.choice(utts, size=per_part, replace=False).tolist())
        for utt in utts:
            own = " ".join(challenge_words(usable[utt]))
            others = [s for s in sentences if s != own]
            picks = rng.choice(len(others), size=wrong, replace=False)
            expected = (usable[utt],) + tuple(others[i] for i in picks)
            path = sroot / f"SPEAKER{utt2spk[utt]}" / f"{utt}.flac"
            tasks.append(Task("speech", part, utt2spk[utt], ("file", str(path)), expected,
                              ("genuine",) + ("wrong",) * wrong))
    return tasks, {"excluded_out_of_dictionary": excluded, "usable_utterances": len(usable)}


def bandlimited_tasks(tasks: list[Task], n: int, wrong: int, rng: np.random.Generator) -> list[Task]:
    """``n`` part-B speech tasks again, their audio band-limited to 8 kHz."""
    b = [t for t in tasks if t.set == "speech" and t.part == "B"]
    if not b or n <= 0:
        return []
    picks = sorted(rng.choice(len(b), size=min(n, len(b)), replace=False).tolist())
    out = []
    for i in picks:
        t = b[i]
        k = 1 + min(wrong, len(t.expected) - 1)
        out.append(Task("speech-8k", "B", t.group, ("file8k", t.audio[1]), t.expected[:k], t.labels[:k]))
    return out


def digit_tasks(root: Path, *, per_part: int, wrong: int, rng: np.random.Generator) -> list[Task]:
    """Genuine, wrong and near-miss tasks on FSDD 6-digit strings, ``per_part`` strings per part."""
    files = sorted((root / "digits").glob("*.flac"))
    if not files:
        return []
    part_of = split_of([f.stem for f in files], DEFAULT_SALT, "digits-recordings")
    pool: dict[tuple[str, str, int], list[str]] = defaultdict(list)
    for f in files:
        digit, speaker, _ = f.stem.split("_")
        pool[(part_of[f.stem], speaker, int(digit))].append(str(f))
    speakers = sorted({k[1] for k in pool})
    tasks: list[Task] = []
    for part in ("A", "B"):
        for i in range(per_part):
            speaker = speakers[i % len(speakers)]
            digits = [int(d) for d in rng.integers(0, 10, DIGIT_LEN)]
            paths = tuple(pool[(part, speaker, d)][int(rng.integers(len(pool[(part, speaker, d)])))] for d in digits)
            gaps = tuple(int(rng.uniform(0.08, 0.30) * _SR) for _ in range(DIGIT_LEN - 1))
            lead, trail = int(rng.uniform(0.2, 0.4) * _SR), int(rng.uniform(0.1, 0.3) * _SR)
            right = "".join(map(str, digits))
            others: list[str] = []
            while len(others) < wrong:
                s = "".join(str(int(d)) for d in rng.integers(0, 10, DIGIT_LEN))
                if s != right and s not in others:
                    others.append(s)
            near = list(digits)
            pos = int(rng.integers(DIGIT_LEN))
            near[pos] = (near[pos] + int(rng.integers(1, 10))) % 10
            expected = (right, *others, "".join(map(str, near)))
            labels = ("genuine",) + ("wrong",) * wrong + ("near_miss",)
            seed = int(rng.integers(2**31))
            tasks.append(Task("digits", part, speaker, ("digits", paths, gaps, lead, trail, seed), expected, labels))
    return tasks


def load_audio(spec: tuple) -> np.ndarray:
    """The float32 16 kHz recording a task describes."""
    kind = spec[0]
    if kind == "file":
        return decode_audio(Path(spec[1]).read_bytes())
    if kind == "file8k":
        wav = decode_audio(Path(spec[1]).read_bytes())
        narrow = soxr.resample(wav, _SR, 8000, quality="HQ")
        return soxr.resample(narrow, 8000, _SR, quality="HQ").astype(np.float32)
    if kind == "digits":
        # built at the recordings' own 8 kHz and resampled once, as a narrow-band recording
        # of the whole string would be (noise gaps made at 16 kHz would put energy above
        # 4 kHz between the digits and none within them)
        _, paths, gaps, lead, trail, seed = spec
        noise = np.random.default_rng(seed)
        amp = 10 ** (_GAP_DBFS / 20)

        def gap(n16: int) -> np.ndarray:
            return (noise.standard_normal(n16 // 2) * amp).astype(np.float32)

        parts = [gap(lead)]
        for i, p in enumerate(paths):
            wav, rate = soundfile.read(p, dtype="float32", always_2d=False)
            if rate != 8000 or wav.ndim != 1:
                raise ValueError(f"{p}: expected 8 kHz mono")
            parts.append(wav)
            parts.append(gap(gaps[i] if i < len(gaps) else trail))
        return soxr.resample(np.concatenate(parts), 8000, _SR, quality="HQ").astype(np.float32)
    raise ValueError(f"unknown audio spec {kind!r}")
