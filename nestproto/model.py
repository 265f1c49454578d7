# -*- test-case-name: tests.test_store_contract -*-
"""
Neutral types every layer shares: what a device names in a subscribe or a
put, and the committed changes the store announces on its feed.

No I/O, no Twisted: the dialects produce these, the state consumes them,
and the feed's consumers (hub, event stream, bridges) read them.
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen

from .buckets import Bucket


@frozen
class ClientObject:
    """
    One bucket named in a subscribe: what the device believes it holds,
    and an inline update when C{value} is given (PROTOCOL.md §6.1).
    """

    key: str
    revision: int = 0
    timestamp: int = 0
    value: dict[str, Any] | None = None

    @property
    def isInlineUpdate(self) -> bool:
        """A value sent with revision and timestamp 0 (PROTOCOL.md §11.4)."""
        return self.value is not None and self.revision == 0 and self.timestamp == 0


@frozen
class PutEntry:
    """One bucket of a put: the fields to merge and the optional condition."""

    key: str
    fields: dict[str, Any]
    ifRevision: int | None = None
    baseRevision: int | None = None


@frozen
class BucketChanged:
    """
    A bucket as a transaction committed it; C{bucket} is C{None} when the
    transaction deleted it.
    """

    scope: str
    key: str
    bucket: Bucket | None


@frozen
class RecordChanged:
    """A record as a transaction committed it; C{doc} is C{None} when deleted."""

    kind: str
    name: str
    doc: dict[str, Any] | None


@frozen
class Commit:
    """
    What one write committed, announced on the store's change feed after
    the transaction is durable, never before.

    @ivar sequence: increases by one per announced commit, across restarts.
    @ivar origin: the serial of the device whose own request made the
        change (its held subscribes are not sent it back), or C{None} for
        users, pairing and everything else.
    @ivar local: whether this process committed it; C{False} for a commit
        another process sharing the database made, which this one only
        heard of (work done once per commit, such as history, is done by
        the process that committed it). Not part of equality: it is the
        same commit wherever it is heard.
    """

    sequence: int
    origin: str | None
    buckets: tuple[BucketChanged, ...] = ()
    records: tuple[RecordChanged, ...] = ()
    local: bool = field(default=True, eq=False)
