# -*- test-case-name: tests.test_store_pg -*-
"""
Tests for L{nestproto.store_pg}: the store contract on a real PostgreSQL,
plus what only a shared engine has (other writers' commits on the feed,
compare-and-set between processes, a listening connection that dies).
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from nestproto.store import IBucketStore, ThreadRunner, runInline

from .pg import testDatabase
from .store_contract import START_MS, CommitGate, StoreContract


def openForWriter(dsn: str, runner: ThreadRunner | None) -> IBucketStore:
    """How the contract's hard-kill writer (and its check) open the database."""
    from twisted.internet import reactor

    from nestproto.store_pg import PostgreSQLStore

    return PostgreSQLStore.open(dsn, runner or runInline, reactor)


def threadRunner(case: TestCase, name: str) -> ThreadRunner:
    """A one-thread pool on the real reactor, stopped in cleanup."""
    pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
    pool.start()
    case.addCleanup(pool.stop)
    return partial(deferToThreadPool, cast(Any, reactor), pool)


class PostgreSQLContractTests(StoreContract, TestCase):
    """The store contract, on a real PostgreSQL database, following its feed."""

    WRITER = "tests.test_store_pg:openForWriter"

    def setUp(self) -> None:
        self.dsn = testDatabase(self)
        self.clock = Clock()
        self.clock.advance(START_MS / 1000)
        self.gate = CommitGate(threadRunner(self, "test-store"))
        self.listenRunner = threadRunner(self, "test-listen")

    def openStore(self, again: IBucketStore | None = None) -> Deferred[IBucketStore]:
        from nestproto.store_pg import PostgreSQLStore

        store: IBucketStore = PostgreSQLStore.open(
            self.dsn, self.gate, self.clock, self.listenRunner
        )
        return succeed(store)

    def writerLocation(self) -> str:
        return testDatabase(self)
