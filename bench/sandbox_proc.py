"""The MMOLove sandbox in a process of its own, with a fixed latency on every event.

Run by :class:`bench.sandbox.Sandbox`; not a tool of its own. Two ways to serve it:

- ``python -m bench.sandbox_proc``: werkzeug's threaded server, as ``SandboxServer``
  and ``python -m flask_mmolove.sandbox`` run it. It prints one JSON line
  (``{"port": N}``) once it listens and stops when its stdin closes. Werkzeug's server
  closes the connection after every answer.
- ``gunicorn -k gthread bench.sandbox_proc:app``: the same app in one gunicorn
  worker with many threads (the sandbox's state lives in that one process), which
  keeps connections alive as MMOLove's own front end does.

The secret and server id come from the environment (never argv), the latency from
``BENCH_SANDBOX_DELAY`` or ``--delay``. A WSGI wrapper adds:

- a sleep of ``--delay`` seconds before each ingest request is handled (the thread
  sleeps, as MMOLove's own slowness would make the sender wait, and many requests
  wait at once, each in its own thread);
- ``POST /_bench/delay?seconds=S`` to change that latency;
- ``GET /_bench/stats``: events written, answers by status, requests seen.

Either way the process keeps to one CPU (:func:`keep_to_one_cpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from werkzeug.serving import make_server

from flask_mmolove.sandbox.app import INGEST_PATH, create_sandbox_app, sandbox_state
from flask_mmolove.sandbox.server import handler_class

StartResponse = Callable[..., Any]


class Latency:
    """WSGI middleware: MMOLove's latency, and the benchmark's control endpoints."""

    def __init__(self, app: Any, delay: float) -> None:
        self.app = app
        self.state = sandbox_state(app)
        self.delay = delay
        self.answers: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == INGEST_PATH:
            if self.delay > 0:
                time.sleep(self.delay)

            def counting(status: str, headers: Any, exc_info: Any = None) -> Any:
                with self._lock:
                    self.requests += 1
                    self.answers[status.split(" ", 1)[0]] += 1
                return start_response(status, headers, exc_info)

            return self.app(environ, counting)  # type: ignore[no-any-return]
        if path == "/_bench/delay":
            query = parse_qs(environ.get("QUERY_STRING", ""))
            self.delay = float(query["seconds"][0])
            return self._json(start_response, {"delay": self.delay})
        if path == "/_bench/stats":
            with self._lock:
                data = {
                    "accepted": self.state.accepted_count(),
                    "answers": dict(self.answers),
                    "requests": self.requests,
                }
            return self._json(start_response, data)
        if path == "/_reset":
            with self._lock:
                self.answers.clear()
                self.requests = 0
        return self.app(environ, start_response)  # type: ignore[no-any-return]

    @staticmethod
    def _json(start_response: StartResponse, data: dict[str, Any]) -> list[bytes]:
        body = json.dumps(data).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]


def keep_to_one_cpu() -> None:
    """Run this process's threads, and those it starts later, on one CPU (Linux).

    The GIL lets only one of them run Python at a time, so one CPU takes nothing from
    the sandbox. Spread over several, every hand-over of the GIL (each socket read or
    write while another thread waits for it) wakes a thread on another CPU, which on
    a VM is dear: on 2 cores, gunicorn's worker spent about 1,000 us of CPU per event
    and 27 context switches per request spread, against 500 us and 1 kept to one CPU.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[-1]})


def build(delay: float) -> Latency:
    app = create_sandbox_app(
        secret=os.environ["BENCH_SANDBOX_SECRET"],
        server_id=os.environ["BENCH_SANDBOX_SERVER_ID"],
        registration_url="http://127.0.0.1/register",
    )
    return Latency(app, delay)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sandbox_proc")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to each event")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    keep_to_one_cpu()
    server = make_server(
        "127.0.0.1",
        args.port,
        build(args.delay),
        threaded=True,
        request_handler=handler_class(quiet=True),
    )
    # Many keep-alive senders at once: a deeper accept queue than socketserver's 5.
    server.socket.listen(256)

    def stop_when_stdin_closes() -> None:
        sys.stdin.read()
        server.shutdown()

    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    print(json.dumps({"port": server.port}), flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif "BENCH_SANDBOX_SECRET" in os.environ:
    # Imported by gunicorn, in its worker before the worker starts its threads.
    keep_to_one_cpu()
    app = build(float(os.environ.get("BENCH_SANDBOX_DELAY", "0")))
