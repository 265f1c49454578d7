# -*- test-case-name: tests.test_store_pg -*-
"""
A PostgreSQL database of its own for a test: created on the machine's
server for the test run and dropped in cleanup.
"""

from __future__ import annotations

import os
import secrets

from twisted.trial.unittest import SkipTest, SynchronousTestCase

#: The server the tests use: the machine's, trust auth (override with
#: NESTPROTO_TEST_POSTGRESQL, a libpq DSN of a database to connect to).
SERVER = os.environ.get(
    "NESTPROTO_TEST_POSTGRESQL",
    "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
)


def _unavailable(reason: str) -> None:
    message = f"PostgreSQL at {SERVER!r} is needed: {reason}"
    if os.environ.get("CI"):
        raise AssertionError(message)
    raise SkipTest(message)


def testDatabase(case: SynchronousTestCase) -> str:
    """
    The DSN of a new, empty database C{nestproto_<random>}, dropped (with
    whoever is still connected to it) when C{case} is cleaned up.

    @raise SkipTest: the server cannot be reached (a failure under CI).
    """
    try:
        import psycopg
        from psycopg import conninfo
    except ImportError as e:
        _unavailable(f"psycopg is not installed ({e}); pip install .[postgresql]")
        raise
    name = "nestproto_" + secrets.token_hex(6)
    try:
        admin = psycopg.connect(SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        _unavailable(str(e).strip())
        raise
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(SERVER, autocommit=True) as again:
            again.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    case.addCleanup(drop)
    params = conninfo.conninfo_to_dict(SERVER)
    params["dbname"] = name
    return conninfo.make_conninfo("", **params)


def asURL(dsn: str) -> str:
    """C{dsn} as a C{postgresql://} URL, as C{--store} takes it."""
    from psycopg import conninfo

    params = conninfo.conninfo_to_dict(dsn)
    user = params.get("user", "")
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    at = f"{user}@" if user else ""
    return f"postgresql://{at}{host}:{port}/{params['dbname']}"
