"""Shared helpers of the load and limit benchmarks: data, payloads, percentiles, output.

* :func:`data_root` finds the real data (``../shared/data``) or the bundled ``samples/``.
* :func:`load_people` makes *chimeric* residents: an LFW face identity paired with a Free
  Spoken Digit Dataset speaker (no public set holds the same people's faces and voices).
  The first image is the ID-card photo, images 2-3 enroll, the rest are live captures.
* :func:`digit_voices` gives the engine's FSDD splicer (:class:`engine.cli.demo.DigitVoices`)
  with every clip read up front, so that building a recording during a timed run costs
  no I/O.
* :func:`pct` / :func:`latency_summary`, :func:`emit` (one JSON line), :class:`CpuClock`.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.assets import asset_dir
from engine.cli.demo import DIGIT_SPEAKERS, DigitVoices, data_layout

__all__ = [
    "REPO",
    "DIGIT_SPEAKERS",
    "data_root",
    "Person",
    "load_people",
    "digit_voices",
    "KINDS",
    "DEFAULT_MIX",
    "LIVE_TAKES",
    "parse_mix",
    "mix_kinds",
    "Verification",
    "make_verifications",
    "usable_faces",
    "screen_people",
    "pct",
    "latency_summary",
    "emit",
    "CpuClock",
    "proc_cpu_seconds",
    "machine_busy_seconds",
]

REPO = Path(__file__).resolve().parents[2]  # the checkout, when run from one


def data_root(given: Path | None = None) -> Path:
    """``given``, else ``../shared/data`` beside the repository, else the bundled samples."""
    if given is not None:
        return given
    shared = REPO.parent / "shared" / "data"
    return shared if (shared / "lfw").is_dir() else asset_dir("samples")


@dataclass
class Person:
    """One chimeric resident: a face identity and a digit speaker."""

    card_number: str
    name: str
    card_photo: Path
    enroll_faces: list[bytes]
    probe_faces: list[bytes]
    speaker: str


def load_people(root: Path, n: int, *, seed: int = 5, card_prefix: str = "LOAD") -> tuple[list[Person], list[bytes]]:
    """``n`` residents and face images of people who are not residents (impostor faces).

    People are LFW identities with at least 6 images, chosen by ``seed``; speakers are
    dealt round-robin from the six FSDD speakers (so with more than six residents several
    share a speaker; an impostor voice is always another speaker's).
    """
    lfw = data_layout(root)["lfw"]
    people = sorted(p.name for p in lfw.iterdir() if p.is_dir() and len(list(p.glob("*.jpg"))) >= 6)
    rng = random.Random(seed)
    rng.shuffle(people)
    if len(people) < n + 1:
        raise SystemExit(f"{lfw}: only {len(people)} people with 6 images; asked for {n} residents")
    residents = []
    for i, name in enumerate(people[:n]):
        files = sorted((lfw / name).glob("*.jpg"))
        residents.append(
            Person(
                card_number=f"{card_prefix}-{i:05d}",
                name=name.replace("_", " "),
                card_photo=files[0].resolve(),
                enroll_faces=[f.read_bytes() for f in files[1:3]],
                probe_faces=[f.read_bytes() for f in files[3:8]],
                speaker=DIGIT_SPEAKERS[i % len(DIGIT_SPEAKERS)],
            )
        )
    strangers = [sorted((lfw / name).glob("*.jpg"))[0].read_bytes() for name in people[n : n + 50]]
    return residents, strangers


def usable_faces(images: list[bytes], models_dir: Path | None = None) -> list[bool]:
    """Which images the engine's face pipeline accepts (one clear subject face), by running it.

    Some LFW images hold several similar faces: a benchmark that means to measure
    throughput leaves them out rather than count their (correct) ``multiple_faces`` answers.
    """
    from engine.inference.face import FaceExtractor
    from engine.inference.models import DEFAULT_MODELS_DIR

    face = FaceExtractor(models_dir or DEFAULT_MODELS_DIR)
    out = face.embed_batch(images)
    return [not isinstance(o, Exception) for o in out]


def screen_people(people: list[Person], strangers: list[bytes]) -> tuple[list[Person], list[bytes]]:
    """Drop live captures and impostor faces the face pipeline refuses; drop people left with none."""
    flat = [f for p in people for f in p.probe_faces]
    ok = iter(usable_faces(flat + strangers))
    kept = []
    for p in people:
        p.probe_faces = [f for f in p.probe_faces if next(ok)]
        if p.probe_faces:
            kept.append(p)
    return kept, [f for f in strangers if next(ok)]


def digit_voices(root: Path, speakers: Sequence[str], takes: range) -> DigitVoices:
    """The engine's FSDD splicer over ``root``'s digits, every clip read before timing starts."""
    voices = DigitVoices(data_layout(root)["digits"], takes)
    voices.preload(list(speakers))
    return voices


#: the kinds of verification the load benchmark sends, and its default mix of them
KINDS = ("genuine", "impostor_face", "impostor_voice", "wrong_words")
DEFAULT_MIX = "genuine=0.7,impostor_face=0.1,impostor_voice=0.1,wrong_words=0.1"
#: the FSDD takes that live recordings are spliced from (takes 0-1 enroll)
LIVE_TAKES = range(2, 20)


def parse_mix(text: str) -> dict[str, float]:
    """``"genuine=0.7,wrong_words=0.3"`` -> weights by kind (:data:`KINDS`)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in KINDS:
            raise SystemExit(f"--mix: unknown kind {k!r} (kinds: {', '.join(KINDS)})")
        out[k] = float(v)
    if sum(out.values()) <= 0:
        raise SystemExit("--mix: weights must add up to more than 0")
    return out


def mix_kinds(mix: dict[str, float], n: int, rng: random.Random) -> list[str]:
    """``n`` kinds in the proportions of ``mix`` (largest remainders), in a shuffled order."""
    total = sum(mix.values())
    exact = {k: n * w / total for k, w in mix.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k in mix for _ in range(counts[k])]
    rng.shuffle(kinds)
    return kinds


@dataclass(frozen=True)
class Verification:
    """The extraction inputs of one verification: a live face, a recording, the challenge."""

    face: bytes
    voice: bytes
    challenge: str


def make_verifications(
    root: Path, n: int, *, seed: int = 11, length: int = 6, mix: dict[str, float] | None = None
) -> list[Verification]:
    """``n`` verification payloads from distinct people (for the limit benchmark), of the
    kinds of ``mix`` in its proportions (:func:`mix_kinds`; default all genuine): the same
    extraction work as the load benchmark's arrivals of that mix. A kind changes the work:
    a wrong digit string is mostly decided on the recogniser's first pass, another
    speaker's voice is not."""
    people, _ = load_people(root, min(n, 60), seed=seed)
    people, _ = screen_people(people, [])
    voices = digit_voices(root, DIGIT_SPEAKERS, LIVE_TAKES)
    rng = random.Random(seed)
    out = []
    for i, kind in enumerate(mix_kinds(mix or {"genuine": 1.0}, n, rng)):
        p = people[i % len(people)]
        face_of = people[(i + 1) % len(people)] if kind == "impostor_face" and len(people) > 1 else p
        speaker = p.speaker
        if kind == "impostor_voice":
            speaker = rng.choice([s for s in DIGIT_SPEAKERS if s != p.speaker])
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        said = digits
        while kind == "wrong_words" and said == digits:
            said = "".join(rng.choice("0123456789") for _ in range(length))
        out.append(Verification(face=face_of.probe_faces[i % len(face_of.probe_faces)], voice=voices.say(speaker, said, rng), challenge=digits))
    return out


# ---- statistics and output -------------------------------------------------------------------


def pct(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, by linear interpolation; NaN if empty."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max/mean in milliseconds (None when there is no sample)."""
    v = sorted(seconds)
    if not v:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    r = lambda x: round(1000.0 * x, 1)  # noqa: E731
    return {"p50_ms": r(pct(v, 0.50)), "p95_ms": r(pct(v, 0.95)), "p99_ms": r(pct(v, 0.99)), "max_ms": r(v[-1]), "mean_ms": r(float(np.mean(v)))}


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout."""
    print(json.dumps(obj, separators=(",", ":"), default=float), flush=True)


def _stat(pid: int) -> list[str] | None:
    try:
        # after the ")" closing the command name: field 3 (state) is [0], ppid [1], utime [11], stime [12]
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and of its live descendants (worker processes
    included), from /proc; None if the process is gone."""
    own = _stat(pid)
    if own is None:
        return None
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
                children.setdefault(int(st[1]), []).append(int(entry.name))
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        st = stats.get(p, own if p == pid else None)
        if st is not None:
            total += int(st[11]) + int(st[12])
        todo += children.get(p, [])
    return total / ticks


def listening_pids(ports: Sequence[int]) -> list[int]:
    """The processes listening on these local TCP ports (IPv4 or IPv6), from /proc."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) in ports:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def services_cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the database servers ``pids`` (listening_pids): with their
    live descendants (PostgreSQL's backends) and what their ended children used."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            total += (proc_cpu_seconds(pid) or 0.0) + (int(st[13]) + int(st[14])) / ticks
    return total


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(vals[:8]) - idle) / ticks, sum(vals[:8]) / ticks


@dataclass
class CpuClock:
    """Wall, own CPU, another process's CPU and the machine's busy CPU over an interval."""

    #: the engine's processes (the nodes of a cluster), counted together with their workers
    other_pids: tuple[int, ...] = ()
    #: also count the CPU of these database servers (listening_pids; services_cpu_seconds)
    services: tuple[int, ...] = ()
    _t0: tuple[float, float, float | None, float, float] = field(default=(0.0, 0.0, None, 0.0, 0.0))
    _services0: float = 0.0

    def _others(self) -> float | None:
        if not self.other_pids:
            return None
        got = [proc_cpu_seconds(pid) for pid in self.other_pids]
        return None if any(g is None for g in got) else sum(got)  # type: ignore[arg-type]

    @staticmethod
    def _own() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def start(self) -> None:
        busy, total = machine_busy_seconds()
        other = self._others()
        self._services0 = services_cpu_seconds(self.services)
        self._t0 = (time.perf_counter(), self._own(), other, busy, total)

    def stop(self) -> dict[str, float | None]:
        wall0, own0, other0, busy0, total0 = self._t0
        wall = time.perf_counter() - wall0
        busy, total = machine_busy_seconds()
        other = self._others()
        cores = os.cpu_count() or 1
        out: dict[str, float | None] = {
            "wall_s": round(wall, 3),
            "generator_cpu_s": round(self._own() - own0, 3),
            "generator_cpu_share": round((self._own() - own0) / (wall * cores), 4) if wall else None,
            "machine_busy_share": round((busy - busy0) / (total - total0), 4) if total > total0 else None,
        }
        if other is not None and other0 is not None:
            out["engine_cpu_s"] = round(other - other0, 3)
            out["engine_cpu_share"] = round((other - other0) / (wall * cores), 4) if wall else None
        if self.services:
            out["services_cpu_s"] = round(services_cpu_seconds(self.services) - self._services0, 3)
        return out


def stderr(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
