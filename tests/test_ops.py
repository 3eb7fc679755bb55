"""Operations: /metrics moves during a run, ``netid top`` renders it, overload is answered,
and a drain (in process, and SIGTERM to a real ``netid serve``) loses no request."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import nacl.public
import nacl.signing
import pytest
import trio

from engine.bench._common import digit_voices
from engine.bench._engine import EngineProcess, netid
from engine import errors as E
from engine.ops import top
from engine.app import build_engine, run_engine
from engine.inference.batcher import BatcherConfig
from engine.wire.client import open_holder, open_relying_party
from engine.config import ChallengeSettings, EngineConfig, LimitsConfig
from engine.inference.extractors import _identity_vector, fake_extractors
from engine.ops.registry import seal_card_template
from engine.store import CardRecord

from .conftest import FixedScores, face, make_rp, voice

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PEOPLE = ("alice", "bob", "carol", "dave")


def slow(fn, seconds: float):
    """The fake batch function, taking ``seconds`` per call (it runs in a worker thread)."""

    def run(items):
        time.sleep(seconds)
        return fn(items)

    return run


def slow_fakes(seconds: float):
    x = fake_extractors()
    return dataclasses.replace(x, face_batch=slow(x.face_batch, seconds))


async def start_engine(nursery, tmp_path, *, extractors, limits: LimitsConfig | None = None):
    cfg = EngineConfig(
        data_dir=tmp_path / "data",
        port=0,
        metrics_port=0,
        voice_wait_with_challenge=0.0,  # the fake recogniser is instant: nothing to wait behind
        limits=limits or LimitsConfig(),
        challenge=ChallengeSettings(kind="digits", length=6),
        face_batch=BatcherConfig(max_batch=4, max_wait=0.002, queue_size=64),
    )
    engine = build_engine(cfg, extractors=extractors, scores=FixedScores())
    engine.store.import_cards(
        [
            CardRecord(card_number=f"C{i}", name=who.title(), photo_path=f"{who}.jpg", status="valid",
                       photo_template=seal_card_template(engine.cipher, _identity_vector("FACE", who, 128), f"C{i}"))
            for i, who in enumerate(PEOPLE)
        ],
        actor="test",
    )
    rp = make_rp(engine.store, "hotel")
    running = await nursery.start(run_engine, engine)
    return running, rp


async def enroll_all(port: int) -> dict[str, tuple[str, nacl.signing.SigningKey]]:
    out = {}
    for i, who in enumerate(PEOPLE):
        key = nacl.signing.SigningKey.generate()
        async with open_holder("127.0.0.1", port, device_key=key) as phone:
            got = await phone.enroll(f"C{i}", [face(who, 1)], [voice(who, "enroll", n) for n in (1, 2, 3)])
        out[who] = (got.credential_id, key)
    return out


async def verify_answer(port: int, cred: str, key, session, *, face: bytes, voice) -> str:
    """One verification from the holder's phone: its outcome, or the code of the error that
    answered it (``connection_lost`` if the engine went away first). ``voice`` makes the
    recording from the session's challenge."""
    async with open_holder("127.0.0.1", port, device_key=key) as phone:
        qr = phone.scan(session.qr)
        try:
            return (await phone.verify(cred, qr, face=face, voice=voice(qr.challenge))).outcome
        except E.EngineError as exc:
            return exc.code
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return "connection_lost"


async def verify_many(port: int, rp_keys, creds, n: int, answers: list) -> None:
    """``n`` verifications at once from the residents' phones; every answer (or error code) recorded."""
    async with open_relying_party("127.0.0.1", port, rp_id="hotel", signing_key=rp_keys.signing, box_key=rp_keys.box) as rp:
        sessions = [await rp.open_session() for _ in range(n)]  # first, so only verifications are in flight below

        async def one(k: int) -> None:
            who = PEOPLE[k % len(PEOPLE)]
            cred, key = creds[who]
            answers.append(await verify_answer(port, cred, key, sessions[k], face=face(who, 100 + k),
                                               voice=lambda challenge: voice(who, challenge, k)))

        async with trio.open_nursery() as requests:
            for k in range(n):
                requests.start_soon(one, k)


async def scrape(url: str) -> top.Snapshot:
    return await trio.to_thread.run_sync(top.scrape, url)


def verifies_answered(snap: top.Snapshot) -> float:
    return sum(v for labels, v in snap.series("netid_requests_total").items() if dict(labels)["type"] == "verify")


async def test_metrics_move_during_a_run_and_top_renders(tmp_path, nursery, capsys):
    running, rp_keys = await start_engine(nursery, tmp_path, extractors=slow_fakes(0.03))
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with trio.fail_after(30):
        creds = await enroll_all(running.port)
        before = await scrape(url)
        assert before.ready is True
        assert before.get("netid_credentials", status="active") == len(PEOPLE)
        answers: list[str] = []
        seen_in_flight = 0.0
        async with trio.open_nursery() as n:
            n.start_soon(verify_many, running.port, rp_keys, creds, 16, answers)
            while len(answers) < 16:  # scrape while the run goes on
                mid = await scrape(url)
                seen_in_flight = max(seen_in_flight, mid.get("netid_in_flight"))
                await trio.sleep(0.01)
        after = await scrape(url)

    assert answers == ["pass"] * 16
    assert seen_in_flight >= 1  # requests were seen in flight while the run went on
    verify_ok = lambda s: s.get("netid_requests_total", type="verify", outcome="ok")  # noqa: E731
    assert verify_ok(after) - verify_ok(before) == 16
    assert after.get("netid_requests_total", type="open_session", outcome="ok") - before.get("netid_requests_total", type="open_session", outcome="ok") == 16
    assert after.get("netid_request_latency_seconds_count", type="verify") - before.get("netid_request_latency_seconds_count", type="verify") == 16
    for model in ("face", "voice", "challenge"):
        items = after.get("netid_batch_size_sum", model=model) - before.get("netid_batch_size_sum", model=model)
        assert items == 16, model  # one item per verification through each model
        calls = after.get("netid_batch_size_count", model=model) - before.get("netid_batch_size_count", model=model)
        assert 1 <= calls <= 16
    # the slow face model made jobs wait, so batches of more than one formed
    assert after.get("netid_batch_size_count", model="face") - before.get("netid_batch_size_count", model="face") < 16
    assert after.get("netid_in_flight") == 0
    checks = lambda s: s.get("netid_challenge_checks_total", stage="screen", outcome="pass")  # noqa: E731
    assert checks(after) - checks(before) == 16  # every spoken challenge checked and counted

    assert await trio.to_thread.run_sync(top.main, ["--url", url, "--once", "--interval", "0.05"]) == 0
    frame = capsys.readouterr().out
    assert "ready" in frame and "REQUESTS" in frame
    assert "since start 100 %" in frame  # the fake recogniser's verdicts are all the screen's
    verify_row = next(line for line in frame.splitlines() if line.startswith("verify "))
    assert int(verify_row.split()[4]) == 16  # the total column
    assert any(line.startswith("face ") for line in frame.splitlines())
    assert "credentials: active 4" in frame


def test_top_percentiles_from_histogram_buckets():
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.5, 40.0), (float("inf"), 40.0)]
    assert top.histogram_quantile(buckets, 0.5) == pytest.approx(0.15)  # rank 20: halfway through (0.1, 0.2]
    assert top.histogram_quantile(buckets, 0.375) == pytest.approx(0.125)
    assert top.histogram_quantile(buckets, 0.25) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert top.histogram_quantile(buckets, 1.0) == pytest.approx(0.5)
    assert top.histogram_quantile([(0.1, 5.0), (float("inf"), 10.0)], 0.99) == pytest.approx(0.1)  # in +Inf: the last finite bound
    assert math.isnan(top.histogram_quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5))
    prev = top.parse_metrics('netid_requests_total{type="verify",outcome="ok"} 5\nnetid_in_flight 2\n', at=0.0)
    cur = top.parse_metrics('netid_requests_total{type="verify",outcome="ok"} 25\nnetid_in_flight 3\n', at=2.0)
    frame = top.render(prev, cur)
    row = next(line for line in frame.splitlines() if line.startswith("verify "))
    assert row.split()[1:5] == ["10.0", "10.0", "0.0", "25"]  # req/s, ok/s, err/s, total
    assert "in flight 3" in frame


async def test_overload_is_answered_at_once_and_counted(tmp_path, nursery):
    running, rp_keys = await start_engine(nursery, tmp_path, extractors=slow_fakes(0.05), limits=LimitsConfig(max_biometric=3))
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with trio.fail_after(30):
        creds = await enroll_all(running.port)
        before = await scrape(url)
        answers: list[str] = []
        await verify_many(running.port, rp_keys, creds, 20, answers)
        after = await scrape(url)
    assert len(answers) == 20 and "connection_lost" not in answers
    refused = answers.count("overloaded")
    assert refused >= 1 and answers.count("pass") >= 3
    assert answers.count("pass") + refused == 20
    moved = sum(after.series("netid_overloaded_total").values()) - sum(before.series("netid_overloaded_total").values())
    assert moved == refused
    assert after.get("netid_requests_total", type="verify", outcome="overloaded") - before.get("netid_requests_total", type="verify", outcome="overloaded") == refused


async def test_drain_answers_every_request_in_flight(tmp_path):
    answers: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running, rp_keys = await start_engine(nursery, tmp_path, extractors=slow_fakes(0.05))
            url = f"http://127.0.0.1:{running.metrics_port}/metrics"
            creds = await enroll_all(running.port)
            async with trio.open_nursery() as n:
                n.start_soon(verify_many, running.port, rp_keys, creds, 12, answers)
                # drain once every verification has reached the engine and some are still running
                while True:
                    snap = await scrape(url)
                    if snap.get("netid_in_flight") + verifies_answered(snap) >= 12:
                        break
                    await trio.sleep(0.005)
                in_flight_at_drain = snap.get("netid_in_flight")
                running.drain()
    assert in_flight_at_drain >= 1
    assert len(answers) == 12
    assert "connection_lost" not in answers  # every request that was read was answered


# ---- a real engine process ------------------------------------------------------------------------
@pytest.mark.slow
async def test_sigterm_drains_a_real_engine(tmp_path):
    """``netid serve`` on the real models: SIGTERM while verifications run; all answered, exit 0."""
    ids = json.loads((SAMPLES / "identities.json").read_text())[:3]
    data = tmp_path / "data"
    registry = tmp_path / "cards.jsonl"
    registry.write_text("".join(
        json.dumps({"card_number": p["card_number"], "name": p["name"], "photo": str(SAMPLES / "lfw" / p["face"] / f"{p['face']}_0001.jpg"), "status": "valid"}) + "\n"
        for p in ids
    ))
    await trio.to_thread.run_sync(lambda: netid("registry", "import", str(registry), "--data", str(data)))
    await trio.to_thread.run_sync(lambda: netid("rp", "add", "--id", "hotel", "--name", "Hotel", "--quota", "100000", "--keys-out", str(tmp_path / "keys"), "--data", str(data)))
    rp_sign = nacl.signing.SigningKey((tmp_path / "keys" / "hotel.sign.key").read_bytes())
    rp_box = nacl.public.PrivateKey((tmp_path / "keys" / "hotel.box.key").read_bytes())
    voices = digit_voices(SAMPLES, [p["digits_speaker"] for p in ids], range(0, 5))
    rng = random.Random(7)
    engine = EngineProcess(data, serve_args=["--no-challenge-check"], log_path=tmp_path / "engine.log")
    await trio.to_thread.run_sync(engine.start)
    n = 24
    answers: list[str] = []
    try:
        with trio.fail_after(240):
            creds = []
            for p in ids:
                key = nacl.signing.SigningKey.generate()
                faces = [(SAMPLES / "lfw" / p["face"] / f"{p['face']}_000{i}.jpg").read_bytes() for i in (2, 3)]
                said = [voices.say(p["digits_speaker"], "".join(rng.choice("0123456789") for _ in range(8)), rng) for _ in range(3)]
                async with open_holder("127.0.0.1", engine.port, device_key=key) as phone:
                    creds.append((p, (await phone.enroll(p["card_number"], faces, said)).credential_id, key))
            url = engine.metrics_url
            async with open_relying_party("127.0.0.1", engine.port, rp_id="hotel", signing_key=rp_sign, box_key=rp_box) as rp:
                sessions = [await rp.open_session() for _ in range(n)]

                async def one(k: int) -> None:
                    p, cred, key = creds[k % len(creds)]
                    live = (SAMPLES / "lfw" / p["face"] / f"{p['face']}_000{4 + k % 3}.jpg").read_bytes()
                    answers.append(await verify_answer(
                        engine.port, cred, key, sessions[k], face=live,
                        voice=lambda challenge: voices.say(p["digits_speaker"], challenge, random.Random(k))))

                async with trio.open_nursery() as nursery:
                    for k in range(n):
                        nursery.start_soon(one, k)
                    # SIGTERM once every request has reached the engine and some are still running
                    while True:
                        snap = await scrape(url)
                        if snap.get("netid_in_flight") + verifies_answered(snap) >= n:
                            break
                        await trio.sleep(0.01)
                    in_flight_at_signal = snap.get("netid_in_flight")
                    engine.terminate()
            code = await trio.to_thread.run_sync(engine.wait, 120)
    finally:
        engine.kill()
    assert in_flight_at_signal >= 1, "every request finished before SIGTERM: nothing was drained"
    assert len(answers) == n
    assert "connection_lost" not in answers
    assert all(a in ("pass", "fail") for a in answers), answers
    assert code == 0


# ---- the load generator's bookkeeping ---------------------------------------------------------------
def test_load_summary_counts_every_answer():
    from types import SimpleNamespace

    from engine.bench.load import Outcome, Step, summarise

    t0 = 100.0
    outcomes = [Outcome("genuine", t0 + 0.5 * i, sent=t0 + 0.5 * i + 0.01, done=t0 + 0.5 * i + 0.2, status="pass", stage="verify", session_id=f"s{i}") for i in range(40)]
    outcomes += [Outcome("impostor_face", t0 + 5.0, sent=t0 + 5.01, done=t0 + 5.04, status="overloaded", stage="verify")]
    outcomes += [Outcome("genuine", t0 + 6.0, sent=t0 + 6.0, done=t0 + 16.0, status="deadline_exceeded", stage="verify")]
    outcomes += [Outcome("genuine", t0 + 7.0)]  # never answered
    gen = SimpleNamespace(pushed={f"s{i}": "pass" for i in range(39)})
    row = summarise(Step("x", 2.0, 20.0), t0, outcomes, None, None, {"generator_cpu_share": 0.01}, gen)
    assert row["arrivals"] == 43 and row["answered_results"] == 40
    assert row["errors"] == {"overloaded": 1, "deadline_exceeded": 1, "unanswered": 1}
    assert row["unanswered"] == 1
    assert row["overloaded"] == 1 and row["overloaded_p99_ms"] == pytest.approx(30.0)
    assert row["p50_ms"] == pytest.approx(200.0)
    assert row["results_not_pushed"] == 1
    # completions inside [t0 + 2 s, t0 + 20 s]: arrivals 4..39 (done at 0.5 i + 0.2)
    assert row["throughput_rps"] == pytest.approx(36 / 18.0, rel=1e-3)
    assert row["outcomes"]["genuine"] == {"pass": 40, "error": 2}


def test_the_services_cpu_per_verification_is_what_the_step_added_to_their_idle_rate():
    from types import SimpleNamespace

    from engine.bench.load import Outcome, Step, summarise

    outcomes = [Outcome("genuine", 100.0 + i, sent=100.0 + i, done=100.2 + i, status="pass", stage="verify", session_id=f"s{i}")
                for i in range(20)]
    from engine.ops.top import Snapshot

    def layers(at: float, store: float, state: float) -> Snapshot:
        return Snapshot(at=at, samples={("netid_layer_cpu_seconds_total", (("layer", "store"),)): store,
                                         ("netid_layer_cpu_seconds_total", (("layer", "state"),)): state,
                                         ("netid_model_seconds_sum", (("model", "face"),)): 50 * store})

    # 3 ms a second with nothing offered in the servers, 1 ms in the state's threads
    gen = SimpleNamespace(pushed={}, services_idle_cpu=0.003, layer_idle_cpu={"state": 0.001, "store": 0.0})
    row = summarise(Step("x", 1.0, 20.0), 100.0, outcomes, layers(0.0, 1.0, 2.0), layers(20.0, 1.02, 2.06),
                    {"wall_s": 20.0, "services_cpu_s": 0.1}, gen)
    assert row["services_idle_cpu_ms_per_s"] == 3.0
    assert row["services_cpu_raw_ms_per_verification"] == 5.0  # 100 ms over 20 verifications
    assert row["services_cpu_ms_per_verification"] == 2.0  # less the idle 60 ms
    assert row["layer_cpu_raw_ms_per_verification"] == {"state": 3.0, "store": 1.0}
    assert row["layer_cpu_ms_per_verification"] == {"state": 2.0, "store": 1.0}  # less the state's idle 20 ms
    assert row["layer_idle_cpu_ms_per_s"] == {"state": 1.0, "store": 0.0}
    assert row["model_ms_per_verification"] == {"face": 50.0}  # 1 s in the face model's calls over 20 verifications


def test_load_limit_is_the_mean_of_before_and_after():
    from engine.bench.load import bracket_limit

    before = {"limit_rps": 4.0, "best": {"batch": 2, "rps": 4.0, "cpu_ms_per_verification": 500.0, "cpu_share": 0.98}}
    after = {"limit_rps": 3.6, "best": {"batch": 2, "rps": 3.6, "cpu_ms_per_verification": 540.0, "cpu_share": 1.0}}
    limit = bracket_limit(before, after)
    assert limit["limit_rps"] == pytest.approx(3.8) and limit["best"]["rps"] == pytest.approx(3.8)
    assert limit["best"]["after"]["rps"] == 3.6
    assert (limit["limit_rps_before"], limit["limit_rps_after"]) == (4.0, 3.6)
    assert limit["best"]["cpu_ms_per_verification"] == pytest.approx(520.0)
    assert before["limit_rps"] == 4.0 and before["best"]["cpu_ms_per_verification"] == 500.0  # not changed in place


def test_load_steps_offer_the_rate_they_name():
    from engine.bench.load import arrival_times

    times = arrival_times(2.7, 30.0, random.Random(2))
    assert len(times) == 81 and times == sorted(times)
    assert 0.0 <= times[0] and times[-1] < 30.0
    assert times == arrival_times(2.7, 30.0, random.Random(2))  # seeded: the same step again
    # the gaps stay random (Poisson-like), not evenly spaced
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) > 3 * (30.0 / 81) > 0.1 * (30.0 / 81) > min(gaps)


def test_the_limit_takes_the_load_mix_in_its_proportions():
    from engine.bench._common import DEFAULT_MIX, KINDS, mix_kinds, parse_mix

    mix = parse_mix(DEFAULT_MIX)
    assert set(mix) == set(KINDS)
    kinds = mix_kinds(mix, 48, random.Random(3))
    assert len(kinds) == 48
    counts = {k: kinds.count(k) for k in KINDS}
    assert counts["genuine"] in (33, 34) and sum(counts.values()) == 48
    assert all(4 <= counts[k] <= 5 for k in KINDS if k != "genuine")
    assert kinds != sorted(kinds)  # shuffled, so that any prefix holds every kind
    assert mix_kinds({"wrong_words": 2.0}, 5, random.Random(0)) == ["wrong_words"] * 5
    with pytest.raises(SystemExit):
        parse_mix("genuine=1,replayed=1")


def test_engine_config_overrides():
    from engine.bench._engine import apply_overrides

    cfg = EngineConfig(data_dir=Path("/tmp/x"))
    new = apply_overrides(cfg, ["face_batch.workers=2", "limits.max_biometric=12", "intra_op_threads=1", "face_batch.max_wait=0.01"])
    assert new.face_batch.workers == 2 and new.face_batch.max_wait == 0.01
    assert new.limits.max_biometric == 12 and new.voice_batch == cfg.voice_batch
    with pytest.raises(SystemExit):
        apply_overrides(cfg, ["face_batch.nope=1"])
    with pytest.raises(E.ConfigError):
        apply_overrides(cfg, ["face_batch.workers=0"])  # the config still validates itself


def test_voice_jobs_wait_for_company_only_behind_the_recogniser():
    """With the challenge check on, the voice batcher waits ``voice_wait_with_challenge``
    for a second recording; with it off, it keeps its own short ``max_wait``."""
    on = EngineConfig(data_dir=Path("/tmp/x"))
    assert on.voice_batcher.max_wait == on.voice_wait_with_challenge == 0.02
    assert on.voice_batcher.max_batch == on.voice_batch.max_batch
    off = EngineConfig(data_dir=Path("/tmp/x"), challenge=ChallengeSettings(check=False))
    assert off.voice_batcher == off.voice_batch and off.voice_batcher.max_wait == 0.004
    longer = dataclasses.replace(on, voice_batch=BatcherConfig(max_batch=16, max_wait=0.5, queue_size=64, workers=1))
    assert longer.voice_batcher.max_wait == 0.5
    with pytest.raises(E.ConfigError):
        EngineConfig(data_dir=Path("/tmp/x"), voice_wait_with_challenge=-1.0)
