"""
Tests for L{nestproto.collector}: what survives a collection is frozen out
of later ones; once the heap has grown L{THAW_GROWTH} times everything is
thawed and the whole heap collected; stopping puts everything back. These use the
interpreter's real collector, and a L{Clock} for the growth checks.
"""

from __future__ import annotations

import gc
import sys
import weakref

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nestproto.collector import (
    CHECK_SECONDS,
    COLLECTOR_THRESHOLDS,
    THAW_GROWTH,
    CollectorService,
)


class _Node:
    """A container that can be put in a cycle."""

    other: _Node | None = None


def _cycle() -> tuple[_Node, weakref.ref[_Node]]:
    """Two objects referring to each other, and a weak reference to one."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)


def _tracked(obj: object) -> bool:
    """Whether a collection would walk C{obj} (frozen objects it does not)."""
    return any(o is obj for o in gc.get_objects())


class CollectorServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.original = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *self.original)
        # Whatever an earlier test left frozen is not this test's.
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        self.clock = Clock()
        self.service = CollectorService(self.clock)
        self.service.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.service.running:
            self.service.stopService()

    def restart(self, growth: float) -> None:
        """Run a service with growth factor C{growth} instead."""
        self.service.stopService()
        self.service = CollectorService(self.clock, growth=growth)
        self.service.startService()

    def test_defaultGrowth(self) -> None:
        """The service thaws at L{THAW_GROWTH} unless told otherwise."""
        self.assertEqual(self.service.growth, THAW_GROWTH)

    def test_thresholdsWhileRunning(self) -> None:
        """Running, the collector uses L{COLLECTOR_THRESHOLDS}."""
        self.assertEqual(gc.get_threshold(), COLLECTOR_THRESHOLDS)

    def test_startCollectsAndFreezesTheHeap(self) -> None:
        """
        Starting collects the whole heap and freezes what it kept; the
        allocated blocks left are what later growth is measured against.
        """
        self.assertGreater(self.service.wholeHeap, gc.get_freeze_count())
        self.assertFalse(_tracked(self))

    def test_youngSurvivorsFrozen(self) -> None:
        """What survives a young collection is frozen out of later ones."""
        survivor = _Node()
        self.assertTrue(_tracked(survivor))
        gc.collect(0)
        self.assertFalse(_tracked(survivor))

    def test_deadYoungCyclesCollected(self) -> None:
        """A cycle that dies before its first collection is collected."""
        alive = _cycle()[1]
        gc.collect(0)
        self.assertIsNone(alive())

    def grow(self, factor: float) -> list[list[None]]:
        """
        Empty lists enough to take the allocated blocks to C{factor} times
        those the last whole-heap collection left (one block each).
        """
        missing = int(self.service.wholeHeap * factor) - sys.getallocatedblocks()
        return [[] for _ in range(max(missing, 0))]

    def test_frozenCycleWaitsForGrowth(self) -> None:
        """
        A cycle alive at a collection and dead after it stays while the
        heap grows less than the service's growth factor; once it has, the
        next check collects the whole heap, and the cycle with it.
        """
        self.restart(growth=1.2)
        held, alive = _cycle()
        gc.collect(0)
        del held
        gc.collect()
        self.clock.advance(CHECK_SECONDS)
        self.assertIsNotNone(alive(), "a frozen cycle is not collected")

        growth = self.grow(1.25)
        gc.collect(0)
        self.assertIsNotNone(alive(), "only the check collects the whole heap")
        self.clock.advance(CHECK_SECONDS)
        self.assertIsNone(alive())
        self.assertGreater(self.service.wholeHeap, len(growth))

    def test_smallerGrowthStaysFrozen(self) -> None:
        """Growth short of the service's factor leaves the frozen set alone."""
        self.restart(growth=1.2)
        before = self.service.wholeHeap
        frozen = gc.get_freeze_count()
        growth = self.grow(1.1)
        gc.collect(0)
        self.clock.advance(CHECK_SECONDS)
        self.assertEqual(self.service.wholeHeap, before)
        self.assertGreaterEqual(gc.get_freeze_count(), frozen + len(growth) // 2)

    def test_stopPutsBack(self) -> None:
        """
        Stopping thaws everything, unhooks the service from the collector,
        ends its checks and puts the previous thresholds back.
        """
        self.service.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), self.original)
        self.assertNotIn(self.service.collected, gc.callbacks)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        gc.collect()
        self.assertEqual(gc.get_freeze_count(), 0)
