"""6. What ``db=`` costs a registration: the event in the portal's transaction.

The timed request is the player's ``POST /register`` on three Flask-SQLAlchemy portals
of the same shape, each with its own ``users`` table; the view adds the account and
flushes it, then:

- ``none``: no referral code at all, commits (the baseline);
- ``standalone``: ``MMOLove(app)``, its outbox in a database of its own (a second
  SQLite file; on PostgreSQL the same database under a table prefix, through the
  outbox's own engine): ``set_referee`` after the flush, commit; the extension writes
  ``registered`` in a transaction of its own when the request finishes;
- ``db``: ``MMOLove(app, db=db)``: ``set_referee`` after the flush writes the binding
  and ``registered`` in the portal's open transaction, which the view commits.

Both flask-mmolove portals deliver in ``worker`` mode, so nothing is sent during the
request and only the writes are timed. A visitor arrives with a fresh token each round
(``GET /register?mmref=...``, not timed). Rounds are interleaved; afterwards every
portal must hold one account per registration, and the two referral portals one
``registered`` event and one binding per registration.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_mmolove import MMOLove, referral_registered, set_referee
from flask_mmolove.sandbox.tokens import TokenMinter, derive_token_key

from .databases import postgres_url, sqlite_url, table_prefix
from .portals import SECRET_KEY
from .results import Result
from .stats import median, median_interval, percentile
from .timing import interleaved

NAME = "transaction"
TITLE = "Registration with the event in the portal's transaction (db=)"
GOAL_MS = 1.0
KINDS = ("none", "standalone", "db")
LABELS = {
    "none": "no referral code at all",
    "standalone": "MMOLove(app): its own outbox, written at request end",
    "db": "MMOLove(app, db=db): in the portal's transaction",
}


@dataclass
class Portal:
    kind: str
    app: Flask
    db: SQLAlchemy
    users: str
    ext: MMOLove | None
    #: The outbox's database and table prefix; None for the portal without one.
    outbox_url: str | None
    prefix: str


@dataclass(frozen=True)
class Where:
    portal_url: str
    #: The standalone outbox's database.
    outbox_url: str
    #: The outbox's table prefix.
    prefix: str
    users: str


def _portal(kind: str, where: Where, mmolove: dict[str, Any]) -> Portal:
    """A portal whose accounts live in ``where.portal_url``."""

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class User(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = where.users
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(80))

    app = Flask(f"{kind}_portal")
    app.config.update(SECRET_KEY=SECRET_KEY, SQLALCHEMY_DATABASE_URI=where.portal_url)
    db.init_app(app)
    ext: MMOLove | None = None
    if kind != "none":
        app.config.update(mmolove, MMOLOVE_DELIVERY="worker", MMOLOVE_TABLE_PREFIX=where.prefix)
        if kind == "standalone":
            app.config["MMOLOVE_DATABASE_URI"] = where.outbox_url
            ext = MMOLove(app)
        else:
            ext = MMOLove(app, db=db)
    with app.app_context():
        db.create_all()  # with db=, the outbox's tables too: they are in db.metadata

    def create_user() -> int:
        user = User(name=request.form.get("name", "player"))
        db.session.add(user)
        db.session.flush()
        return user.id

    if kind == "none":

        @app.route("/register", methods=["GET", "POST"])
        def register() -> Any:
            if request.method == "POST":
                create_user()
                db.session.commit()
                return "created", 201
            return "form"

    else:

        @app.route("/register", methods=["GET", "POST"])
        @referral_registered
        def register_referred() -> Any:
            if request.method == "POST":
                set_referee(create_user())  # the documented order: flush, set_referee,
                db.session.commit()  # commit
                return "created", 201
            return "form"

    outbox = {"none": None, "standalone": where.outbox_url, "db": where.portal_url}[kind]
    return Portal(kind, app, db, where.users, ext, outbox, where.prefix)


def _count(url: str, table: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(sa.table(table))
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def _measure(
    portals: dict[str, Portal], mint: Callable[[], str], rounds: int
) -> dict[str, list[float]]:
    def case(portal: Portal) -> Callable[[], float]:
        client = portal.app.test_client()

        def run_one() -> float:
            client.get(f"/register?mmref={mint()}")
            started = time.perf_counter()
            response = client.post("/register", data={"name": "ayla"})
            elapsed = (time.perf_counter() - started) * 1e3
            if response.status_code != 201:
                raise RuntimeError(f"POST /register answered {response.status_code}")
            return elapsed

        return run_one

    cases = {kind: case(portal) for kind, portal in portals.items()}
    for run_one in cases.values():  # warm-up: imports, connections, statement caches
        run_one()
    return interleaved(cases, rounds)


def _check(portals: dict[str, Portal], registrations: int) -> list[str]:
    """Every registration stored its account, and with flask-mmolove its binding and
    its ``registered`` event; the counts, or RuntimeError."""
    found: list[str] = []
    for kind, portal in portals.items():
        portal_url = portal.app.config["SQLALCHEMY_DATABASE_URI"]
        counts = {"users": _count(portal_url, portal.users)}
        if portal.outbox_url is not None:
            for table in ("events", "bindings"):
                counts[table] = _count(portal.outbox_url, f"{portal.prefix}{table}")
        wrong = {table: n for table, n in counts.items() if n != registrations}
        if wrong:
            raise RuntimeError(f"{kind}: {wrong} rows for {registrations} registrations")
        found.append(f"{kind} {'/'.join(str(n) for n in counts.values())}")
    return found


def _drop(portals: dict[str, Portal]) -> None:
    """Drop every table the run made: the SQLite files go with the temporary
    directory, but a PostgreSQL database is shared."""
    for portal in portals.values():
        if portal.ext is not None:
            portal.ext.shutdown(portal.app)
            if portal.kind == "standalone":
                outbox = portal.app.extensions["mmolove"].outbox
                outbox.drop_all()
                outbox.dispose()
        with portal.app.app_context():
            portal.db.drop_all()  # with db=, the outbox's tables too
            portal.db.engine.dispose()


def run(quick: bool) -> Result:
    rounds = 5 if quick else 500
    result = Result(NAME, TITLE, quick, params={"rounds": rounds, "goal_ms": GOAL_MS})
    secret = secrets.token_urlsafe(32)
    server_id = f"bench-{secrets.token_hex(3)}"
    minter = TokenMinter(derive_token_key(secret))
    mmolove = {
        "MMOLOVE_SERVER_ID": server_id,
        "MMOLOVE_REFERRAL_SECRET": secret,
        # Never reached: worker mode sends nothing from the request.
        "MMOLOVE_ENDPOINT": "http://127.0.0.1:9/api/referral/events",
    }
    with tempfile.TemporaryDirectory(prefix="mmolove-bench-") as workdir:
        # Each portal its own database (SQLite) or its own tables (PostgreSQL, shared).
        databases: dict[str, Callable[[str], Where]] = {
            "sqlite": lambda kind: Where(
                sqlite_url(workdir, f"{kind}.sqlite3"),
                sqlite_url(workdir, f"{kind}-outbox.sqlite3"),
                "mmolove_",
                "users",
            )
        }
        pg = postgres_url()
        if pg is not None:

            def on_postgres(kind: str) -> Where:
                prefix = table_prefix()
                return Where(pg, pg, prefix, f"{prefix}users")

            databases["postgres"] = on_postgres
        else:
            result.notes.append("PostgreSQL not reachable: its rows and goal are missing")
        for database, where in databases.items():
            portals: dict[str, Portal] = {}
            try:
                for kind in KINDS:
                    portals[kind] = _portal(kind, where(kind), mmolove)
                samples = _measure(portals, lambda: minter.mint(server_id, "friend"), rounds)
                counts = _check(portals, rounds + 1)
            finally:
                _drop(portals)
            _report(result, database, samples, rounds)
            result.notes.append(
                f"{database}: every registration stored its rows (users/events/bindings, "
                f"warm-up included): {', '.join(counts)}."
            )
    return result


def _paired(values: list[float], base: list[float]) -> tuple[float, float, float]:
    """The median of the per-round differences ``values - base``, and its 95% interval."""
    diffs = [v - b for v, b in zip(values, base, strict=True)]
    low, high = median_interval(diffs)
    return median(diffs), low, high


def _report(result: Result, database: str, samples: dict[str, list[float]], rounds: int) -> None:
    base = samples["none"]
    table = result.table(
        f"{database}: POST /register, ms ({rounds} interleaved rounds; paired: the median "
        "of the per-round differences from no referral code, with its 95% interval)",
        ["portal", "median", "p90", "median - none", "paired extra", "95% interval"],
    )
    for kind in KINDS:
        values = samples[kind]
        med, p90 = median(values), percentile(values, 0.9)
        key = f"{database}.{kind}"
        result.metric(f"{key}.median_ms", med)
        result.metric(f"{key}.p90_ms", p90)
        result.metric(f"{key}.extra_ms", med - median(base))
        if kind == "none":
            table.add(LABELS[kind], med, p90, 0.0, None, None)
            continue
        extra, low, high = _paired(values, base)
        result.metric(f"{key}.paired_extra_ms", extra)
        result.metric(f"{key}.paired_extra_ms_low", low)
        result.metric(f"{key}.paired_extra_ms_high", high)
        table.add(LABELS[kind], med, p90, med - median(base), extra, f"[{low:.3f}, {high:.3f}]")
    extra, low, high = _paired(samples["db"], base)
    # What db= costs against the standalone outbox it replaces (negative: it saves).
    versus, versus_low, versus_high = _paired(samples["db"], samples["standalone"])
    result.metric(f"{database}.db_vs_standalone.paired_extra_ms", versus)
    result.metric(f"{database}.db_vs_standalone.paired_extra_ms_low", versus_low)
    result.metric(f"{database}.db_vs_standalone.paired_extra_ms_high", versus_high)
    detail = (
        f"db= {extra:+.3f} ms [{low:.3f}, {high:.3f}] over no referral code; "
        f"{versus:+.3f} ms [{versus_low:.3f}, {versus_high:.3f}] over standalone"
    )
    # Judged on the interval: met when all of it lies under the goal, not met when all
    # of it lies at or above, otherwise the run cannot tell.
    met: bool | None = True if high < GOAL_MS else False if low >= GOAL_MS else None
    if met is None:
        detail += f"; not decided: the 95% interval reaches {high:.3f} ms"
    result.goal(
        f"{database}: db= adds under {GOAL_MS:g} ms to a registration (against no referral code)",
        met,
        detail,
    )
