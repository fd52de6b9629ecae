"""The PostgreSQL fixtures of conftest.py: each test gets a fresh, empty schema of its own that
its URL selects (through SQLAlchemy too), dropped after it even when a session still holds locks
in it; catalog_backend hands a new index's catalog to SQLite or to such a schema.

Needs a server (CLIPDEX_TEST_POSTGRES, set by scripts/test.sh); skipped without one, apart from
the skip itself.
"""

from __future__ import annotations

import contextlib
import os
import re

import pytest
from conftest import CATALOG_ENV, POSTGRES_ENV, postgres_base_url, postgres_connect, postgres_schema

SCHEMA_NAME = re.compile(r"t_[0-9a-f]{16}")

# The schemas the tests below were given, in order: a later test checks an earlier one is gone.
_seen: list[str] = []


def current_schema(url: str) -> str:
    """What a session opened the way the catalog opens one (SQLAlchemy's create_engine) is in."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT current_schema()")).scalar_one()
    finally:
        engine.dispose()


def schema_exists(schema: str) -> bool:
    """Asked on a connection of its own, not one the test or the fixture used."""
    with postgres_connect(postgres_base_url()) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone()
    return found is not None


def tables_in(schema: str) -> list[str]:
    with postgres_connect(postgres_base_url()) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema]).fetchall()
    return [r[0] for r in rows]


def test_without_a_server_the_fixture_skips_naming_the_variable(monkeypatch):
    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{POSTGRES_ENV}.*scripts/test.sh"):
        postgres_base_url()


def test_the_url_selects_a_fresh_empty_schema(postgres_url):
    schema = current_schema(postgres_url)
    assert SCHEMA_NAME.fullmatch(schema), schema
    assert schema_exists(schema)
    assert tables_in(schema) == []
    # Unqualified names land in it: what the catalog's CREATE TABLEs rely on.
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE probe (x integer)"))
    engine.dispose()
    assert tables_in(schema) == ["probe"]
    _seen.append(schema)


def test_the_next_test_gets_another_schema_and_the_last_one_is_dropped(postgres_url):
    if not _seen:
        pytest.skip("runs after test_the_url_selects_a_fresh_empty_schema (run the whole module)")
    schema = current_schema(postgres_url)
    assert schema != _seen[-1]
    assert not schema_exists(_seen[-1])
    assert tables_in(schema) == []


@pytest.mark.parametrize("name", [None, "renamed"], ids=["named-by-the-url", "named-otherwise"])
def test_the_drop_ends_a_session_left_holding_locks_in_the_schema(name):
    from sqlalchemy import create_engine, text

    with postgres_schema(postgres_base_url()) as url:
        schema = current_schema(url)
        # "renamed": as the catalog's writer lock names its session (application_name given to
        # connect overrides the URL's): found by the locks it holds.
        engine = create_engine(url, connect_args={"application_name": name} if name else {})
        conn = engine.connect()
        # An open transaction that wrote to a table of the schema: DROP ... CASCADE waits for it.
        conn.execute(text("CREATE TABLE held (x integer)"))
        conn.execute(text("INSERT INTO held VALUES (1)"))
    try:
        assert not schema_exists(schema)
    finally:
        with contextlib.suppress(Exception):  # its backend was terminated under it
            conn.close()
        engine.dispose()


def test_catalog_backend_names_the_catalog_of_a_new_index(catalog_backend):
    if catalog_backend == "sqlite":
        assert CATALOG_ENV not in os.environ
    else:
        url = os.environ[CATALOG_ENV]
        assert url.startswith("postgresql+psycopg://")
        schema = current_schema(url)
        assert SCHEMA_NAME.fullmatch(schema), schema
        assert tables_in(schema) == []
