"""The portal's own SQLAlchemy, when the outbox lives in it (``MMOLove(app, db=db)``).

The extension's writes (a binding and ``registered``, or ``qualified``) join the
transaction of the portal's session, so they exist if and only if the portal commits:
an account and its referral event commit together or not at all. What must follow a
commit (letting the token go, waking delivery) waits for the session's ``after_commit``;
a rollback, of the whole transaction or of a savepoint the writes were made in, drops
it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction

logger = logging.getLogger("flask_mmolove")

#: Where a session keeps the extension's writes that wait for its commit.
_PENDING: Final = "flask_mmolove.pending"

#: How to create the outbox's tables when they live in the portal's metadata.
CREATE_HINT: Final = (
    "they are declared in the portal's metadata: generate and apply a migration "
    "(`flask db migrate` then `flask db upgrade` with Flask-Migrate), or call "
    "db.create_all()"
)


class SessionSource(Protocol):
    """A ``scoped_session`` (Flask-SQLAlchemy's ``db.session``) or any callable that
    returns the session of the current unit of work."""

    def __call__(self) -> Session: ...


@dataclass
class _Pending:
    #: The innermost transaction the write was made in.
    transaction: SessionTransaction
    on_commit: Callable[[], None]


@dataclass(frozen=True)
class PortalDB:
    """The portal's session (whose transactions the writes join) and metadata (where
    the outbox's tables are declared)."""

    session: SessionSource = field(repr=False)
    metadata: sa.MetaData = field(repr=False)
    #: The portal's engine: delivery reaches the same database through an engine of
    #: its own made from this one's URL.
    engine: Engine = field(repr=False)

    def connection(self) -> Connection:
        """The connection of the session's current transaction (begun if need be)."""
        return self.session().connection()

    def after_commit(self, on_commit: Callable[[], None]) -> None:
        """Call ``on_commit`` when the session's current transaction commits; never,
        if the transaction (or the savepoint it is in now) is rolled back."""
        session = self.session()
        transaction = session.get_nested_transaction() or session.get_transaction()
        assert transaction is not None  # connection() has begun one
        session.info.setdefault(_PENDING, []).append(_Pending(transaction, on_commit))

    def waiting(self) -> bool:
        """Whether the current session holds writes of ours that wait for a commit."""
        return bool(self.session().info.get(_PENDING))

    def commit(self) -> None:
        """Commit the current session: the end of a request that left writes waiting."""
        self.session().commit()


def from_flask_sqlalchemy(app: Any, db: Any) -> PortalDB:
    """The :class:`PortalDB` of a Flask-SQLAlchemy ``SQLAlchemy`` registered on ``app``."""
    # .engine needs an app context: it is looked for on the type.
    for name in ("session", "metadata"):
        if not hasattr(db, name) or not hasattr(type(db), "engine"):
            raise TypeError(
                "db= takes a Flask-SQLAlchemy SQLAlchemy instance (db = SQLAlchemy()); "
                f"got {type(db).__name__}, which has no .{name}. With plain SQLAlchemy, "
                "pass session= (a scoped_session) and metadata= instead"
            )
    if "sqlalchemy" not in app.extensions:
        raise RuntimeError(
            "db= names a Flask-SQLAlchemy instance not set up on this app yet: call "
            "db.init_app(app) before mmolove.init_app(app, db=db)"
        )
    with app.app_context():
        engine = db.engine
    return PortalDB(db.session, db.metadata, engine)


def from_session(session: SessionSource, metadata: sa.MetaData) -> PortalDB:
    """The :class:`PortalDB` of a plain SQLAlchemy ``scoped_session`` and ``MetaData``."""
    if not callable(session) or not isinstance(metadata, sa.MetaData):
        raise TypeError(
            "session= takes a scoped_session (or a callable returning the current "
            "Session) and metadata= the MetaData of the portal's tables"
        )
    bind = session().get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    return PortalDB(session, metadata, engine)


def _committed(session: Session) -> None:
    if session.in_nested_transaction():
        # A savepoint released (SQLAlchemy says after_commit for it too): the
        # transaction the writes are in is still open, and may yet roll back.
        return
    for pending in session.info.pop(_PENDING, []):
        try:
            pending.on_commit()
        except Exception:
            # The commit has happened: what follows it must not undo the portal's.
            logger.exception("after a commit of the portal's session")


def _rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    pending: list[_Pending] = session.info.get(_PENDING, [])
    kept = [p for p in pending if not _within(p.transaction, previous_transaction)]
    if kept:
        session.info[_PENDING] = kept
    else:
        session.info.pop(_PENDING, None)


def _ended(session: Session, transaction: SessionTransaction) -> None:
    # The outermost transaction ended without a commit (closed, or the session
    # removed): nothing that waited for it will happen.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


def _within(transaction: SessionTransaction | None, ended: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ended:
            return True
        transaction = transaction.parent
    return False


# On every session (the base class): a listener per session class would be registered
# by the class's id, which a later class can reuse. Sessions holding nothing of ours
# cost one dictionary look-up.
sa.event.listen(Session, "after_commit", _committed)
sa.event.listen(Session, "after_soft_rollback", _rolled_back)
sa.event.listen(Session, "after_transaction_end", _ended)
