"""Start `klotski serve` as a real process on 127.0.0.1 for the server tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m klotski serve ...` on a free port; waits for /health to answer 200."""

    def __init__(self, model: Path, *flags: str, home: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        # One thread: on 2 shared cores a second OpenMP thread mostly waits for the other (tiny-model steps
        # ran ~50x slower at 2 threads under load); the test process computes beside the server.
        env.setdefault("OMP_NUM_THREADS", "1")
        if home is not None:
            env["KLOTSKI_HOME"] = home
        cmd = [
            sys.executable,
            "-m",
            "klotski",
            "serve",
            "--model",
            str(model),
            "--port",
            str(self.port),
            "--served-model-name",
            "tiny",
            *flags,
        ]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"klotski serve exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("klotski serve did not become ready")

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics (name -> value)."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
