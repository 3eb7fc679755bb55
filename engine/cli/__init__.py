"""The ``netid`` command line: the only place that reads flags, files and environment."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

import trio

from engine import __version__
from engine.config import ChallengeSettings, EngineConfig, LimitsConfig
from engine.errors import EngineError

log = logging.getLogger("engine.cli")


# ---- logging ----------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise


# ---- config -----------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=Path("netid-data"), help="data directory (keys, SQLite database)")
    p.add_argument("--store", default=None, metavar="URL", help="store URL, e.g. sqlite:////var/lib/netid/netid.db (default: the database in --data, sqlite:///DATA/engine.db)")
    p.add_argument("--template-key", type=Path, default=None, help="operator's template key file (default: DATA/template.key)")
    p.add_argument("--models", type=Path, default=None, help="models directory (default: the bundled models)")


def build_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    from engine.inference.models import DEFAULT_MODELS_DIR

    phrases: tuple[str, ...] = ()
    if getattr(args, "phrases", None):
        from engine.challenge import load_phrases

        phrases = load_phrases(Path(args.phrases).read_text().splitlines())
    kw = dict(
        data_dir=args.data,
        store_url=args.store,
        template_key_path=args.template_key,
        models_dir=args.models or DEFAULT_MODELS_DIR,
    )
    if hasattr(args, "port"):
        kw.update(
            host=args.host,
            port=args.port,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            intra_op_threads=args.threads,
            limits=LimitsConfig(session_ttl=args.session_ttl, max_in_flight=args.max_in_flight, **connection_caps(args.max_connections)),
            challenge=ChallengeSettings(kind=args.challenge, phrases=phrases, check=not args.no_challenge_check),
            state_url=args.state,
        )
    kw.update(overrides)
    return EngineConfig(**kw)


#: File descriptors kept for everything but client connections: models, the store, worker
#: pipes, the metrics endpoint's 64 connections, listeners.
_RESERVED_FDS = 256


def connection_caps(wanted: int | None) -> dict[str, int]:
    """``max_connections`` and ``max_unauthenticated`` that fit the open-files limit.

    Unauthenticated connections get 90 % of the slots; the rest are kept for relying-party
    streams. Without ``wanted``, the default cap, lowered to what the limit allows."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fits = max(16, soft - _RESERVED_FDS) if soft != resource.RLIM_INFINITY else 1 << 20
    total = min(wanted or LimitsConfig.max_connections, fits)
    if wanted and total < wanted:
        log.warning("--max-connections %d lowered to %d to fit the open-files limit (%d); raise it with ulimit -n", wanted, total, soft)
    return {"max_connections": total, "max_unauthenticated": max(1, total * 9 // 10)}


def _open_store(args: argparse.Namespace):
    from engine.store import open_store

    cfg = build_config(args)
    if cfg.store_url is None:  # the database in the data directory
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
    return open_store(cfg.store_location), cfg


# ---- serve ------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from engine.app import build_engine, run_engine

    config = build_config(args)
    engine = build_engine(config)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(run_engine, engine)
            print(
                json.dumps(
                    {
                        "event": "ready",
                        "host": config.host,
                        "port": running.port,
                        "metrics_port": running.metrics_port,
                        "tls": config.tls_cert is not None,
                        "engine_key": engine.keys.verify_key.hex(),
                        "engine_box_key": engine.keys.box_public_key.hex(),
                    }
                ),
                flush=True,
            )
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for sig in signals:
                    log.info("signal %s: draining", signal.Signals(sig).name)
                    running.drain()
                    break
        log.info("stopped")

    trio.run(main)
    engine.close()
    return 0


# ---- registry and operators ------------------------------------------------------------------------------
def cmd_registry_import(args: argparse.Namespace) -> int:
    from engine.crypto import TemplateCipher
    from engine.inference.face import FaceExtractor
    from engine.ops.registry import import_registry

    store, cfg = _open_store(args)
    cipher = TemplateCipher.load_or_create(cfg.template_key_file)
    face = FaceExtractor(cfg.models_dir)
    report = import_registry(args.file, store=store, cipher=cipher, embed_faces=face.embed_batch, now=time.time())
    store.close()
    print(json.dumps({"imported": report.imported, "refused": [{"card_number": c, "code": code} for c, code in report.refused]}))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    store, _cfg = _open_store(args)
    if args.action == "lost":
        suspended = store.report_card_lost(args.card_number, actor="operator", now=time.time())
        print(json.dumps({"card_number": args.card_number, "status": "lost", "suspended_credentials": len(suspended)}))
    else:
        store.reissue_card(args.card_number, actor="operator", now=time.time())
        print(json.dumps({"card_number": args.card_number, "status": "valid"}))
    store.close()
    return 0


def _keys_for(args: argparse.Namespace, *, box: bool) -> tuple[bytes, bytes | None]:
    """Public keys from flags, or a fresh key pair written (owner-only) to --keys-out."""
    import nacl.public
    import nacl.signing

    if args.sign_key:
        sign = bytes.fromhex(args.sign_key)
        box_pk = bytes.fromhex(args.box_key) if box else None
        if len(sign) != 32 or (box and (box_pk is None or len(box_pk) != 32)):
            raise SystemExit("keys must be 32 bytes in hex")
        return sign, box_pk
    if not args.keys_out:
        raise SystemExit("give --sign-key (and --box-key), or --keys-out DIR to generate a key pair")
    out = Path(args.keys_out)
    out.mkdir(parents=True, exist_ok=True)
    sk = nacl.signing.SigningKey.generate()
    _write_private(out / f"{args.id}.sign.key", bytes(sk))
    bk = None
    if box:
        pk = nacl.public.PrivateKey.generate()
        _write_private(out / f"{args.id}.box.key", bytes(pk))
        bk = bytes(pk.public_key)
    return bytes(sk.verify_key), bk


def _write_private(path: Path, data: bytes) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def cmd_rp(args: argparse.Namespace) -> int:
    from engine.store import RelyingParty

    store, _cfg = _open_store(args)
    try:
        if args.action == "add":
            sign, box = _keys_for(args, box=True)
            store.add_relying_party(
                RelyingParty(
                    rp_id=args.id,
                    display_name=args.name,
                    sign_key=sign,
                    box_key=box,
                    max_level=args.max_level,
                    quota_per_minute=args.quota,
                    status="active",
                    created_at=time.time(),
                ),
                actor="operator",
            )
            print(json.dumps({"rp_id": args.id, "sign_key": sign.hex(), "box_key": box.hex(), "keys_out": args.keys_out}))
        elif args.action == "list":
            for rp in store.list_relying_parties():
                print(json.dumps({"rp_id": rp.rp_id, "name": rp.display_name, "max_level": rp.max_level, "quota_per_minute": rp.quota_per_minute, "status": rp.status}))
        else:
            store.set_relying_party_status(args.id, "disabled" if args.action == "disable" else "active", actor="operator")
            print(json.dumps({"rp_id": args.id, "status": "disabled" if args.action == "disable" else "active"}))
    finally:
        store.close()
    return 0


def cmd_ap(args: argparse.Namespace) -> int:
    from engine.store import AcceptancePoint

    store, _cfg = _open_store(args)
    try:
        if args.action == "add":
            sign, _ = _keys_for(args, box=False)
            store.add_acceptance_point(AcceptancePoint(ap_id=args.id, name=args.name, sign_key=sign, status="active", created_at=time.time()), actor="operator")
            print(json.dumps({"ap_id": args.id, "sign_key": sign.hex(), "keys_out": args.keys_out}))
        elif args.action == "list":
            for ap in store.list_acceptance_points():
                print(json.dumps({"ap_id": ap.ap_id, "name": ap.name, "status": ap.status}))
        else:
            store.set_acceptance_point_status(args.id, "disabled" if args.action == "disable" else "active", actor="operator")
            print(json.dumps({"ap_id": args.id, "status": "disabled" if args.action == "disable" else "active"}))
    finally:
        store.close()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    store, _cfg = _open_store(args)
    for e in store.audit_log(limit=args.limit, since_seq=args.since, subject=args.subject):
        print(json.dumps({"seq": e.seq, "ts": e.ts, "actor": e.actor, "action": e.action, "subject": e.subject, "outcome": e.outcome, "detail": e.detail}))
    store.close()
    return 0


# ---- compare ---------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from engine.cli.compare import run_compare

    return run_compare(args)


def cmd_qr(args: argparse.Namespace) -> int:
    from engine.wire.qr import render_png, render_terminal

    if args.png:
        render_png(args.text, Path(args.png))
        print(json.dumps({"png": args.png}))
    else:
        render_terminal(args.text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.cli.demo import run_demo

    return run_demo(args)



# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netid", description="netid-engine: verify people for online ID credentials.")
    p.add_argument("--version", action="version", version=f"netid-engine {__version__}")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-json", action="store_true", help="structured logs: one JSON object per line")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_serve_parser, _operator_parsers, _tool_parsers):
        add(sub)
    return p


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the engine")
    _common(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7400)
    s.add_argument("--tls-cert", type=Path)
    s.add_argument("--tls-key", type=Path)
    s.add_argument("--metrics-port", type=int, default=None, help="serve /metrics, /healthz, /readyz on this port")
    s.add_argument("--metrics-host", default="127.0.0.1")
    s.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per model")
    s.add_argument("--session-ttl", type=float, default=60.0)
    s.add_argument("--max-in-flight", type=int, default=64)
    s.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most (default 10,000, lowered to fit ulimit -n; 90%% of them unauthenticated)")
    s.add_argument("--challenge", choices=["digits", "phrase"], default="digits")
    s.add_argument("--phrases", type=Path, help="phrase list for --challenge phrase (one per line)")
    s.add_argument("--no-challenge-check", action="store_true", help="do not check what the recording says")
    s.add_argument("--state", default=None, metavar="URL",
                   help="sessions, results and quotas shared by many nodes: redis://HOST[:PORT]/DB[?prefix=NAME];"
                        " needs --store postgresql://... (default: in this process)")
    s.set_defaults(func=cmd_serve)


def _operator_parsers(sub) -> None:
    r = sub.add_parser("registry", help="ID-card registry")
    rs = r.add_subparsers(dest="action", required=True)
    ri = rs.add_parser("import", help="import ID-card records (JSON lines: card_number, name, photo, status)")
    _common(ri)
    ri.add_argument("file", type=Path)
    ri.set_defaults(func=cmd_registry_import)

    c = sub.add_parser("card", help="operator actions on an ID card")
    c.add_argument("action", choices=["lost", "reissue"])
    c.add_argument("card_number")
    _common(c)
    c.set_defaults(func=cmd_card)

    for name, func, box in (("rp", cmd_rp, True), ("ap", cmd_ap, False)):
        what = "relying parties" if box else "acceptance points"
        q = sub.add_parser(name, help=f"register and manage {what}")
        qs = q.add_subparsers(dest="action", required=True)
        add = qs.add_parser("add")
        _common(add)
        add.add_argument("--id", required=True)
        add.add_argument("--name", required=True)
        add.add_argument("--sign-key", help="Ed25519 public key, hex")
        if box:
            add.add_argument("--box-key", help="X25519 public key, hex")
            add.add_argument("--max-level", choices=["basic", "high"], default="basic")
            add.add_argument("--quota", type=int, default=600, help="requests per minute")
        add.add_argument("--keys-out", help="generate a key pair and write the private keys here")
        add.set_defaults(func=func)
        ls = qs.add_parser("list")
        _common(ls)
        ls.set_defaults(func=func)
        for act in ("disable", "enable"):
            d = qs.add_parser(act)
            _common(d)
            d.add_argument("id")
            d.set_defaults(func=func)

    from engine.cli.index import add_parser as index_parser

    index_parser(sub, _common, _open_store)

    a = sub.add_parser("audit", help="show the audit log")
    _common(a)
    a.add_argument("--limit", type=int, default=100)
    a.add_argument("--since", type=int, default=0)
    a.add_argument("--subject")
    a.set_defaults(func=cmd_audit)


def _tool_parsers(sub) -> None:
    cmp_ = sub.add_parser("compare", help="compare two face images or two voice recordings")
    cmp_.add_argument("modality", choices=["face", "voice"])
    cmp_.add_argument("a", nargs="?")
    cmp_.add_argument("b", nargs="?")
    cmp_.add_argument("--pairs", type=Path, help="file of pathA<TAB>pathB lines; one JSON line out per pair")
    cmp_.add_argument("--models", type=Path, default=None)
    cmp_.add_argument("--target-fmr", type=float, default=None, help="a calibrated target FMR (default: the modality's operating point)")
    cmp_.add_argument("--batch", type=int, default=32)
    cmp_.set_defaults(func=cmd_compare)

    qr = sub.add_parser("qr", help="render a QR payload as a QR code")
    qr.add_argument("text")
    qr.add_argument("--png")
    qr.set_defaults(func=cmd_qr)

    d = sub.add_parser("demo", help="the whole story on sample data: enroll, verify, summary")
    d.add_argument("--data", type=Path, default=None, help="data root with lfw/, speech/, digits/ (default: bundled samples)")
    d.add_argument("--residents", type=int, default=12, help="residents per phase (FSDD has 6 speakers)")
    d.add_argument("--rounds", type=int, default=3, help="genuine verifications per resident")
    d.add_argument("--workdir", type=Path, default=None)
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--voices", choices=["both", "speech", "digits"], default="both",
                   help="speech: speechocean762 speakers (speaker check); digits: FSDD speakers saying the challenge; both (default)")
    d.add_argument("--concurrency", type=int, default=8, help="verifications in flight")
    d.set_defaults(func=cmd_demo)

    # These hand every argument to their own parsers (see main); listed here for --help.
    b = sub.add_parser("bench", help="benchmarks: accuracy, load, limit, challenge, fuzz, soak, idle, cluster, register, index")
    b.add_argument("kind", choices=BENCHMARKS)
    sub.add_parser("calibrate", help="derive operating points from measured score distributions")
    sub.add_parser("top", help="live view of a running engine's metrics")


#: Commands whose own parsers take every argument after the command name.
DELEGATED = {"calibrate": "engine.bench.calibrate", "top": "engine.ops.top"}
BENCHMARKS = ("accuracy", "load", "limit", "challenge", "fuzz", "soak", "idle", "cluster", "register", "index")


def _split_delegated(argv: list[str]) -> tuple[list[str], str, list[str]] | None:
    """``[global options] calibrate|top|bench KIND rest...`` -> (global options, module, rest)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--log-level" else 1
    if i >= len(argv):
        return None
    if argv[i] in DELEGATED:
        return argv[:i], DELEGATED[argv[i]], argv[i + 1:]
    if argv[i] == "bench" and i + 1 < len(argv) and argv[i + 1] in BENCHMARKS:
        return argv[:i], f"engine.bench.{argv[i + 1]}", argv[i + 2:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = _split_delegated(argv)
    if delegated is not None:
        head, module, rest = delegated
        opts = argparse.ArgumentParser(add_help=False)
        opts.add_argument("--log-level", default="info")
        opts.add_argument("--log-json", action="store_true")
        g = opts.parse_args(head)
        setup_logging(g.log_level, g.log_json)
        import importlib

        return importlib.import_module(module).main(rest)
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_json)
    try:
        return args.func(args)
    except EngineError as exc:
        print(json.dumps({"error": exc.code, "message": exc.message}), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
