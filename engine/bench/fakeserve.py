"""An engine with the deterministic fake extractor, for harnesses that drive the real server.

``python -m engine.bench.fakeserve --data DIR --port 0 --metrics-port 0 [--set FIELD=VALUE]``
prints the same ``ready`` JSON line as ``netid serve`` (plus ``rp_id``: a relying party it
registered, whose keys it wrote to ``DIR/fuzz-rp.sign.key`` / ``.box.key``), logs JSON lines
to stderr and drains on SIGTERM. Faces are ``FACE:<who>:<n>``, recordings
``VOICE:<who>:<said>:<n>`` (engine.inference.extractors.fake_extractors); card ``C1`` belongs to alice.
The wire, the server and every limit are the real ones: only the models are stand-ins.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import nacl.public
import nacl.signing
import trio

from ._engine import apply_overrides


class FixedScores:
    """Cosine 0.5 per modality as the threshold, no fusion (the tests' score model)."""

    voice_template = "max"

    def threshold(self, modality: str, target_fmr: float | None = None) -> float:
        return 0.5

    def normalise_voice(self, probe, enrolled, raw: float, **_kw) -> float:
        return raw

    def voice_score(self, probe, probe_band: str, enrolled, enrolled_band: str) -> float:
        return float((enrolled @ probe).max())

    def decide(self, face: float, voice: float):
        from collections import namedtuple

        d = namedtuple("Decision", "passed reason")
        if face < 0.5:
            return d(False, "face_mismatch")
        if voice < 0.5:
            return d(False, "voice_mismatch")
        return d(True, "match")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench.fakeserve")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--log-level", default="info")
    p.add_argument("--nofile", type=int, default=None, help="lower this process's open-files limit to N (the EMFILE path)")
    args = p.parse_args(argv)
    if args.nofile:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    from engine.app import build_engine, run_engine
    from engine.cli import setup_logging
    from engine.config import EngineConfig
    from engine.inference.extractors import _identity_vector, fake_extractors
    from engine.ops.registry import seal_card_template
    from engine.store import CardRecord, RelyingParty

    setup_logging(args.log_level, True)
    from engine.cli import connection_caps
    from engine.config import LimitsConfig

    limits = LimitsConfig(**connection_caps(None))  # as netid serve: the caps fit the open-files limit
    config = apply_overrides(EngineConfig(data_dir=args.data, port=args.port, metrics_port=args.metrics_port, voice_wait_with_challenge=0.0, limits=limits), args.set)
    engine = build_engine(config, extractors=fake_extractors(), scores=FixedScores())
    if engine.store.get_card("C1") is None:
        vec = _identity_vector("FACE", "alice", 128)
        engine.store.import_cards(
            [CardRecord(card_number="C1", name="Alice", photo_path="a.jpg", status="valid", photo_template=seal_card_template(engine.cipher, vec, "C1"))],
            actor="fakeserve",
        )
    sign_file, box_file = args.data / "fuzz-rp.sign.key", args.data / "fuzz-rp.box.key"
    if not sign_file.exists():
        sk, bk = nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate()
        sign_file.write_bytes(bytes(sk))
        box_file.write_bytes(bytes(bk))
        engine.store.add_relying_party(
            RelyingParty(rp_id="fuzz-rp", display_name="Fuzz", sign_key=bytes(sk.verify_key), box_key=bytes(bk.public_key),
                         max_level="high", quota_per_minute=1_000_000, status="active", created_at=time.time()),
            actor="fakeserve",
        )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(run_engine, engine)
            print(json.dumps({"event": "ready", "port": running.port, "metrics_port": running.metrics_port,
                              "engine_key": engine.keys.verify_key.hex(), "rp_id": "fuzz-rp"}), flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    running.drain()
                    break

    trio.run(run)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
