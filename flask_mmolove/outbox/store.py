"""The Outbox: one class made of its topics (``enqueueing``, ``settling``, ``reading``,
``credits``, on ``_base``), and its life cycle: creating, checking and upgrading its
schema, dropping it, and closing its engine."""

from __future__ import annotations

from . import migrate
from ._base import StoreBase
from .credits import Credits
from .enqueueing import Enqueueing
from .hearts import Hearts
from .reading import Reading
from .settling import Settling


class Outbox(Enqueueing, Settling, Reading, Credits, Hearts, StoreBase):
    """The events, first-touch bindings, credits and votes (hearts) of one portal.

    ``table_prefix`` namespaces the tables (``<prefix>events``, ``<prefix>bindings``,
    ``<prefix>credits``, ``<prefix>hearts``) so they can live in the portal's own
    database. ``clock``
    returns unix seconds; every stored time comes from it, never from the database.
    ``metadata``: declare the tables there (the portal's, whose migrations then own
    them) instead of in a metadata of the outbox's own; ``create_hint`` says how to
    create them when they are missing.

    Each topic checks what it is given, runs the named statements in a transaction, and
    turns rows into values.
    """

    def create_all(self, *, defer_refusal: bool = False) -> None:
        """Create a fresh outbox at the current schema version, or check the one there.

        An outdated one (0.1.0's included) is refused with :class:`OutboxOutdated`
        naming ``flask mmolove db upgrade``; with ``defer_refusal``, every later use
        of this Outbox is refused instead, until :meth:`upgrade`. Safe when several
        processes start at once: SQLite's ``BEGIN IMMEDIATE`` and a PostgreSQL
        advisory lock make the check-then-create a critical section.
        """
        try:
            migrate.ensure_current(self.engine, self._tables)
        except migrate.OutboxOutdated as exc:
            if not defer_refusal:
                raise
            self._refusal = str(exc)

    def upgrade(self) -> tuple[migrate.SchemaVersion, migrate.SchemaVersion]:
        """Migrate the schema to the current version, events kept; (before, after)."""
        versions = migrate.upgrade(self.engine, self._tables)
        self._refusal = None
        return versions

    def schema_version(self) -> migrate.SchemaVersion:
        return migrate.read_version(self.engine, self._tables)

    def drop_all(self) -> None:
        """Drop the outbox tables, everything in them and the schema version (tests)."""
        migrate.drop_all(self.engine, self._tables)

    def dispose(self) -> None:
        """Close the engine's pooled connections (in a forked child use
        ``engine.dispose(close=False)`` instead)."""
        self.engine.dispose()
