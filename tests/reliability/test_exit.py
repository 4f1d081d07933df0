"""Item 8: a process exits within its drain bound while MMOLove is down, and a later
process delivers everything it left behind."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_support import (
    HERE,
    assert_exactly_once,
    open_outbox,
    process_env,
    record_figures,
    start_worker,
    stop_process,
)
from support import wait_for

EVENTS = 24
DRAIN = 1.0
#: stop() joins the delivery thread for drain + 1 s; the rest is interpreter teardown.
EXIT_BOUND = DRAIN + 1.0 + 1.5


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """An endpoint that accepts connections and never answers (MMOLove hanging)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/api/referral/events"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@contextlib.contextmanager
def refusing() -> Iterator[str]:
    """An endpoint where nothing listens (MMOLove's host down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"http://127.0.0.1:{port}/api/referral/events"


@pytest.mark.slow
@pytest.mark.parametrize("down", ["hanging", "refusing"])
def test_exit_within_drain_bound_then_a_later_process_delivers(
    mmolove_sandbox: Any, tmp_path: Path, down: str
) -> None:
    db = tmp_path / "outbox.sqlite3"
    tokens = [mmolove_sandbox.mint_token(f"friend{i}") for i in range(EVENTS)]
    (tmp_path / "tokens.txt").write_text("\n".join(tokens))
    settings = {
        "MMOLOVE_DATABASE_URI": f"sqlite:///{db}",
        "MMOLOVE_DELIVERY": "thread",
        "MMOLOVE_DRAIN_TIMEOUT": DRAIN,
        "MMOLOVE_LEASE": 3.0,
        # Inside the lease, and still longer than the drain: a send outlives it.
        "MMOLOVE_CONNECT_TIMEOUT": 1.0,
        "MMOLOVE_READ_TIMEOUT": 1.9,
        "MMOLOVE_RETRY_BASE": 0.05,
        "MMOLOVE_RETRY_CAP": 0.2,
        "MMOLOVE_POLL_INTERVAL": 0.2,
    }
    with black_hole() if down == "hanging" else refusing() as endpoint:
        env = process_env(mmolove_sandbox, tmp_path, **settings)
        env["MMOLOVE_ENDPOINT"] = endpoint
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "procapp.py"), "enqueue", str(tmp_path / "tokens.txt")],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("enqueued; exiting at"):
                break
        exiting = float(lines[-1].split()[-1]) if lines else 0.0
        # Let the delivery thread get into its sends before the exit.
        try:
            output, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        exited = time.time()
        assert lines, output
        assert lines[-1].startswith("enqueued"), "".join(lines) + output
    exit_time = exited - exiting
    assert proc.returncode == 0, "".join(lines) + output
    assert exit_time < EXIT_BOUND, f"exit took {exit_time:.1f} s\n{''.join(lines)}{output}"

    outbox = open_outbox(f"sqlite:///{db}")
    left = outbox.stats()
    assert left.delivered == 0
    assert left.pending + left.in_flight == EVENTS
    assert mmolove_sandbox.events == []

    # A later process (a worker on the real endpoint) delivers everything.
    later_started = time.monotonic()
    worker = start_worker(process_env(mmolove_sandbox, tmp_path, **settings), tmp_path)
    try:
        wait_for(
            lambda: mmolove_sandbox.accepted_count("registered") >= EVENTS,
            30,
            "the later process to deliver every event",
        )
        later = time.monotonic() - later_started
        time.sleep(0.2)
    finally:
        worker_output = stop_process(worker)
    assert worker.returncode == 0, worker_output
    pairs = [(str(n), token) for n, token in enumerate(tokens)]
    duplicates = assert_exactly_once(mmolove_sandbox, pairs, ["registered"])
    assert outbox.stats().delivered == EVENTS
    record_figures(
        f"8 exit ({down})",
        events=EVENTS,
        drain_timeout_s=DRAIN,
        exit_s=exit_time,
        left_in_flight=left.in_flight,
        later_process_delivered_all_s=later,
        duplicates=duplicates,
    )
    outbox.dispose()
