# -*- test-case-name: tests.test_replay_all -*-
"""
Every fixture in C{fixtures/} replays green against a fresh in-memory
nestproto: the recorded scenarios are the conformance definition.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from nestproto.recording.format import loadFixture
from nestproto.recording.replayer import Replayer, ReplayResult
from nestproto.recording.targets import MemoryTarget

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
#: A week and a half second later than recorded: every server-made time
#: differs, so only symbolic matching can make these replays green.
SHIFT_SECONDS = 7 * 86400 + 0.5


def fixturePaths() -> list[str]:
    return sorted(glob.glob(os.path.join(FIXTURES, "*.jsonl")))


def _replayTest(path: str, shift: float) -> Callable[[SynchronousTestCase], None]:
    def test(self: SynchronousTestCase) -> None:
        fixture = loadFixture(path)
        target = MemoryTarget(fixture.startSeconds + shift)
        results: list[ReplayResult] = []
        Replayer(target, fixture).run().addCallback(results.append)
        (result,) = results
        self.assertEqual(result.describe(), [])
        self.assertEqual(result.replayed, len(fixture.exchanges))
        self.assertEqual(result.matched, result.replayed)
        # Held subscribes still open at the end were dropped by the client:
        # nothing of the server is left waiting.
        self.assertEqual(target.clock.getDelayedCalls(), [])

    return test


class ReplayAllTests(SynchronousTestCase):
    """Each fixture file replays with every exchange matched."""

    def test_enoughScenarios(self) -> None:
        """fixtures/ holds at least ten recorded scenarios."""
        self.assertGreaterEqual(len(fixturePaths()), 10)


for _path in fixturePaths():
    _name = os.path.basename(_path)[: -len(".jsonl")]
    _test = _replayTest(_path, 0.0)
    _test.__doc__ = f"{_name}.jsonl replays green at its recorded time."
    setattr(ReplayAllTests, f"test_{_name}", _test)
    _shifted = _replayTest(_path, SHIFT_SECONDS)
    _shifted.__doc__ = f"{_name}.jsonl replays green a week later."
    setattr(ReplayAllTests, f"test_{_name}_shifted", _shifted)
del _path, _name, _test, _shifted
