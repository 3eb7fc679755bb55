"""QR codes for session payloads (segno): PNG for screens and print, text for terminals."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import segno

__all__ = ["make_qr", "render_png", "render_terminal", "render_text"]


def make_qr(text: str) -> segno.QRCode:
    # byte mode, medium error correction: a ~250-character payload fits comfortably
    return segno.make(text, error="m", micro=False)


def render_png(text: str, path: Path, *, scale: int = 6) -> None:
    make_qr(text).save(str(path), kind="png", scale=scale, border=4)


def render_text(text: str) -> str:
    buf = io.StringIO()
    make_qr(text).terminal(out=buf, compact=True)
    return buf.getvalue()


def render_terminal(text: str) -> None:
    sys.stdout.write(render_text(text))
