"""Start `minigpt4 serve` (or a fake-engine server) in a subprocess on a free loopback port, for tests.

Contract: `ServerProcess.start(args, ...)` launches `python -m minigpt4_local.cli serve --host 127.0.0.1
--port P *args` (or any argv via `argv=`), with stdout+stderr in a log file; `wait_ready(timeout)` polls
GET /health until 200 (raises with the log when the process exits or the time runs out); `stop()` sends
SIGTERM and waits (then kills); `log()` is the output so far. `shared_demo_server()` is one demo server
per test process (started on first use, stopped at exit), so several test modules share one model load.
Servers bind 127.0.0.1 only; llama.cpp runs one thread so answers are comparable bit for bit with
`minigpt4 describe --threads 1`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
THREADS = "1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class ServerProcess:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.files_dir: Path | None = None

    @classmethod
    def start(
        cls,
        args: Sequence[str] = (),
        *,
        argv: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> ServerProcess:
        port = port or free_port()
        if argv is None:
            argv = [
                sys.executable,
                "-m",
                "minigpt4_local.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *args,
            ]
        else:
            argv = [a.replace("{port}", str(port)) for a in argv]
        log_path = Path(tempfile.mkstemp(prefix="minigpt4-serve-", suffix=".log")[1])
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        return cls(process, port, log_path)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health(self) -> tuple[int, bytes]:
        return http_get(self.url + "/health")

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if self.health()[0] == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def demo_server_args(*extra: str) -> list[str]:
    return ["--model", "demo", "--threads", THREADS, "--parallel", "4", *extra]


API_KEY = "test-key-0123"
_shared: dict[str, Any] = {}


def _local_files_dir() -> Path:
    """A directory for --allow-local-files: the example images, plus hostile entries (a symlink that
    escapes, a FIFO) and, beside it, a secret file the server must never read."""
    root = Path(tempfile.mkdtemp(prefix="minigpt4-files-"))
    allowed = root / "allowed"
    allowed.mkdir()
    for image in sorted((REPO / "examples").glob("*.png")):
        shutil.copy(image, allowed / image.name)
    shutil.copy(REPO / "examples" / "one-shape.png", root / "secret.png")
    (allowed / "escape.png").symlink_to(root / "secret.png")
    os.mkfifo(allowed / "pipe.png")
    atexit.register(shutil.rmtree, root, True)
    return allowed


def shared_demo_server() -> ServerProcess:
    """One demo server per test process: key `API_KEY`, local files under `.files_dir`, 8 MiB bodies,
    2 s body timeout (slow-loris tests stay short)."""
    server = _shared.get("demo")
    if server is None or server.process.poll() is not None:
        files = _local_files_dir()
        server = ServerProcess.start(
            demo_server_args(
                "--api-key",
                API_KEY,
                "--allow-local-files",
                str(files),
                "--max-body-mb",
                "8",
                "--body-timeout",
                "2",
            )
        )
        server.files_dir = files
        atexit.register(server.stop)
        _shared["demo"] = server
        server.wait_ready()
    return server
