"""Item 13: a canary secret never leaks.

Not in logs at DEBUG (every logger, tracebacks included), exception messages, reprs,
``flask mmolove`` output, the sandbox command's command line, rendered pages (the
portal's and the sandbox's), or the outbox (every row of every table, SQLite and
PostgreSQL). Two canaries: the right secret, and a wrong one a portal was given.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from portal import Recorder
from reliability_support import (
    HERE,
    dump_tables,
    outbox_of,
    qualify,
    record_figures,
    register,
    state,
)

from flask_mmolove import ConfigurationError, MMOLove, ReferralClient, referral_rejected
from flask_mmolove.protocol import SignatureError, build_body, sign_referral_body, verify_signature
from flask_mmolove.settings import DEFAULTS


class Leaks:
    """Everything a person or a log shipper could see, gathered as text."""

    def __init__(self, canaries: list[str]) -> None:
        self.canaries = canaries
        self.seen: dict[str, int] = {}

    def check(self, where: str, text: object) -> None:
        value = text.decode("latin-1") if isinstance(text, bytes) else str(text)
        for canary in self.canaries:
            assert canary not in value, f"the secret leaked in {where}"
        self.seen[where.split(":")[0]] = self.seen.get(where.split(":")[0], 0) + 1


@pytest.fixture
def canaries() -> list[str]:
    return ["canary-" + uuid.uuid4().hex, "wrongcanary-" + uuid.uuid4().hex]


@pytest.fixture
def all_logs() -> Iterator[list[str]]:
    """Every record of every logger at DEBUG, formatted with its traceback."""
    lines: list[str] = []
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    handler = Handler(logging.DEBUG)
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield lines
    root.removeHandler(handler)
    root.setLevel(old)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_the_secret_never_leaks(
    make_portal: Callable[..., Flask],
    mmolove_sandbox_factory: Callable[..., Any],
    canaries: list[str],
    all_logs: list[str],
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    secret, wrong = canaries
    leaks = Leaks(canaries)
    sandbox = mmolove_sandbox_factory(secret=secret)
    config: dict[str, Any] = {
        "MMOLOVE_ENDPOINT": sandbox.endpoint,
        "MMOLOVE_SERVER_ID": sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": secret,
    }
    if backend == "postgresql":
        prefix = request.getfixturevalue("table_prefix")
        config.update(
            MMOLOVE_DATABASE_URI=request.getfixturevalue("pg_uri"), MMOLOVE_TABLE_PREFIX=prefix
        )
    app = make_portal(**config)
    bad = make_portal(**{**config, "MMOLOVE_REFERRAL_SECRET": wrong})
    recorder = Recorder(app)
    try:
        exercise(app, bad, sandbox, leaks, all_logs, tmp_path, wrong)
        # The outbox: every row of every table in the SQLite file; on the shared
        # PostgreSQL database, every row of every table of this outbox.
        outbox = outbox_of(app)
        rows = dump_tables(outbox.engine, outbox.table_prefix if backend == "postgresql" else "")
        assert any(name.endswith("events") for name, _ in rows)
        for name, row in rows:
            leaks.check(f"outbox:{name}", repr(row))
            for value in row:
                if isinstance(value, bytes | memoryview):
                    leaks.check(f"outbox:{name}", bytes(value))
        leaks.check("logs", "\n".join(all_logs))
        assert len(recorder.credited) == 1
    finally:
        recorder.disconnect()
        if backend == "postgresql":
            outbox_of(app).drop_all()
    figures = {k.replace(" ", "_"): v for k, v in sorted(leaks.seen.items())}
    record_figures(
        f"13 canary ({backend})", log_records=len(all_logs), outbox_rows=len(rows), **figures
    )


def exercise(
    app: Flask,
    bad: Flask,
    sandbox: Any,
    leaks: Leaks,
    logs: list[str],
    tmp_path: Path,
    wrong: str,
) -> None:
    deliverer = state(app).deliverer
    client = app.test_client()
    # Pages of the portal, through a whole journey and its failures.
    token = sandbox.mint_token("friend")
    for path in (f"/page?mmref={token}", "/register", "/nowhere"):
        leaks.check("portal page", client.get(path).data)
    leaks.check("portal page", client.post("/register-callable", data={"id": "s1"}).data)
    sandbox.fail_next(1, status=503, retry_after=1)
    deliverer.run_once()
    sandbox.clear_faults()
    state(app).outbox.requeue([e.id for e in state(app).outbox.list_events()])
    deliverer.run_once()
    leaks.check("portal page", client.post("/play/s1").data)
    sandbox.drop_next(1)
    deliverer.run_once()
    state(app).outbox.requeue([e.id for e in state(app).outbox.list_events()])
    deliverer.run_once()
    register(app, sandbox.mint_token("x", server_id="elsewhere"), "s404")  # dead letter
    deliverer.run_once()
    register(bad, sandbox.mint_token("w"), "s401")  # the wrong secret: 401, kept
    state(bad).deliverer.run_once()
    qualify(app, "s404")
    # A MMOLove that echoes the secret in its answers (a misconfigured proxy, a
    # debug page): what it said is kept, and handed to signals, but not the secret.
    rejected: list[dict[str, Any]] = []

    def on_rejected(sender: Flask, **kw: Any) -> None:
        rejected.append(kw)

    referral_rejected.connect(on_rejected, sender=app)
    try:
        for status in (503, 404):
            echo = {"error": f"bad key {sandbox.secret!r} \\ {sandbox.secret}"}
            sandbox.fail_next(1, status=status, body=echo)
            register(app, sandbox.mint_token(f"echo{status}"), f"echo{status}")
            deliverer.run_once()
        sandbox.fail_next(1, status=502, body=f"<html>upstream said {sandbox.secret}</html>")
        register(app, sandbox.mint_token("echo502"), "echo502")
        deliverer.run_once()
    finally:
        referral_rejected.disconnect(on_rejected, sender=app)
    assert rejected
    leaks.check("signal", repr(rejected))

    # The command line, with both secrets.
    for target in (app, bad):
        runner = target.test_cli_runner()
        for args in (
            ["status"],
            ["ping"],
            ["retry", "--all"],
            ["retry", "1", "2", "3"],
            ["worker", "--burst"],
            ["sandbox", "--help"],
            ["--help"],
        ):
            result = runner.invoke(args=["mmolove", *args])
            leaks.check(f"flask mmolove {args[0]}", result.output)
            if result.exception is not None:
                leaks.check("exception", repr(result.exception))

    # Reprs and strings of everything the extension and the sandbox hand out.
    for target in (app, bad):
        ext = state(target)
        for thing in (
            ext,
            ext.settings,
            ext.deliverer,
            ext.deliverer.client,
            ext.outbox,
            ext.background,
            *ext.outbox.list_events(limit=50),
        ):
            leaks.check("repr", repr(thing))
            leaks.check("repr", str(thing))
    with ReferralClient(sandbox.server_id, sandbox.secret, sandbox.endpoint) as direct:
        result = direct.registered(sandbox.mint_token(), referee_identity="d", server_event_id="d")
        leaks.check("repr", repr(result))
        leaks.check("repr", repr(direct))
    # (Not the records of scripted faults: they hold the answer this test told the
    # sandbox to give, secret included; the sandbox's pages scrub them, see below.)
    records = [r for r in sandbox.events if r.fault != "status"]
    for thing in (sandbox, sandbox.state, *records, *sandbox.referrals.values()):
        leaks.check("repr", repr(thing))

    # Exception messages on every path that holds the secret.
    errors: list[BaseException] = []
    for key in DEFAULTS:
        if key in ("MMOLOVE_ENABLED", "MMOLOVE_REFERRAL_SECRET", "MMOLOVE_TEST_MODE"):
            continue
        broken = Flask(__name__, instance_path=str(tmp_path / "instance"))
        broken.config.update({"MMOLOVE_SERVER_ID": "srv", "MMOLOVE_REFERRAL_SECRET": wrong})
        broken.config[key] = object()
        try:
            MMOLove().init_app(broken)
        except (ConfigurationError, ValueError, TypeError) as exc:
            errors.append(exc)
    attempts: list[Callable[[], object]] = [
        lambda: ReferralClient("srv", wrong, "ftp://nowhere"),
        lambda: ReferralClient("srv", wrong, key_id="bad kid"),
        lambda: sign_referral_body(wrong, b"{}", key_id="no spaces allowed"),
        lambda: sign_referral_body(wrong, "text", 5),  # type: ignore[arg-type]
        lambda: verify_signature(wrong, b"{}", sign_referral_body(secret_of(sandbox), b"{}")),
        lambda: verify_signature([wrong, secret_of(sandbox)], b"{x}", "t=1,v1=sha256=" + "0" * 64),
        lambda: ReferralClient("srv", wrong, "http://127.0.0.1:9/api").send_body(
            build_body(
                "registered", token="t", server_id="s", server_event_id="e", referee_identity="i"
            )
        ),
    ]
    for attempt in attempts:
        try:
            attempt()
        except (ValueError, TypeError, RuntimeError, SignatureError) as exc:
            errors.append(exc)
    assert len(errors) >= len(attempts)
    for exc in errors:
        leaks.check("exception", str(exc))
        leaks.check("exception", repr(exc))

    # The sandbox's pages.
    for path in (
        "/",
        "/log",
        "/log.json",
        "/_state",
        "/_faults",
        "/nowhere",
        f"/r/{sandbox.server_id}?ref=z",
    ):
        page = requests.get(sandbox.url + path, timeout=5, allow_redirects=False)
        leaks.check("sandbox page", page.content)
        leaks.check("sandbox page", repr(dict(page.headers)))

    # `flask mmolove sandbox`: the secret goes by the environment, not the command line.
    env = {
        "FLASK_APP": str(HERE / "procapp.py"),
        "MMOLOVE_SERVER_ID": sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": wrong,
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flask",
            "mmolove",
            "sandbox",
            "--registration-url",
            "http://p/r",
            "--port",
            "0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        first = [proc.stdout.readline() for _ in range(3)]
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        leaks.check("sandbox command line", cmdline)
        base = next(
            word for line in first for word in line.split() if word.startswith("http://127")
        )
        base = base.split("/api/")[0]
        leaks.check("sandbox page", requests.get(base + "/log", timeout=5).content)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    leaks.check("flask mmolove sandbox", "".join(first) + output)
    assert any("wrong secret or clock drift" in line for line in logs)


def secret_of(sandbox: Any) -> str:
    return str(sandbox.secret)
