"""The standalone outbox's schema version: the Alembic migrations shipped in
``migrations/``, with a version table of the outbox's own (``<prefix>alembic_version``,
never the portal's ``alembic_version``).

:func:`ensure_current` (``init_app``, through ``Outbox.create_all``) creates a fresh
outbox at the newest revision and refuses an outdated one; :func:`upgrade` (``flask
mmolove db upgrade``) brings an outdated one to the newest. An outbox made by 0.1.0
(its three tables, no version table) counts as outdated: the upgrade stamps it at the
baseline revision, which is exactly what 0.1.0 created, without touching a row, then
runs what follows. Both look and act on one connection, in one transaction, under the
schema lock, so processes starting at once never see one another's work half done.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from .engine import transaction
from .schema import Tables, lock_schema, present
from .values import OutboxError

#: The Alembic script directory inside the package.
SCRIPT_LOCATION: Final = Path(__file__).with_name("migrations")
#: The revision that creates the tables exactly as 0.1.0 did.
BASELINE: Final = "0001"
#: What an operator runs to bring an outdated outbox to this version.
UPGRADE_COMMAND: Final = "flask mmolove db upgrade"


class OutboxOutdated(OutboxError):
    """The outbox's schema is not the one this flask-mmolove uses; the message says
    what to run."""


def version_table(prefix: str) -> str:
    """The outbox's own Alembic version table, named with its table prefix."""
    return f"{prefix}alembic_version"


@dataclass(frozen=True)
class SchemaVersion:
    """Where an outbox's schema stands against the migrations of this package."""

    #: The revision its version table holds; None when it has none.
    revision: str | None
    #: The newest revision this package ships.
    head: str
    #: The outbox tables that exist.
    tables: tuple[str, ...]
    #: All the outbox tables, those that exist or not.
    expected: tuple[str, ...]
    #: The tables of 0.1.0, which an outbox without a version has.
    baseline: tuple[str, ...] = ()

    @property
    def fresh(self) -> bool:
        """No outbox at all yet: nothing to keep, created at the head."""
        return self.revision is None and not self.tables

    @property
    def unversioned(self) -> bool:
        """Tables without a version: made by flask-mmolove 0.1.0."""
        return self.revision is None and bool(self.tables)

    @property
    def current(self) -> bool:
        return self.revision == self.head

    @property
    def known(self) -> bool:
        """Whether this package has the revision (else a newer release wrote it)."""
        return self.revision is None or self.revision in _revisions()

    def __str__(self) -> str:
        if self.fresh:
            return "none (no outbox yet)"
        if self.unversioned:
            return "0.1.0 (tables without a schema version)"
        assert self.revision is not None
        if self.revision in _revisions():
            return f"{self.revision} ({_script().get_revision(self.revision).doc})"
        return self.revision


def read_version(engine: Engine, tables: Tables) -> SchemaVersion:
    """Where the outbox in ``engine`` stands (a read; takes no lock)."""
    with transaction(engine, read_only=True) as conn:
        return _read(conn, tables)


def ensure_current(engine: Engine, tables: Tables) -> None:
    """Create a fresh outbox at the newest revision; refuse any other that is not at it.

    Raises :class:`OutboxOutdated` naming ``flask mmolove db upgrade`` for an outbox
    that is behind (0.1.0's included), and one naming the release to install for an
    outbox a newer release upgraded. Safe when several processes start at once.
    """
    try:
        with _locked(engine, tables) as conn:
            version = _read(conn, tables)
            if version.fresh:
                _alembic(conn, tables.prefix, "upgrade", "head")
                return
    except (sa_exc.DBAPIError, OutboxError):
        # Without a schema lock (other dialects), a concurrent creator can win the
        # race between look and create: success, as long as the outbox is current now.
        if engine.dialect.name in ("sqlite", "postgresql"):
            raise
        version = read_version(engine, tables)
        if not version.current:
            raise
    _refuse_unless_current(engine, version)


def upgrade(engine: Engine, tables: Tables) -> tuple[SchemaVersion, SchemaVersion]:
    """Bring the outbox to the newest revision, its rows kept; (before, after).

    A fresh database gets the whole outbox; one made by 0.1.0 is first stamped at the
    baseline revision (its tables are that revision's). All or nothing: one
    transaction, under the schema lock.
    """
    with _locked(engine, tables) as conn:
        before = _read(conn, tables)
        if not before.known:
            _refuse_unless_current(engine, before)
        _check_tables(engine, before)
        if before.unversioned:
            _alembic(conn, tables.prefix, "stamp", BASELINE)
        _alembic(conn, tables.prefix, "upgrade", "head")
        after = _read(conn, tables)
    return before, after


def drop_all(engine: Engine, tables: Tables) -> None:
    """Drop the outbox tables, everything in them, and its version table."""
    with _locked(engine, tables) as conn:
        tables.metadata.drop_all(conn, tables=tables.all, checkfirst=True)
        sa.Table(version_table(tables.prefix), sa.MetaData()).drop(conn, checkfirst=True)


@contextmanager
def _locked(engine: Engine, tables: Tables) -> Iterator[Connection]:
    with transaction(engine, tables=tables.names) as conn:
        lock_schema(conn, tables.prefix)
        yield conn


def _read(conn: Connection, tables: Tables) -> SchemaVersion:
    context = MigrationContext.configure(conn, opts={"version_table": version_table(tables.prefix)})
    return SchemaVersion(
        revision=context.get_current_revision(),
        head=_head(),
        tables=present(conn, tables.names),
        expected=tables.names,
        baseline=tables.baseline_names,
    )


def _refuse_unless_current(engine: Engine, version: SchemaVersion) -> None:
    url = engine.url.render_as_string(hide_password=True)
    if not version.known:
        raise OutboxOutdated(
            f"the outbox in {url} is at schema revision {version.revision}, which this "
            f"flask-mmolove does not know (its newest is {version.head}): a newer release "
            "upgraded it; install that release or a later one"
        )
    _check_tables(engine, version)
    if version.unversioned:
        raise OutboxOutdated(
            f"the outbox in {url} was created by flask-mmolove 0.1.0 and has no schema "
            f"version yet: run `{UPGRADE_COMMAND}` to bring it to revision {version.head} "
            "(its events are kept), then start the app again"
        )
    if not version.current:
        raise OutboxOutdated(
            f"the outbox in {url} is at schema revision {version}, this flask-mmolove "
            f"needs {version.head}: run `{UPGRADE_COMMAND}` (its events are kept), then "
            "start the app again"
        )


def _check_tables(engine: Engine, version: SchemaVersion) -> None:
    """Refuse a half-made outbox: no migration can know what the missing tables held."""
    # An outbox of 0.1.0 has only its tables; the upgrade creates the others.
    expected = version.baseline if version.unversioned else version.expected
    missing = [name for name in expected if name not in version.tables]
    if version.fresh or not missing or not (version.unversioned or version.current):
        return
    url = engine.url.render_as_string(hide_password=True)
    raise OutboxError(
        f"the outbox in {url} has {', '.join(version.tables) or 'no table'} but not "
        f"{', '.join(missing)} (schema version: {version}): not an outbox flask-mmolove "
        "made; if another application's tables use its prefix, set MMOLOVE_TABLE_PREFIX "
        "to a prefix of the outbox's own"
    )


def _alembic(conn: Connection, prefix: str, action: str, revision: str) -> None:
    """Run Alembic's ``upgrade`` or ``stamp`` on ``conn``, inside its transaction."""
    config = Config()
    # configparser interpolates "%": a path holding one must double it.
    config.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    config.attributes.update(
        connection=conn, table_prefix=prefix, version_table=version_table(prefix)
    )
    if action == "stamp":
        command.stamp(config, revision)
    else:
        command.upgrade(config, revision)


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory(str(SCRIPT_LOCATION))


@functools.cache
def _revisions() -> frozenset[str]:
    return frozenset(script.revision for script in _script().walk_revisions())


def _head() -> str:
    head = _script().get_current_head()
    assert head is not None, "the package ships at least the baseline revision"
    return head
