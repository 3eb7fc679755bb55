"""Length-prefixed framing: round trips over any chunking, limits, truncation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import FrameTooLarge, MalformedFrame
from engine.wire.framing import FrameReader, encode_frame

payloads_st = st.lists(st.binary(min_size=1, max_size=3000), max_size=12)
cuts_st = st.lists(st.integers(min_value=0, max_value=40_000), max_size=30)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


async def read_all(chunks: list[bytes], max_frame: int) -> list[bytes]:
    """Send ``chunks`` one send_all each over a lockstep stream (no merging of
    writes), close, and read frames until the clean end of stream."""
    send, receive = trio.testing.lockstep_stream_pair()
    frames: list[bytes] = []

    async def sender() -> None:
        async with send:
            for chunk in chunks:
                await send.send_all(chunk)

    reader = FrameReader(receive, max_frame)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while (frame := await reader.read()) is not None:
                frames.append(frame)
            assert await reader.read() is None  # stays at end of stream
    return frames


def test_encode_frame_layout() -> None:
    assert encode_frame(b"\x81\xa1a\x01") == b"\x00\x00\x00\x04\x81\xa1a\x01"
    assert encode_frame(b"x" * 0x10203)[:4] == b"\x00\x01\x02\x03"
    with pytest.raises(ValueError):
        encode_frame(b"")


@settings(deadline=None)
@given(payloads=payloads_st, cuts=cuts_st)
async def test_round_trip_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    data = b"".join(encode_frame(p) for p in payloads)
    assert await read_all(split(data, cuts), max_frame=3000) == payloads


@settings(deadline=None)
@given(payloads=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6), data=st.data())
async def test_truncated_stream_is_malformed(payloads: list[bytes], data: st.DataObject) -> None:
    encoded = [encode_frame(p) for p in payloads]
    whole = b"".join(encoded)
    boundaries = {0}
    for frame in encoded:
        boundaries.add(max(boundaries) + len(frame))
    cut = data.draw(st.integers(min_value=1, max_value=len(whole) - 1).filter(lambda c: c not in boundaries))
    complete = sum(1 for b in boundaries if 0 < b <= cut)
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(whole[:cut])
    await send.aclose()
    reader = FrameReader(receive, max_frame=300)
    with trio.fail_after(10):
        for expected in payloads[:complete]:
            assert await reader.read() == expected
        with pytest.raises(MalformedFrame):
            await reader.read()


async def test_oversized_length_fails_before_the_body() -> None:
    send, receive = trio.testing.memory_stream_pair()
    reader = FrameReader(receive, max_frame=1024)
    await send.send_all(encode_frame(b"ok"))
    # Announce one byte more than allowed and never send the body: the reader
    # must refuse on the header alone instead of waiting for the body.
    await send.send_all((1025).to_bytes(4, "big"))
    with trio.fail_after(5):
        assert await reader.read() == b"ok"
        with pytest.raises(FrameTooLarge) as err:
            await reader.read()
    assert err.value.code == "frame_too_large" and err.value.fatal


async def test_largest_announced_length_fails_at_once() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(b"\xff\xff\xff\xff")
    with trio.fail_after(5), pytest.raises(FrameTooLarge):
        await FrameReader(receive, max_frame=8 * 1024 * 1024).read()


async def test_frame_of_exactly_max_frame_is_accepted() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(encode_frame(b"z" * 1024))
    with trio.fail_after(5):
        assert await FrameReader(receive, max_frame=1024).read() == b"z" * 1024


async def test_zero_length_frame_is_malformed() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(b"\x00\x00\x00\x00" + encode_frame(b"next"))
    with trio.fail_after(5), pytest.raises(MalformedFrame):
        await FrameReader(receive, max_frame=1024).read()


@pytest.mark.parametrize("sent", [b"\x00\x00", b"\x00\x00\x00\x0aabcde"])
async def test_truncated_header_or_body_is_malformed(sent: bytes) -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(sent)
    await send.aclose()
    with trio.fail_after(5), pytest.raises(MalformedFrame):
        await FrameReader(receive, max_frame=1024).read()


async def test_clean_eof_is_none() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send.aclose()
    with trio.fail_after(5):
        assert await FrameReader(receive, max_frame=1024).read() is None


async def test_pipelined_frames_share_receives() -> None:
    # Many small frames arriving in one write come out of one receive.
    send, receive = trio.testing.memory_stream_pair()
    payloads = [bytes([i % 251 + 1]) * (i % 7 + 1) for i in range(500)]
    await send.send_all(b"".join(encode_frame(p) for p in payloads))
    await send.aclose()
    receives = 0
    original = receive.receive_some

    async def counting(max_bytes: int | None = None) -> bytes | bytearray:
        nonlocal receives
        receives += 1
        return await original(max_bytes)

    receive.receive_some = counting  # type: ignore[method-assign]
    reader = FrameReader(receive, max_frame=64)
    with trio.fail_after(5):
        got = [frame async for frame in _frames(reader)]
    assert got == payloads
    assert receives <= 3


async def _frames(reader: FrameReader) -> AsyncIterator[bytes]:
    while (frame := await reader.read()) is not None:
        yield frame


def test_max_frame_must_be_positive() -> None:
    send, receive = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError):
        FrameReader(receive, max_frame=0)
