"""Alembic's environment for the standalone outbox's migrations.

Run only by :mod:`flask_mmolove.outbox.migrate`, which hands over in
``config.attributes`` a connection already in its transaction and under the schema
lock, the table prefix and the outbox's own version table. There is no
``alembic.ini`` and no offline (``--sql``) mode.
"""

from __future__ import annotations

from alembic import context

_attributes = context.config.attributes
if context.is_offline_mode():
    raise RuntimeError("the outbox's migrations run on a live connection, not in --sql mode")
context.configure(
    connection=_attributes["connection"],
    version_table=_attributes["version_table"],
)
# The connection is in the caller's transaction: this begins nothing and commits
# nothing; the caller commits the whole upgrade, or none of it, under its lock.
with context.begin_transaction():
    context.run_migrations()
