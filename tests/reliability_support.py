"""Helpers shared by the reliability tests: figures, enqueueing, counting what arrived."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask

from flask_mmolove.outbox import Outbox, make_engine
from flask_mmolove.protocol import build_body

#: tests/, where these helpers and procapp.py (the portal run as a separate process) live.
HERE = Path(__file__).resolve().parent
#: (test name, figures) in the order measured; printed at the end of the run.
FIGURES: list[tuple[str, dict[str, Any]]] = []


def record_figures(name: str, **figures: Any) -> None:
    """Keep what a test measured, for the summary and docs/reliability.md."""
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    FIGURES.append((name, rounded))
    print(f"\n[figures] {name}: {rounded}")


def register(app: Flask, token: str, identity: str) -> None:
    """A player arrives with ?mmref= and creates an account, through the portal's views."""
    client = app.test_client()
    assert client.get(f"/page?mmref={token}").status_code == 200
    response = client.post("/register-callable", data={"id": identity})
    assert response.status_code == 201, response.data


def qualify(app: Flask, identity: str) -> None:
    """The player reaches the milestone, in a request, as the README shows."""
    assert app.test_client().post(f"/play/{identity}").status_code == 200


def state(app: Flask) -> Any:
    return app.extensions["mmolove"]


def outbox_of(app: Flask) -> Outbox:
    outbox = state(app).outbox
    assert outbox is not None
    return outbox


def open_outbox(uri: str, prefix: str = "mmolove_") -> Outbox:
    """The outbox as another process sees it: its own engine on the same database."""
    outbox = Outbox(make_engine(uri), table_prefix=prefix)
    outbox.create_all()
    return outbox


def enqueue_pairs(
    outbox: Outbox, sandbox: Any, n: int, *, qualified: bool = True, prefix: str = "p"
) -> list[tuple[str, str]]:
    """Enqueue ``registered`` (and ``qualified``) for ``n`` fresh referees, interleaved
    as a backlog is after an outage; returns (identity, token) pairs."""
    pairs = []
    for i in range(n):
        identity = f"{prefix}{i}"
        token = sandbox.mint_token(f"friend{i % 7}")
        outbox.bind_and_enqueue(
            identity=identity,
            token=token,
            event="registered",
            server_event_id=f"reg-{identity}",
            body=build_body(
                "registered",
                token=token,
                server_id=sandbox.server_id,
                server_event_id=f"reg-{identity}",
                referee_identity=identity,
            ),
        )
        if qualified:
            outbox.enqueue(
                event="qualified",
                token=token,
                identity=identity,
                server_event_id=f"qual-{identity}",
                body=build_body(
                    "qualified",
                    token=token,
                    server_id=sandbox.server_id,
                    server_event_id=f"qual-{identity}",
                ),
            )
        pairs.append((identity, token))
    return pairs


def posts_per_key(sandbox: Any) -> Counter[tuple[str, str]]:
    """Accepted POSTs (first acceptance plus duplicates) per (token, event)."""
    counts: Counter[tuple[str, str]] = Counter()
    for record in sandbox.events:
        if record.status == 200 and record.verdict != "test" and record.token and record.event:
            counts[record.token, record.event] += 1
        elif record.status is None and record.committed and record.token and record.event:
            # Written, but the answer was dropped: the sender saw no acceptance.
            counts[record.token, record.event] += 1
    return counts


def assert_exactly_once(
    sandbox: Any, pairs: Sequence[tuple[str, str]], events: Iterable[str]
) -> int:
    """Every (token, event) was accepted exactly once; returns duplicate POSTs sent."""
    events = list(events)
    for event in events:
        assert sandbox.accepted_count(event) == len(pairs), event
    accepted_keys = {(r.token, r.event) for r in sandbox.events if r.committed}
    expected = {(token, event) for _, token in pairs for event in events}
    assert accepted_keys == expected
    duplicates = 0
    for _, token in pairs:
        for event in events:
            posts = sandbox.accepted_posts(token, event)
            assert posts >= 1
            duplicates += posts - 1
    return duplicates


def dump_tables(engine: sa.Engine, prefix: str = "") -> list[tuple[str, tuple[Any, ...]]]:
    """Every row of every table in the database (whose name starts with ``prefix``)."""
    rows: list[tuple[str, tuple[Any, ...]]] = []
    metadata = sa.MetaData()
    metadata.reflect(engine, only=lambda name, _: name.startswith(prefix))
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                rows.append((table.name, tuple(row)))
    return rows


def process_env(sandbox: Any, tmp_path: Path, **portal: Any) -> dict[str, str]:
    """Environment for a portal process (procapp.py): credentials and PORTAL_* settings."""
    import json

    env = {
        **os.environ,
        "FLASK_APP": str(HERE / "procapp.py"),
        "MMOLOVE_ENDPOINT": sandbox.endpoint,
        "MMOLOVE_SERVER_ID": sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": sandbox.secret,
        "PYTHONUNBUFFERED": "1",
        "PORTAL_JOURNAL": str(tmp_path / "journal.txt"),
    }
    for key, value in portal.items():
        env[f"PORTAL_{key}"] = json.dumps(value)
    return env


def start_worker(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen[str]:
    """A real ``flask mmolove worker`` process."""
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "mmolove", "worker", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_process(proc: subprocess.Popen[str], timeout: float = 15.0) -> str:
    """SIGTERM, wait, and return the output (SIGKILL if it will not stop)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    return output or ""


def journal(path: Path) -> list[list[str]]:
    """Lines a portal process appended on each signal: pid, signal, identity."""
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def wallclock_shift() -> str | None:
    """tests/native/wallclock_shift.c built as a shared library (once per source), or
    None without a C compiler."""
    import hashlib
    import shutil
    import tempfile

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = HERE / "native" / "wallclock_shift.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    library = Path(tempfile.gettempdir()) / f"mmolove-wallclock-shift-{digest}.so"
    if not library.exists():
        # Built beside its final name, then renamed: parallel test workers never see
        # half a library.
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(partial), str(source), "-ldl"],
            check=True,
            capture_output=True,
        )
        os.replace(partial, library)
    return str(library)


def skewed(env: dict[str, str], seconds: float) -> dict[str, str]:
    """``env`` for a process whose wall clock reads ``seconds`` ahead (behind if
    negative) of the machine's, as on a host whose clock has drifted.

    Monotonic clocks are left alone: a drifted host's timers still run true.
    """
    library = wallclock_shift()
    if library is None:
        raise RuntimeError("a C compiler is needed to build tests/native/wallclock_shift.c")
    preload = " ".join(x for x in (library, env.get("LD_PRELOAD", "")) if x)
    return {**env, "LD_PRELOAD": preload, "WALLCLOCK_SHIFT_SECONDS": f"{seconds:g}"}


def concurrent_posts(sandbox: Any) -> list[tuple[str, str]]:
    """(token, event) of every pair of real POSTs of one event that MMOLove had in hand
    at once: each request spans its arrival to its answer (``received`` to ``time``)."""
    spans: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for record in sandbox.events:
        if record.token and record.event and record.verdict != "test":
            start = record.received if record.received is not None else record.time
            spans.setdefault((record.token, record.event), []).append((start, record.time))
    overlapping = []
    for key, intervals in spans.items():
        latest_end = float("-inf")
        for start, end in sorted(intervals):
            if start < latest_end:
                overlapping.append(key)
            latest_end = max(latest_end, end)
    return overlapping
