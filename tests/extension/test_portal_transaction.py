"""``MMOLove(app, db=db)``: the referral commits with the account, in the portal's transaction.

A Flask-SQLAlchemy portal on SQLite (and PostgreSQL where marked), delivering inline to
a live sandbox: each test states what a portal relies on. The event exists if and only
if the portal commits; outbox trouble is the portal's trouble; the token is let go
only once its event is committed; a milestone in the registration request counts.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, g, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support import wait_for

from flask_mmolove import (
    MMOLove,
    OutboxError,
    player_qualified,
    referral_registered,
    referrer_credited,
    set_referee,
)


def build(
    config: dict[str, Any], database_uri: str, *, create: bool = True
) -> tuple[Flask, SQLAlchemy, MMOLove, type]:
    """A portal whose accounts live in ``database_uri``, with the outbox in the same
    transaction. Its views follow the documented order, or another the form asks for."""

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class User(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(80), unique=True)
        level: Mapped[int] = mapped_column(default=1)

    class Grant(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "grants"
        referee: Mapped[str] = mapped_column(sa.String(80), primary_key=True)

    app = Flask(__name__)
    config = {k: v for k, v in config.items() if k != "MMOLOVE_DATABASE_URI"}
    app.config.update(SECRET_KEY="db-mode", SQLALCHEMY_DATABASE_URI=database_uri, **config)
    db.init_app(app)
    ext = MMOLove(app, db=db)
    with app.app_context():
        db.drop_all()
        if create:
            db.create_all()
        else:
            db.metadata.create_all(db.engine, tables=[User.__table__, Grant.__table__])

    @app.route("/register", methods=["GET", "POST"])
    @referral_registered
    def register() -> Any:
        if request.method == "GET":
            return {"mmref": g.mmref}
        order = request.form.get("order", "atomic")
        user = User(name=request.form["name"])
        db.session.add(user)
        if order == "commit-first":
            db.session.commit()
            set_referee(user.id)
            if request.form.get("play"):
                player_qualified.send(app, identity=str(user.id))
            return "created", 201
        db.session.flush()
        if order == "close":
            # The portal throws its unit of work away and starts another.
            set_referee(user.id)
            db.session.close()
            db.session.add(User(name="audit-" + request.form["name"]))
            db.session.commit()
            return "nothing kept", 200
        if order == "savepoint-rollback":
            # The portal undoes a part of its work, the referral with it.
            savepoint = db.session.begin_nested()
            set_referee(user.id)
            savepoint.rollback()
            db.session.commit()
            return "created, unreferred", 201
        set_referee(user.id)
        if request.form.get("play"):
            # The milestone reached in the registration request itself.
            player_qualified.send(app, identity=str(user.id))
        if request.form.get("savepoint"):
            # Some get-or-create in a savepoint, released: not the portal's commit.
            with db.session.begin_nested():
                db.session.add(Grant(referee="audit-" + request.form["name"]))
        if order == "rollback":
            db.session.rollback()
            return "name refused", 200
        db.session.commit()
        return "created", 201

    @app.post("/play/<int:user_id>")
    def play(user_id: int) -> Any:
        user = db.session.get(User, user_id)
        assert user is not None
        user.level += 1
        if request.form.get("commit", "yes") == "first":
            db.session.commit()
        player_qualified.send(app, identity=str(user_id))
        if request.form.get("savepoint"):
            with db.session.begin_nested():
                db.session.add(Grant(referee=f"level-{user_id}-{user.level}"))
        if request.form.get("commit", "yes") == "yes":
            db.session.commit()
        return request.form.get("answer", "level up"), int(request.form.get("status", 200))

    app.config["USER_MODEL"] = User
    app.config["GRANT_MODEL"] = Grant
    return app, db, ext, User


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'portal.sqlite3'}"
    return str(request.getfixturevalue("pg_uri"))


@pytest.fixture
def portal(
    portal_config: dict[str, Any], database_uri: str
) -> Iterator[Callable[..., tuple[Flask, SQLAlchemy, type]]]:
    made: list[tuple[Flask, SQLAlchemy, MMOLove]] = []

    def factory(**overrides: Any) -> tuple[Flask, SQLAlchemy, type]:
        create = overrides.pop("create", True)
        app, db, ext, user = build({**portal_config, **overrides}, database_uri, create=create)
        made.append((app, db, ext))
        return app, db, user

    yield factory
    for app, db, ext in made:
        ext.shutdown(app)
        with app.app_context():
            db.drop_all()
            db.engine.dispose()


def stored(app: Flask) -> list[str]:
    rows = app.extensions["mmolove"].outbox.list_events(limit=100)
    return [row.event for row in sorted(rows, key=lambda row: row.id)]


def accounts(app: Flask, db: SQLAlchemy, user: type) -> list[str]:
    with app.app_context():
        return [u.name for u in db.session.scalars(sa.select(user))]


def test_the_outbox_tables_are_the_portals_own(portal: Any) -> None:
    app, db, _ = portal()
    names = {"mmolove_events", "mmolove_bindings", "mmolove_credits"}
    # Declared in the portal's metadata: its create_all and its migrations own them.
    assert names <= set(db.metadata.tables)
    with app.app_context():
        assert names <= set(sa.inspect(db.engine).get_table_names())


def test_missing_tables_are_named_with_how_to_create_them(
    portal: Any, mmolove_sandbox: Any
) -> None:
    # init_app created nothing behind the portal's back.
    app, _, _ = portal(create=False, PROPAGATE_EXCEPTIONS=True)
    client = app.test_client()
    client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
    with pytest.raises(OutboxError, match=r"flask db migrate.*db\.create_all\(\)"):
        client.post("/register", data={"name": "ayla"})


def test_the_documented_order_commits_the_event_with_the_account(
    portal: Any, mmolove_sandbox: Any
) -> None:
    app, db, user = portal()
    client = app.test_client()
    client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
    assert client.post("/register", data={"name": "ayla"}).status_code == 201
    assert accounts(app, db, user) == ["ayla"]
    assert stored(app) == ["registered"]
    assert [(r.event, r.verdict) for r in mmolove_sandbox.events] == [("registered", "advanced")]
    # Let go once committed: the next page has no token pending.
    assert client.get("/register").json == {"mmref": None}


def test_a_rollback_after_set_referee_cancels_the_event_and_keeps_the_token(
    portal: Any, mmolove_sandbox: Any
) -> None:
    app, db, user = portal()
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    client.get(f"/register?mmref={token}")
    assert client.post("/register", data={"name": "ayla", "order": "rollback"}).status_code == 200
    assert accounts(app, db, user) == []
    assert stored(app) == []
    assert mmolove_sandbox.events == []
    assert client.get("/register").json == {"mmref": token}
    # The player tries again: that account is referred.
    assert client.post("/register", data={"name": "ayla"}).status_code == 201
    assert mmolove_sandbox.accepted_count("registered") == 1


def test_a_rolled_back_savepoint_cancels_the_event_made_in_it(
    portal: Any, mmolove_sandbox: Any
) -> None:
    app, db, user = portal()
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    client.get(f"/register?mmref={token}")
    response = client.post("/register", data={"name": "ayla", "order": "savepoint-rollback"})
    assert response.status_code == 201
    assert accounts(app, db, user) == ["ayla"]
    assert stored(app) == []
    assert mmolove_sandbox.events == []
    # What was cancelled did not let the token go.
    assert client.get("/register").json == {"mmref": token}


def test_a_session_closed_after_set_referee_drops_the_event_for_good(
    portal: Any, mmolove_sandbox: Any
) -> None:
    app, db, user = portal()
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    client.get(f"/register?mmref={token}")
    assert client.post("/register", data={"name": "ayla", "order": "close"}).status_code == 200
    assert accounts(app, db, user) == ["audit-ayla"]
    assert stored(app) == []
    # The next commit of that session was another unit of work: the token stays.
    assert client.get("/register").json == {"mmref": token}


def test_a_portal_that_commits_first_still_gets_its_event_by_the_end_of_the_request(
    portal: Any, mmolove_sandbox: Any
) -> None:
    app, _, _ = portal()
    client = app.test_client()
    client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
    response = client.post("/register", data={"name": "ayla", "order": "commit-first"})
    assert response.status_code == 201
    assert stored(app) == ["registered"]
    assert mmolove_sandbox.accepted_count("registered") == 1
    assert client.get("/register").json == {"mmref": None}


def test_a_milestone_in_the_registration_request_is_credited_once(
    portal: Any, mmolove_sandbox: Any
) -> None:
    app, _, _ = portal()
    credited: list[str] = []

    @referrer_credited.connect_via(app)
    def grant(sender: Flask, identity: str, **extra: Any) -> None:
        credited.append(identity)

    client = app.test_client()
    client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
    assert client.post("/register", data={"name": "ayla", "play": "1"}).status_code == 201
    assert stored(app) == ["registered", "qualified"]
    assert mmolove_sandbox.accepted_count("qualified") == 1
    assert len(credited) == 1


def test_a_milestone_after_the_portals_commit_is_committed_by_the_end_of_the_request(
    portal: Any, mmolove_sandbox: Any
) -> None:
    app, _, _ = portal()
    client = app.test_client()
    client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
    client.post("/register", data={"name": "ayla"})
    user_id = app.extensions["mmolove"].outbox.list_events()[0].identity
    # The portal commits its level-up, then the milestone's write waits in a new
    # transaction nobody commits: the end of the successful request does.
    assert client.post(f"/play/{user_id}", data={"commit": "no"}).status_code == 200
    assert stored(app) == ["registered", "qualified"]
    assert mmolove_sandbox.accepted_count("qualified") == 1


def test_a_failing_outbox_fails_the_portals_write_no_account_without_its_event(
    portal: Any, mmolove_sandbox: Any
) -> None:
    app, db, user = portal(PROPAGATE_EXCEPTIONS=True)
    with app.app_context():
        # The outbox's events table is gone (a bad migration): the write fails.
        db.session.execute(sa.text("DROP TABLE mmolove_events"))
        db.session.commit()
    client = app.test_client()
    client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
    with pytest.raises(OutboxError):
        client.post("/register", data={"name": "ayla"})
    assert accounts(app, db, user) == []


def test_credits_granted_through_the_session_commit_with_their_record(
    portal: Any, mmolove_sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app, db, _ = portal()
    grant_model = app.config["GRANT_MODEL"]
    failures = {"left": 1}

    @referrer_credited.connect_via(app)
    def grant(sender: Flask, identity: str, **extra: Any) -> None:
        db.session.add(grant_model(referee=identity))
        db.session.flush()
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the game server did not answer")

    client = app.test_client()
    client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
    with caplog.at_level(logging.ERROR, logger="flask_mmolove"):
        client.post("/register", data={"name": "ayla", "play": "1"})
    # The receiver failed after its flush: the grant went with the rollback.
    with app.app_context():
        assert db.session.scalars(sa.select(grant_model)).all() == []
        credits = db.session.execute(sa.text("SELECT notified_at FROM mmolove_credits")).all()
        assert len(credits) == 1
        assert credits[0][0] is None
        db.session.execute(sa.text("UPDATE mmolove_credits SET next_attempt_at = 0"))
        db.session.commit()
    app.extensions["mmolove"].deliverer.notify_credits()
    app.extensions["mmolove"].deliverer.notify_credits()
    with app.app_context():
        assert [g.referee for g in db.session.scalars(sa.select(grant_model))] == ["1"]
        notified = db.session.execute(sa.text("SELECT notified_at FROM mmolove_credits")).all()
        assert notified[0][0] is not None


def test_a_full_or_failing_outbox_at_the_write_leaves_no_account(
    portal: Any, mmolove_sandbox: Any, database_uri: str
) -> None:
    app, db, user = portal(PROPAGATE_EXCEPTIONS=True)
    with app.app_context():
        # The database refuses the event's row, as a full disk or a broken replica would.
        if database_uri.startswith("sqlite"):
            db.session.execute(
                sa.text(
                    "CREATE TRIGGER outbox_full BEFORE INSERT ON mmolove_events "
                    "BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END"
                )
            )
        else:
            db.session.execute(
                sa.text(
                    "CREATE FUNCTION outbox_full() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'could not extend file: No space left'; END $$"
                )
            )
            db.session.execute(
                sa.text(
                    "CREATE TRIGGER outbox_full BEFORE INSERT ON mmolove_events "
                    "FOR EACH ROW EXECUTE FUNCTION outbox_full()"
                )
            )
        db.session.commit()
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    client.get(f"/register?mmref={token}")
    with pytest.raises(sa.exc.DBAPIError):
        client.post("/register", data={"name": "ayla"})
    assert accounts(app, db, user) == []
    assert client.get("/register").json == {"mmref": token}
    with app.app_context():
        if not database_uri.startswith("sqlite"):
            db.session.execute(sa.text("DROP TRIGGER outbox_full ON mmolove_events"))
            db.session.execute(sa.text("DROP FUNCTION outbox_full()"))
            db.session.commit()


@pytest.mark.postgres
def test_an_outbox_table_locked_past_the_portals_lock_timeout_leaves_no_account(
    portal_config: dict[str, Any], pg_uri: str, mmolove_sandbox: Any
) -> None:
    # A migration or VACUUM FULL holds the outbox's table; the portal's own engine
    # gives up waiting (its lock_timeout), and the whole registration with it.
    app, db, ext, user = build(
        {
            **portal_config,
            "PROPAGATE_EXCEPTIONS": True,
            "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"options": "-c lock_timeout=300"}},
        },
        pg_uri,
    )
    locker = sa.create_engine(pg_uri)
    try:
        client = app.test_client()
        token = mmolove_sandbox.mint_token()
        client.get(f"/register?mmref={token}")
        with locker.connect() as conn, conn.begin():
            conn.execute(sa.text("LOCK TABLE mmolove_events IN ACCESS EXCLUSIVE MODE"))
            with pytest.raises(sa.exc.DBAPIError, match="lock timeout"):
                client.post("/register", data={"name": "ayla"})
        assert accounts(app, db, user) == []
        assert client.get("/register").json == {"mmref": token}
        # The lock gone, the player's next try registers both.
        assert client.post("/register", data={"name": "ayla"}).status_code == 201
        assert mmolove_sandbox.accepted_count("registered") == 1
    finally:
        locker.dispose()
        ext.shutdown(app)
        with app.app_context():
            db.drop_all()
            db.engine.dispose()


def test_plain_sqlalchemy_portals_give_their_scoped_session_and_metadata(
    portal_config: dict[str, Any], database_uri: str, mmolove_sandbox: Any
) -> None:
    from sqlalchemy.orm import scoped_session, sessionmaker

    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "accounts"
        id: Mapped[int] = mapped_column(primary_key=True)

    engine = sa.create_engine(database_uri)
    Session = scoped_session(sessionmaker(engine))
    app = Flask(__name__)
    config = {k: v for k, v in portal_config.items() if k != "MMOLOVE_DATABASE_URI"}
    app.config.update(SECRET_KEY="plain", **config)
    ext = MMOLove(app, session=Session, metadata=Base.metadata)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)  # the portal's own tables, and the outbox's

    @app.teardown_appcontext
    def remove_session(exc: BaseException | None) -> None:
        Session.remove()

    @app.route("/register", methods=["GET", "POST"])
    @referral_registered
    def register() -> Any:
        if request.method == "GET":
            return "form"
        account = Account()
        Session.add(account)
        Session.flush()
        set_referee(account.id)
        if request.form.get("fail"):
            Session.rollback()
            return "refused", 200
        Session.commit()
        return "created", 201

    try:
        client = app.test_client()
        client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
        assert client.post("/register", data={"fail": "1"}).status_code == 200
        assert stored(app) == []
        assert client.post("/register").status_code == 201
        assert stored(app) == ["registered"]
        assert mmolove_sandbox.accepted_count("registered") == 1
    finally:
        ext.shutdown(app)
        Session.remove()
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_delivery_starts_after_the_commit_not_before(portal: Any, mmolove_sandbox: Any) -> None:
    # Thread mode: the delivery thread polls often, but a write the portal has not
    # committed is invisible to it; once committed, the thread is woken for it.
    app, db, user = portal(MMOLOVE_DELIVERY="thread", MMOLOVE_POLL_INTERVAL=0.05)
    committed = threading.Event()
    may_commit = threading.Event()

    @app.post("/slow-register")
    @referral_registered
    def slow_register() -> Any:
        account = user(name=request.form["name"])
        db.session.add(account)
        db.session.flush()
        set_referee(account.id)
        committed.set()  # written, not committed
        assert may_commit.wait(10)
        db.session.commit()
        return "created", 201

    client = app.test_client()
    client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
    answered: list[int] = []
    thread = threading.Thread(
        target=lambda: answered.append(
            client.post("/slow-register", data={"name": "ayla"}).status_code
        )
    )
    thread.start()
    assert committed.wait(10)
    time.sleep(0.5)  # ten of the thread's polls
    assert mmolove_sandbox.events == []
    may_commit.set()
    thread.join(10)
    assert answered == [201]
    wait_for(lambda: mmolove_sandbox.accepted_count("registered") == 1, 10, "the delivery")


def test_a_released_savepoint_is_not_the_portals_commit(portal: Any, mmolove_sandbox: Any) -> None:
    app, _, _ = portal()
    client = app.test_client()
    token = mmolove_sandbox.mint_token()
    client.get(f"/register?mmref={token}")
    # The documented order with a savepoint released before a rollback: the token
    # stays, as nothing was committed.
    response = client.post(
        "/register", data={"name": "ayla", "order": "rollback", "savepoint": "1"}
    )
    assert response.status_code == 200
    assert stored(app) == []
    assert client.get("/register").json == {"mmref": token}
    assert client.post("/register", data={"name": "ayla"}).status_code == 201
    user_id = app.extensions["mmolove"].outbox.list_events()[0].identity
    # The level committed first, the milestone's write left waiting, then a savepoint
    # released: the end of the request still commits the write.
    response = client.post(f"/play/{user_id}", data={"commit": "first", "savepoint": "1"})
    assert response.status_code == 200
    assert stored(app) == ["registered", "qualified"]
    assert mmolove_sandbox.accepted_count("qualified") == 1


def test_a_failed_request_is_not_committed_by_the_extension(
    portal: Any, mmolove_sandbox: Any
) -> None:
    app, _, _ = portal()
    client = app.test_client()
    client.get(f"/register?mmref={mmolove_sandbox.mint_token()}")
    assert client.post("/register", data={"name": "ayla"}).status_code == 201
    user_id = app.extensions["mmolove"].outbox.list_events()[0].identity
    # The level committed, the milestone's write waiting, and the view answers an
    # error: the end of the request commits nothing, the write goes with teardown.
    response = client.post(
        f"/play/{user_id}", data={"commit": "first", "status": "409", "answer": "busy"}
    )
    assert response.status_code == 409
    assert stored(app) == ["registered"]


def test_the_portals_sqlite_file_is_switched_to_wal_before_it_serves(
    portal_config: dict[str, Any], tmp_path: Path
) -> None:
    # The switch needs the file to itself, which concurrent requests would not give it.
    path = tmp_path / "fresh-portal.sqlite3"
    app, db, ext, _ = build(portal_config, f"sqlite:///{path}", create=False)
    try:
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        ext.shutdown(app)
        with app.app_context():
            db.engine.dispose()
