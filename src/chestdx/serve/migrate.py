"""Schema migrations with Alembic, run by the service itself when it opens the database.

Several service processes may start at once against one PostgreSQL: the migration runs under an
advisory lock, so one process upgrades and the others find the schema current. A database made
before migrations existed (the `studies` table alone, by `create_all`) is stamped as the first
revision and upgraded from there.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

MIGRATIONS = Path(__file__).with_name("migrations")
_LOCK_ID = 20_2701  # any constant shared by every chestdx process


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine, revision: str = "head") -> None:
    if engine.dialect.name == "sqlite" and engine.url.database:
        with _file_lock(Path(engine.url.database).with_suffix(".migrate.lock")):
            return _upgrade(engine, revision)
    return _upgrade(engine, revision)


@contextmanager
def _file_lock(path: Path):
    """SQLite runs DDL outside a transaction: processes opening one file at once migrate in turn."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _upgrade(engine, revision: str) -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_ID})")
        if MigrationContext.configure(conn).get_current_revision() == head():
            return  # the usual case: nothing to do, no Alembic output
        cfg.attributes["connection"] = conn
        tables = set(inspect(conn).get_table_names())
        if "studies" in tables and "alembic_version" not in tables:
            command.stamp(cfg, "0001")
        command.upgrade(cfg, revision)
