"""
Tests for L{nestproto.collector}: what survives a collection is frozen out
of later ones; a frozen set grown L{THAW_GROWTH} times is thawed and the
whole heap collected; stopping puts everything back. These use the
interpreter's real collector, and a L{Clock} for the growth checks.
"""

from __future__ import annotations

import gc
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

    def test_thresholdsWhileRunning(self) -> None:
        """Running, the collector uses L{COLLECTOR_THRESHOLDS}."""
        self.assertEqual(gc.get_threshold(), COLLECTOR_THRESHOLDS)

    def test_startCollectsAndFreezesTheHeap(self) -> None:
        """
        Starting collects the whole heap and freezes what it kept: the
        measure later growth is checked against.
        """
        self.assertGreater(self.service.wholeHeap, 0)
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

    def test_frozenCycleWaitsForGrowth(self) -> None:
        """
        A cycle alive at a collection and dead after it stays while the
        frozen set grows less than L{THAW_GROWTH} times; once it has, the
        next check collects the whole heap, and the cycle with it.
        """
        held, alive = _cycle()
        gc.collect(0)
        del held
        gc.collect()
        self.clock.advance(CHECK_SECONDS)
        self.assertIsNotNone(alive(), "a frozen cycle is not collected")

        growth: list[list[None]] = [
            [] for _ in range(int(self.service.wholeHeap * THAW_GROWTH))
        ]
        gc.collect(0)
        self.assertIsNotNone(alive(), "only the check collects the whole heap")
        self.clock.advance(CHECK_SECONDS)
        self.assertIsNone(alive())
        self.assertGreater(self.service.wholeHeap, len(growth))

    def test_smallerGrowthStaysFrozen(self) -> None:
        """Growth short of L{THAW_GROWTH} times leaves the frozen set alone."""
        before = self.service.wholeHeap
        growth: list[list[None]] = [
            [] for _ in range(int(before * (THAW_GROWTH - 1) / 2))
        ]
        gc.collect(0)
        self.clock.advance(CHECK_SECONDS)
        self.assertEqual(self.service.wholeHeap, before)
        self.assertGreaterEqual(gc.get_freeze_count(), before + len(growth))

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
