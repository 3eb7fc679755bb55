"""An engine in a subprocess, for benchmarks and tests: start, find its ports, drain.

:class:`EngineProcess` runs ``netid serve --port 0 --metrics-port 0`` and reads the
``ready`` JSON line it prints (bound port, metrics port, engine key). Stopping sends
``SIGTERM`` (a drain) and returns the exit status.

For tuning runs, ``overrides`` change fields of the :class:`~engine.config.EngineConfig`
that ``netid serve`` has no flag for (``face_batch.max_batch=8``,
``limits.max_biometric=12``, ...; and ``switch_interval=0.001``, the interpreter's GIL
switch interval): the child is then ``python -m engine.bench._engine``, which builds the
configuration exactly as ``netid serve`` does, applies the overrides and runs the same
serve command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["EngineProcess", "netid", "apply_overrides"]


def netid(*args: str, timeout: float = 600.0) -> dict[str, Any]:
    """Run a ``netid`` operator command; return its last JSON line (raise on failure)."""
    cmd = [sys.executable, "-m", "engine.cli", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


class EngineProcess:
    """``netid serve`` in a subprocess on free ports."""

    def __init__(
        self,
        data_dir: Path,
        *,
        serve_args: Sequence[str] = (),
        overrides: Sequence[str] = (),
        log_path: Path | None = None,
        ready_timeout: float = 180.0,
        module: str | None = None,
    ) -> None:
        """``module``: run ``python -m MODULE ARGS`` instead of ``netid serve`` (a child that
        prints the same ``ready`` line, e.g. ``engine.bench.fakeserve`` with the fake extractor)."""
        self.module = module
        self.data_dir = data_dir
        self.serve_args = list(serve_args)
        self.overrides = list(overrides)
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.ready: dict[str, Any] = {}
        self._log = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    @property
    def metrics_port(self) -> int | None:
        return self.ready.get("metrics_port")

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> EngineProcess:
        args = ["--data", str(self.data_dir), "--port", "0", "--metrics-port", "0", *self.serve_args]
        if self.module:
            cmd = [sys.executable, "-m", self.module, *args]
        elif self.overrides:
            sets = [f"--switch-interval={o.split('=', 1)[1]}" if o.startswith("switch_interval=") else f"--set={o}" for o in self.overrides]
            cmd = [sys.executable, "-m", "engine.bench._engine", *sets, "--", *args]
        else:
            cmd = [sys.executable, "-m", "engine.cli", "--log-json", "serve", *args]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        found: list[dict[str, Any]] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                if not found and line.startswith("{"):
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if msg.get("event") == "ready":
                        found.append(msg)
            # keep draining stdout until the process ends

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self._reader = reader
        deadline = time.monotonic() + self.ready_timeout
        while not found:
            if self.proc.poll() is not None:
                why = f"the engine exited with {self.proc.returncode} before it was ready: {self._last_log_line()} (log: {self.log_path})"
                self.wait()
                raise RuntimeError(why)
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the engine did not become ready in time")
            time.sleep(0.05)
        self.ready = found[0]
        return self

    def _last_log_line(self) -> str:
        if self.log_path is None:
            return ""
        if self._log not in (None, subprocess.DEVNULL):
            self._log.flush()  # type: ignore[union-attr]
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][-500:] if lines else ""

    def terminate(self) -> None:
        """Send SIGTERM: the engine drains and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to end; then close its log and its output pipe."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5.0)  # it reads the pipe to its end
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()  # type: ignore[union-attr]
        return code

    def stop(self, timeout: float = 60.0) -> int:
        """Drain (SIGTERM) and wait; kill if it takes longer than ``timeout``."""
        self.terminate()
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        """SIGKILL (if it still runs) and reap; :meth:`start` may start it again."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the child with configuration overrides ----------------------------------------------------
def _coerce(old: Any, text: str) -> Any:
    if isinstance(old, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if old is None:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """``a.b=value`` assignments on nested frozen dataclasses, values cast to the field's type."""
    for item in overrides:
        key, _, value = item.partition("=")
        path = key.strip().split(".")

        def set_in(obj: Any, names: list[str]) -> Any:
            if not dataclasses.is_dataclass(obj) or not any(f.name == names[0] for f in dataclasses.fields(obj)):
                raise SystemExit(f"unknown configuration field {key!r}")
            cur = getattr(obj, names[0])
            new = _coerce(cur, value) if len(names) == 1 else set_in(cur, names[1:])
            return dataclasses.replace(obj, **{names[0]: new})

        config = set_in(config, path)
    return config


def _child(argv: list[str]) -> int:
    from engine import cli

    sets = [a.split("=", 1)[1] for a in argv if a.startswith("--set=")]
    for a in argv:
        if a.startswith("--switch-interval="):  # the interpreter's GIL switch interval, seconds
            sys.setswitchinterval(float(a.split("=", 1)[1]))
    rest = [a for a in argv if not a.startswith(("--set=", "--switch-interval=")) and a != "--"]
    args = cli.build_parser().parse_args(["--log-json", "serve", *rest])
    cli.setup_logging(args.log_level, args.log_json)
    config = apply_overrides(cli.build_config(args), sets)
    cli.build_config = lambda _args, **_kw: config  # the serve command, with this configuration
    return cli.cmd_serve(args)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
