"""The databases the benchmarks write their outboxes to: SQLite files, and PostgreSQL
when one answers, under table prefixes no other run uses.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/mmolove_test"


def postgres_url() -> str | None:
    """The PostgreSQL URL to benchmark on, or None when none answers."""
    url = (
        os.environ.get("MMOLOVE_BENCH_POSTGRES_URL")
        or os.environ.get("MMOLOVE_TEST_POSTGRES_URL")
        or DEFAULT_POSTGRES_URL
    )
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("select 1"))
        finally:
            engine.dispose()
    except Exception:
        return None
    return url


def table_prefix() -> str:
    """A table prefix no other run (or test) uses at the same time."""
    return f"bench{os.getpid()}_{secrets.token_hex(3)}_"


def sqlite_url(directory: Path | str, name: str = "outbox.sqlite3") -> str:
    return f"sqlite:///{Path(directory) / name}"
