"""Item 7: forks. A child never inherits a held lock or a parent's connection, and
gunicorn ``--preload`` workers in thread mode deliver every worker's events."""

from __future__ import annotations

import contextlib
import faulthandler
import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from reliability_support import (
    HERE,
    assert_exactly_once,
    journal,
    open_outbox,
    outbox_of,
    process_env,
    record_figures,
    register,
    state,
)
from support import wait_for

from flask_mmolove.outbox import Outbox, make_engine
from flask_mmolove.outbox.forks import SQLiteForkGuard


def fork_and_run(child: Callable[[], bool], timeout: float = 20.0) -> int:
    """Run ``child`` in a forked process; its exit status (0: it returned True).

    A child that hangs (a lock inherited held) is killed after ``timeout`` s and the
    status says so (-SIGKILL)."""
    with warnings.catch_warnings():
        # Python 3.12+ warns on fork() with threads alive; forking is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        # Where it hangs, if it does: every thread's stack on stderr before the kill.
        faulthandler.dump_traceback_later(max(1.0, timeout - 1.0))
        try:
            code = 0 if child() else 3
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


def sandbox_accepted(sandbox_url: str) -> dict[str, int]:
    """The sandbox's counters over HTTP, as another process sees them."""
    return dict(requests.get(f"{sandbox_url}/_state", timeout=5).json()["accepted"])


def test_child_forked_while_the_lock_is_held_still_delivers(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    app = make_portal(MMOLOVE_DELIVERY="thread")
    background = state(app).background
    register(app, mmolove_sandbox.mint_token("parent"), "parent")
    wait_for(lambda: mmolove_sandbox.accepted_count("registered") == 1, 10, "parent event")
    assert background.running
    parent_owner = state(app).deliverer.owner
    child_token = mmolove_sandbox.mint_token("child")
    url = mmolove_sandbox.url

    def child() -> bool:
        # Starting the thread needs the lock the parent held at the fork.
        assert not background.running, "the parent's thread does not exist here"
        assert state(app).deliverer.owner != parent_owner
        register(app, child_token, "child")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sandbox_accepted(url).get("registered") == 2:
                return True
            time.sleep(0.05)
        return False

    # Another thread of the parent is inside the lock when the fork happens.
    with background._lock:
        status = fork_and_run(child)
    assert status == 0, f"child exit status {status} (-9: it hung on an inherited lock)"
    assert mmolove_sandbox.accepted_count("registered") == 2
    # The parent is unharmed: its thread still runs and delivers.
    register(app, mmolove_sandbox.mint_token("after"), "after")
    wait_for(lambda: mmolove_sandbox.accepted_count("registered") == 3, 10, "parent again")


def test_a_fork_waits_until_no_sqlite_transaction_is_open(tmp_path: Path) -> None:
    # SQLite's lock table is per process: a child forked while a parent thread is in
    # a write transaction would wait on its lock forever (here: fail after the 2 s
    # busy timeout), or read a half-written index ("disk I/O error").
    outbox = Outbox(make_engine(f"sqlite:///{tmp_path / 'outbox.sqlite3'}?timeout=2"))
    outbox.create_all()
    first = enqueue(outbox, "first")
    inside, release = threading.Event(), threading.Event()

    def pause_in_the_claim(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The claim's UPDATE runs under the write lock, which it keeps until COMMIT.
        if statement.startswith("UPDATE") and not inside.is_set():
            inside.set()
            release.wait(10)

    sa.event.listen(outbox.engine, "before_cursor_execute", pause_in_the_claim)
    claimer = threading.Thread(target=outbox.claim, args=("parent",), kwargs=LEASE)
    claimer.start()
    assert inside.wait(5)
    # The fork below waits for the claim; the child then has the database to itself.
    threading.Timer(0.3, release.set).start()

    def child() -> bool:
        return outbox.get(enqueue(outbox, "child")) is not None

    try:
        status = fork_and_run(child)
    finally:
        release.set()
        claimer.join(10)
    assert status == 0, f"child exit status {status}"
    # The parent's claim went through, the child's event is in the same file, and the
    # parent goes on as before.
    assert [(e.id == first, e.lease_owner) for e in outbox.list_events()] == [
        (False, None),
        (True, "parent"),
    ]
    assert enqueue(outbox, "after")
    outbox.dispose()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_child_that_skips_dispose_gets_a_fresh_connection(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # make_engine asks a forked child to call engine.dispose(close=False); one that
    # does not must still never talk through its parent's pooled connection (on
    # PostgreSQL: the parent's server session, over the parent's socket). A TEMP
    # table lives in one connection's session, so it tells whose session a query ran in.
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'pool.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_uri")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TEMP TABLE parents_session (x INTEGER)")
            conn.commit()
            parents = conn.connection.dbapi_connection
        # The connection is back in the pool, where the child finds it too.

        def child() -> bool:
            with engine.connect() as conn:
                assert "parents_session" not in sa.inspect(conn).get_temp_table_names()
                assert conn.connection.dbapi_connection is not parents
                return conn.execute(sa.select(sa.literal(1))).scalar_one() == 1

        assert fork_and_run(child) == 0
        # The child neither used nor closed the parent's connection: still the same
        # session, and it still works.
        with engine.connect() as conn:
            assert sa.inspect(conn).get_temp_table_names() == ["parents_session"]
            assert conn.connection.dbapi_connection is parents
            assert conn.execute(sa.select(sa.literal(1))).scalar_one() == 1
    finally:
        engine.dispose()


LEASE = {"limit": 10, "lease": 30.0}


def enqueue(outbox: Outbox, name: str) -> int:
    return outbox.enqueue(
        event="registered",
        token=f"token-{name}",
        identity=name,
        server_event_id=f"reg-{name}",
        body=b"{}",
    )


class KeepAliveMMOLove:
    """A minimal MMOLove that keeps connections open (HTTP/1.1), like a real server
    behind a load balancer, and records the client port of every request."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.ports.append(self.client_address[1])
                body = b'{"ok":true,"referral_id":"ref_1","state":"registered"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/api/referral/events"

    def __enter__(self) -> KeepAliveMMOLove:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_child_never_shares_the_parents_connection(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    """The parent keeps a pooled keep-alive connection to MMOLove; a forked child that
    used it would interleave its requests with the parent's on one socket."""
    with KeepAliveMMOLove() as mmolove:
        app = make_portal(MMOLOVE_DELIVERY="inline", MMOLOVE_ENDPOINT=mmolove.endpoint)
        register(app, mmolove_sandbox.mint_token("p1"), "p1")
        register(app, mmolove_sandbox.mint_token("p2"), "p2")
        assert len(mmolove.ports) == 2
        parent_port = mmolove.ports[0]
        assert mmolove.ports[1] == parent_port, "the parent reuses its connection"
        child_token = mmolove_sandbox.mint_token("c1")

        def child() -> bool:
            register(app, child_token, "c1")
            return True

        assert fork_and_run(child) == 0
        assert len(mmolove.ports) == 3
        assert mmolove.ports[2] != parent_port, "the child sent on the parent's socket"
        register(app, mmolove_sandbox.mint_token("p3"), "p3")
        assert len(mmolove.ports) == 4
        assert outbox_of(app).stats().delivered == 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def gunicorn(env: dict[str, str], cwd: Path, workers: int) -> Iterator[tuple[str, int]]:
    """gunicorn --preload with ``workers`` sync workers; yields (base URL, master pid)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "--workers",
            str(workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--chdir",
            str(HERE),
            "--graceful-timeout",
            "10",
            "procapp:app",
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            if proc.poll() is not None:
                output = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"gunicorn exited {proc.returncode}: {output}")
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"{base}/pid", timeout=1).ok
            return False

        wait_for(up, 30, "gunicorn to serve")
        yield base, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode not in (0, None):
            print(output)


@pytest.mark.slow
def test_gunicorn_preload_workers_deliver_every_workers_events(
    mmolove_sandbox: Any, tmp_path: Path
) -> None:
    if importlib.util.find_spec("gunicorn") is None:
        if os.environ.get("MMOLOVE_REQUIRE_ALL_TESTS"):
            pytest.fail("gunicorn (a test dependency) must be installed in CI")
        pytest.skip("gunicorn is not installed")
    workers = 3
    db = tmp_path / "outbox.sqlite3"
    env = process_env(
        mmolove_sandbox,
        tmp_path,
        MMOLOVE_DATABASE_URI=f"sqlite:///{db}",
        MMOLOVE_DELIVERY="thread",
        MMOLOVE_POLL_INTERVAL=0.5,
        MMOLOVE_RETRY_BASE=0.05,
        MMOLOVE_RETRY_CAP=0.2,
    )
    served: dict[int, list[str]] = {}
    lock = threading.Lock()
    tokens: dict[str, str] = {}
    started = time.monotonic()
    with gunicorn(env, tmp_path, workers) as (base, master):

        def sign_up(n: int) -> None:
            identity = f"g{n}"
            token = mmolove_sandbox.mint_token(f"friend{n % 3}")
            with requests.Session() as browser:
                page = browser.get(f"{base}/register?mmref={token}", timeout=10)
                assert page.json()["mmref"] == token
                done = browser.post(f"{base}/register", data={"id": identity}, timeout=10)
                assert done.status_code == 201, done.text
            with lock:
                tokens[identity] = token
                served.setdefault(done.json()["pid"], []).append(identity)

        n = 0
        with ThreadPoolExecutor(max_workers=6) as pool:
            while n < 300 and (len(served) < workers or n < 60):
                list(pool.map(sign_up, range(n, n + 12)))
                n += 12
        assert len(served) == workers, f"requests reached {len(served)} of {workers} workers"
        assert master not in served
        wait_for(
            lambda: mmolove_sandbox.accepted_count("registered") >= n,
            30,
            "every worker's events delivered",
        )
        delivered_at = time.monotonic() - started
        time.sleep(0.3)
    pairs = sorted(tokens.items())
    duplicates = assert_exactly_once(mmolove_sandbox, pairs, ["registered"])
    outbox = open_outbox(f"sqlite:///{db}")
    assert outbox.stats().delivered == n
    outbox.dispose()
    delivering = {int(pid) for pid, signal_name, _ in journal(tmp_path / "journal.txt")}
    # Deliveries happened in the workers (their own threads), never in the master.
    assert delivering <= set(served)
    assert master not in delivering
    by_worker = {pid: len(ids) for pid, ids in served.items()}
    record_figures(
        "7 gunicorn --preload",
        workers=workers,
        events=n,
        events_per_worker=json.dumps(sorted(by_worker.values())),
        delivering_workers=len(delivering),
        duplicates=duplicates,
        all_delivered_s=delivered_at,
    )


def test_fork_resets_every_deliverer_not_only_thread_mode(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any
) -> None:
    """Worker and inline deliverers are forked too (a --preload master that ran a
    pass); they must not keep the parent's lease owner."""
    app = make_portal(MMOLOVE_DELIVERY="inline")
    register(app, mmolove_sandbox.mint_token("p"), "p")
    assert mmolove_sandbox.accepted_count("registered") == 1
    parent_owner = state(app).deliverer.owner
    child_token = mmolove_sandbox.mint_token("c")
    url = mmolove_sandbox.url

    def child() -> bool:
        assert state(app).deliverer.owner != parent_owner
        register(app, child_token, "c")
        return sandbox_accepted(url).get("registered") == 2

    assert fork_and_run(child) == 0
    assert outbox_of(app).stats().delivered == 2


def test_a_pending_fork_lets_an_open_transaction_nest_and_finish() -> None:
    # The fork waits for the thread's transaction; were a nested one made to wait for
    # the fork, neither would ever finish.
    guard = SQLiteForkGuard()
    inside, nested = threading.Event(), threading.Event()

    def transaction() -> None:
        with guard.transaction():
            inside.set()
            deadline = time.monotonic() + 5
            while not guard._forking and time.monotonic() < deadline:
                time.sleep(0.01)
            with guard.transaction():
                nested.set()

    def fork_hooks() -> None:
        guard._before_fork()
        guard._after_fork_in_parent()

    worker = threading.Thread(target=transaction, daemon=True)
    worker.start()
    assert inside.wait(5)
    forker = threading.Thread(target=fork_hooks, daemon=True)
    forker.start()
    worker.join(10)
    forker.join(10)
    assert nested.is_set()
    assert not worker.is_alive()
    assert not forker.is_alive()
