"""For a portal on Flask-Migrate (or Alembic) whose database also holds the standalone
outbox: keep autogenerate away from the outbox's tables.

One line where the portal sets up Flask-Migrate::

    from flask_mmolove.migrate import include_object as mmolove_include_object

    Migrate(app, db, include_object=mmolove_include_object)

Without it, ``flask db migrate`` finds tables that no model of the portal declares and
writes ``drop_table`` for each (events, bindings, credits, and the outbox's own
version table); ``flask db upgrade`` would then drop the pending events. A portal with
an ``include_object`` of its own combines the two: ``include_object=lambda *a:
mmolove_include_object(*a) and mine(*a)``.

With ``MMOLove(app, db=db)`` there is nothing to keep away: the outbox's tables are
declared in ``db.metadata``, and the portal's migrations create them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import current_app, has_app_context

from .outbox.migrate import version_table
from .outbox.schema import make_tables
from .settings import DEFAULTS
from .state import EXTENSION_KEY, get_state

#: Alembic's ``include_object`` hook: (object, name, type_, reflected, compare_to).
IncludeObject = Callable[[Any, str | None, str, bool, Any], bool]


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's ``include_object`` hook leaving out the standalone outbox.

    False for the outbox's tables under the current app's ``MMOLOVE_TABLE_PREFIX``,
    their columns, indexes and constraints, and the outbox's version table
    (``<prefix>alembic_version``); True for everything else. Flask-Migrate calls it
    with the app's context pushed. With ``db=`` it leaves out nothing: the outbox's
    tables are then the portal's own, to be created by its migrations.
    """
    prefix = _standalone_prefix()
    return prefix is None or _include(_names(prefix), obj, name, type_)


def excluding_outbox(prefix: str = DEFAULTS["MMOLOVE_TABLE_PREFIX"]) -> IncludeObject:
    """An ``include_object`` hook like :func:`include_object`, for a prefix given here
    (plain Alembic, with no Flask app to read it from)."""
    names = _names(prefix)

    def hook(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        return _include(names, obj, name, type_)

    return hook


def _include(names: frozenset[str], obj: Any, name: str | None, type_: str) -> bool:
    # Columns, indexes and constraints belong to a table: judged by their table's name.
    table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
    return table not in names


def _names(prefix: str) -> frozenset[str]:
    return frozenset((*make_tables(prefix).names, version_table(prefix)))


def _standalone_prefix() -> str | None:
    """The current app's table prefix; None when its outbox is the portal's (``db=``)."""
    if not has_app_context():
        raise RuntimeError(
            "flask_mmolove.migrate.include_object reads MMOLOVE_TABLE_PREFIX from the "
            "current app, and no app context is pushed; outside Flask-Migrate use "
            "excluding_outbox(prefix)"
        )
    if EXTENSION_KEY in current_app.extensions:
        state = get_state()
        return None if state.portal_db is not None else state.settings.table_prefix
    return str(current_app.config.get("MMOLOVE_TABLE_PREFIX", DEFAULTS["MMOLOVE_TABLE_PREFIX"]))
