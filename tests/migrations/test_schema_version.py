"""The standalone outbox's schema version: a fresh outbox is made at the head by the
shipped migrations, which build exactly ``make_tables``; an outdated one is refused and
upgraded with its rows kept; the version table is the outbox's own, under its prefix;
processes creating it at once are safe. SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from legacy_outbox import create_010, rows, tables_010

from flask_mmolove.outbox import Outbox, OutboxError, OutboxOutdated, make_engine
from flask_mmolove.outbox import migrate as outbox_migrate
from flask_mmolove.outbox.schema import make_tables


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def enqueue(box: Outbox, n: int) -> None:
    for i in range(n):
        box.bind_and_enqueue(
            identity=f"p{i}",
            token=f"tok-{i}",
            event="registered",
            server_event_id=f"reg-{i}",
            body=b'{"n":%d}' % i,
        )


def table_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def version_rows(engine: sa.Engine, table: str) -> list[str]:
    with engine.connect() as conn:
        query = sa.select(sa.column("version_num")).select_from(sa.table(table))
        return [str(v) for v in conn.scalars(query)]


def test_a_fresh_outbox_is_made_at_the_head_with_a_version_table_of_its_own(
    engine: sa.Engine,
) -> None:
    # The portal's own Alembic version table, as Flask-Migrate leaves it.
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('portal1234')")
    box = Outbox(engine)
    box.create_all()
    assert {"mmolove_events", "mmolove_bindings", "mmolove_credits"} <= table_names(engine)
    assert version_rows(engine, "mmolove_alembic_version") == [outbox_migrate._head()]
    assert version_rows(engine, "alembic_version") == ["portal1234"]
    version = box.schema_version()
    assert version.current
    assert str(version) == "0003 (hearts)"
    box.create_all()  # at the head: nothing to do, nothing refused
    box.drop_all()
    assert table_names(engine) == {"alembic_version"}


def test_the_migrations_honour_the_table_prefix(engine: sa.Engine) -> None:
    one, two = Outbox(engine, table_prefix="one_"), Outbox(engine, table_prefix="two_")
    one.create_all()
    two.create_all()
    names = table_names(engine)
    assert {"one_events", "one_alembic_version", "two_events", "two_alembic_version"} <= names
    assert not any(name.startswith("mmolove_") for name in names)
    enqueue(one, 2)
    two.drop_all()
    assert one.stats().pending == 2
    assert one.schema_version().current


def test_the_head_is_exactly_make_tables(engine: sa.Engine) -> None:
    """Alembic's own comparison finds nothing between the migrated database and
    ``make_tables``: columns, types, nullability, indexes, unique constraints."""
    box = Outbox(engine, table_prefix="cmp_")
    box.create_all()
    tables = make_tables("cmp_")
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_name": lambda name, type_, parent: (
                    type_ != "table" or name in tables.names
                ),
            },
        )
        assert compare_metadata(context, tables.metadata) == []


def test_on_sqlite_the_baseline_is_0_1_0s_ddl_to_the_letter(tmp_path: Path) -> None:
    def ddl(engine: sa.Engine) -> list[tuple[str, str]]:
        with engine.connect() as conn:
            found = conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL "
                "AND name LIKE 'mmolove\\_%' ESCAPE '\\' AND name NOT LIKE '%alembic%' "
                "ORDER BY name"
            )
            return [(str(name), str(sql)) for name, sql in found]

    old, new = (make_engine(f"sqlite:///{tmp_path / name}") for name in ("old.db", "new.db"))
    create_010(old)
    with new.begin() as conn:
        outbox_migrate._alembic(conn, "mmolove_", "upgrade", outbox_migrate.BASELINE)
    assert len(ddl(old)) == 6  # three tables, three indexes
    assert ddl(new) == ddl(old)
    old.dispose()
    new.dispose()


def test_an_outbox_from_0_1_0_is_refused_then_upgraded_with_its_rows(engine: sa.Engine) -> None:
    create_010(engine)
    legacy = Outbox(engine)
    enqueue(legacy, 5)
    before = rows(engine)
    with pytest.raises(OutboxOutdated, match=r"0\.1\.0.*`flask mmolove db upgrade`"):
        Outbox(engine).create_all()
    assert rows(engine) == before
    assert "mmolove_alembic_version" not in table_names(engine)

    was, now = Outbox(engine).upgrade()
    assert was.unversioned
    assert str(was) == "0.1.0 (tables without a schema version)"
    assert now.current
    assert rows(engine) == before
    Outbox(engine).create_all()  # no longer refused
    # Upgrading again: nothing to do.
    was, now = Outbox(engine).upgrade()
    assert was.revision == now.revision == outbox_migrate._head()


def test_a_deferred_refusal_refuses_every_use_until_upgraded(engine: sa.Engine) -> None:
    create_010(engine)
    enqueue(Outbox(engine), 2)
    box = Outbox(engine)
    box.create_all(defer_refusal=True)
    with pytest.raises(OutboxOutdated, match="flask mmolove db upgrade"):
        box.stats()
    with pytest.raises(OutboxOutdated, match="flask mmolove db upgrade"):
        enqueue(box, 1)
    box.upgrade()
    assert box.stats().pending == 2


def test_an_outbox_a_newer_release_upgraded_is_refused(engine: sa.Engine) -> None:
    box = Outbox(engine)
    box.create_all()
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE mmolove_alembic_version SET version_num = 'f00dface'")
    with pytest.raises(OutboxOutdated, match=r"f00dface.*newer release") as refused:
        Outbox(engine).create_all()
    assert "db upgrade" not in str(refused.value)
    with pytest.raises(OutboxOutdated, match="newer release"):
        box.upgrade()
    assert version_rows(engine, "mmolove_alembic_version") == ["f00dface"]


def test_a_half_made_outbox_is_refused_not_stamped(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        tables_010("mmolove_").tables["mmolove_events"].create(conn)
    with pytest.raises(OutboxError, match="not mmolove_bindings, mmolove_credits"):
        Outbox(engine).create_all()
    with pytest.raises(OutboxError, match="MMOLOVE_TABLE_PREFIX"):
        Outbox(engine).upgrade()
    assert "mmolove_alembic_version" not in table_names(engine)


def test_processes_starting_at_once_create_it_once(engine: sa.Engine) -> None:
    """The schema lock makes look-then-create one critical section: without it,
    PostgreSQL's concurrent CREATE TABLEs collide and Alembic stamps twice."""
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def starter() -> None:
        box = Outbox(make_engine(engine.url))
        start.wait()
        try:
            box.create_all()
        except BaseException as exc:
            errors.append(exc)
        finally:
            box.dispose()

    threads = [threading.Thread(target=starter) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert version_rows(engine, "mmolove_alembic_version") == [outbox_migrate._head()]


@pytest.fixture
def two_revisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The shipped migrations plus one more revision, as a later release would ship."""
    location = tmp_path / "migrations"
    shutil.copytree(
        outbox_migrate.SCRIPT_LOCATION, location, ignore=shutil.ignore_patterns("__pycache__")
    )
    (location / "versions" / "r0002_nick.py").write_text(
        '"""a later release\'s column"""\n'
        "import sqlalchemy as sa\n"
        "from alembic import context, op\n"
        "revision = 'f0a1'\n"
        f"down_revision = {outbox_migrate._head()!r}\n"
        "branch_labels = None\n"
        "depends_on = None\n"
        "def upgrade():\n"
        "    p = context.config.attributes['table_prefix']\n"
        "    op.add_column(f'{p}events', sa.Column('note', sa.String(20)))\n"
    )
    monkeypatch.setattr(outbox_migrate, "SCRIPT_LOCATION", location)
    outbox_migrate._script.cache_clear()
    outbox_migrate._revisions.cache_clear()
    yield "f0a1"
    outbox_migrate._script.cache_clear()
    outbox_migrate._revisions.cache_clear()


def test_an_outbox_behind_the_head_is_refused_then_upgraded_through_every_revision(
    engine: sa.Engine, two_revisions: str
) -> None:
    with engine.begin() as conn:
        # Made by the release before: the baseline only.
        outbox_migrate._alembic(conn, "mmolove_", "upgrade", "0001")
    enqueue(Outbox(engine), 3)
    before = rows(engine)
    with pytest.raises(OutboxOutdated, match=rf"revision 0001 .*needs {two_revisions}.*db upgrade"):
        Outbox(engine).create_all()
    was, now = Outbox(engine).upgrade()
    assert (was.revision, now.revision) == ("0001", two_revisions)
    assert rows(engine) == before
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("mmolove_events")}
    assert "note" in columns


def test_a_0_1_0_outbox_goes_through_every_revision_after_the_baseline(
    engine: sa.Engine, two_revisions: str
) -> None:
    create_010(engine)
    enqueue(Outbox(engine), 3)
    before = rows(engine)
    was, now = Outbox(engine).upgrade()
    assert was.unversioned
    assert now.revision == two_revisions
    assert rows(engine) == before
