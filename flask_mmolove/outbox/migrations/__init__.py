"""The standalone outbox's Alembic script directory: ``env.py`` and ``versions/``.

Run by :mod:`flask_mmolove.outbox.migrate`, never imported: Alembic loads these files
by path. Each revision reads the table prefix from ``context.config.attributes``.
"""
