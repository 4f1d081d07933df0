"""The MMOLove sandbox in its own process (``bench.sandbox_proc``), as the benchmarks
drive it: start it, mint tokens, set its latency, read its counts and its CPU time.
"""

from __future__ import annotations

import json
import secrets
import sys
from typing import Any

from . import ROOT
from .processes import Child, cpu_seconds, free_port, process_tree, python_env, wait_for_port


def have_gunicorn() -> bool:
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        return False
    return True


class Sandbox:
    """``bench.sandbox_proc``: the MMOLove sandbox in its own process, with a set latency.

    ``keep_alive``: served by gunicorn (one gthread worker, 32 threads), which keeps
    connections open between requests, as MMOLove's front end does; otherwise by
    werkzeug's threaded server (the sandbox's own), which closes every connection.
    Either way the process keeps to one CPU (``sandbox_proc.keep_to_one_cpu``), as a
    remote MMOLove would take none of the senders' cores: its CPU figure is at most
    one core.
    """

    def __init__(self, delay: float = 0.0, *, keep_alive: bool = False) -> None:
        self.secret = secrets.token_urlsafe(32)
        self.server_id = f"bench-{secrets.token_hex(3)}"
        env = python_env(
            BENCH_SANDBOX_SECRET=self.secret,
            BENCH_SANDBOX_SERVER_ID=self.server_id,
            BENCH_SANDBOX_DELAY=str(delay),
        )
        self.keep_alive = keep_alive
        if keep_alive:
            self.port = free_port()
            args = [
                sys.executable,
                "-m",
                "gunicorn",
                "--worker-class=gthread",
                "--workers=1",
                "--threads=32",
                "--keep-alive=30",
                "--backlog=256",
                f"--bind=127.0.0.1:{self.port}",
                "--log-level=warning",
                "--chdir",
                str(ROOT),
                "bench.sandbox_proc:app",
            ]
            self.child = Child(args, env, terminate=True)
            wait_for_port(self.port, timeout=30)
        else:
            args = [sys.executable, "-m", "bench.sandbox_proc", "--delay", str(delay)]
            self.child = Child(args, env)
            self.port = int(self.child.read(timeout=30)["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.endpoint = f"{self.url}/api/referral/events"
        from flask_mmolove.sandbox.tokens import TokenMinter, derive_token_key

        self._minter = TokenMinter(derive_token_key(self.secret))

    @property
    def pid(self) -> int:
        return self.child.pid

    def cpu_seconds(self) -> float:
        """CPU time of the sandbox's processes so far (gunicorn's worker included)."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.child.pid))

    def mint(self, code: str = "friend") -> str:
        """A token as the sandbox mints for a click on ``code``'s share link."""
        return self._minter.mint(self.server_id, code)

    def _call(self, method: str, path: str) -> dict[str, Any]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path)
            data: dict[str, Any] = json.loads(conn.getresponse().read())
            return data
        finally:
            conn.close()

    def set_delay(self, seconds: float) -> None:
        self._call("POST", f"/_bench/delay?seconds={seconds}")

    def stats(self) -> dict[str, Any]:
        """``accepted`` (events written), ``answers`` (status -> count) and ``requests``."""
        return self._call("GET", "/_bench/stats")

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def portal_config(self) -> dict[str, Any]:
        return {
            "MMOLOVE_SERVER_ID": self.server_id,
            "MMOLOVE_REFERRAL_SECRET": self.secret,
            "MMOLOVE_ENDPOINT": self.endpoint,
        }

    def close(self) -> None:
        self.child.stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
