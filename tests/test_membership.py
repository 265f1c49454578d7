# -*- test-case-name: tests.test_membership -*-
"""
Tests for L{nestproto.membership}: the index of who sees which user and
structure bucket, built from the store and kept current from its feed.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from nestproto.membership import GLOBAL_SCOPE, OWNER_RECORD, IMembership, Membership
from nestproto.store import RecordWrite, ScopeDelete, SQLiteStore, Write, runInline

from .store_contract import update


class MembershipTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.store = SQLiteStore.open(self.path, runInline, Clock())
        self.membership = Membership.following(self.store)

    def write(self, *writes: Write) -> None:
        self.successResultOf(self.store.write(writes))

    def test_providesInterface(self) -> None:
        """L{Membership} provides L{IMembership}."""
        self.assertTrue(verifyObject(IMembership, self.membership))

    def test_followsTheFeed(self) -> None:
        """
        Devices appear with their first bucket, move to their owner's
        structure and user when claimed, back when released, and leave
        when deleted.
        """
        self.write(update("A", "shared.A", {}), update("B", "shared.B", {}))
        self.assertEqual(self.membership.knownSerials(), ["A", "B"])
        seeing = self.membership.devicesSeeing
        self.assertEqual(seeing(GLOBAL_SCOPE, "structure.unpaired-A"), ["A"])
        self.assertEqual(seeing(GLOBAL_SCOPE, "structure.unpaired-B"), ["B"])
        self.assertEqual(seeing(GLOBAL_SCOPE, "structure.default"), [])
        self.write(RecordWrite(OWNER_RECORD, "A", {"user": "user_1"}))
        self.assertEqual(seeing(GLOBAL_SCOPE, "structure.unpaired-A"), [])
        self.assertEqual(seeing(GLOBAL_SCOPE, "structure.1"), ["A"])
        self.assertEqual(seeing(GLOBAL_SCOPE, "user.user_1"), ["A"])
        self.assertEqual(seeing("A", "shared.A"), ["A"])
        self.write(RecordWrite(OWNER_RECORD, "A", None))
        self.assertEqual(seeing(GLOBAL_SCOPE, "user.user_1"), [])
        self.assertEqual(seeing(GLOBAL_SCOPE, "structure.unpaired-A"), ["A"])
        self.write(ScopeDelete("B"))
        self.assertEqual(self.membership.knownSerials(), ["A"])
        self.assertFalse(self.membership.isKnown("B"))
        self.assertFalse(self.membership.isKnown(GLOBAL_SCOPE))

    def test_ownerWithoutBucketsIsKnown(self) -> None:
        """A claimed serial that has not put anything yet is a known device."""
        self.write(RecordWrite(OWNER_RECORD, "C", {"user": "u"}))
        self.assertTrue(self.membership.isKnown("C"))

    def test_builtFromAStoreOnOpen(self) -> None:
        """An index built from a reopened store equals the one kept live."""
        self.write(
            update("A", "shared.A", {}),
            update("B", "shared.B", {}),
            RecordWrite(OWNER_RECORD, "B", {"user": "u"}),
        )
        self.successResultOf(self.store.close())
        reopened = Membership.following(SQLiteStore.open(self.path, runInline, Clock()))
        for key in ["structure.unpaired-A", "structure.u", "user.u"]:
            self.assertEqual(
                reopened.devicesSeeing(GLOBAL_SCOPE, key),
                self.membership.devicesSeeing(GLOBAL_SCOPE, key),
            )
        self.assertEqual(reopened.knownSerials(), ["A", "B"])

    def test_scopeFor(self) -> None:
        """
        A device may touch its own serial-keyed buckets and its linked ones,
        nothing of another device or another structure.
        """
        self.write(RecordWrite(OWNER_RECORD, "A", {"user": "u"}))
        scopeFor = self.membership.scopeFor
        self.assertEqual(scopeFor("A", "shared.A"), "A")
        self.assertIsNone(scopeFor("A", "shared.B"))
        self.assertEqual(scopeFor("A", "structure.u"), GLOBAL_SCOPE)
        self.assertIsNone(scopeFor("A", "structure.default"))
        self.assertIsNone(scopeFor("A", "structure.unpaired-A"))
        self.assertEqual(scopeFor("B", "structure.unpaired-B"), GLOBAL_SCOPE)
        self.assertIsNone(scopeFor("B", "structure.unpaired-C"))
        self.assertIsNone(scopeFor("A", "user.v"))
