# -*- test-case-name: tests.test_transport -*-
"""
Dialects of the device port: how a route parses, renders and holds.

A dialect names its pure parsing and rendering functions (L{wire} for v7;
a key-list module of the same shape for PROTOCOL.md §20) and the hub's hold
policy its held subscribes answer with. L{nestproto.device.api} routes name
the dialect they speak; the handlers are the same for every dialect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from attrs import frozen

from ..buckets import Bucket
from ..hub import BATCHED, EndOnChange, IHoldPolicy
from ..model import PutEntry
from . import keylist, wire
from .wire import Rendered, SubscribeBody


@frozen
class Dialect:
    """
    How a device route parses, renders and holds.

    @ivar maxBodyBytes: request bodies past this are refused (413).
    @ivar parseSubscribe: a subscribe body into the objects the device has.
    @ivar renderAnswer: a subscribe's answer, or one chunk pushed to a held
        one, from the buckets to send.
    @ivar openingHeaders: headers of a held answer whose policy sends them
        at once, before any bucket.
    @ivar holdPolicy: the hub policy of a held subscribe with this body.
    @ivar parsePut: a put body into entries.
    @ivar renderReceipts: a put's answer from the buckets it wrote.
    @ivar renderListing: an object listing (PROTOCOL.md §8).
    """

    name: str
    maxBodyBytes: int
    parseSubscribe: Callable[[bytes], SubscribeBody]
    renderAnswer: Callable[[Sequence[Bucket]], Rendered]
    openingHeaders: tuple[tuple[bytes, bytes], ...]
    holdPolicy: Callable[[SubscribeBody], IHoldPolicy]
    parsePut: Callable[[bytes], list[PutEntry]]
    renderReceipts: Callable[[Sequence[Bucket]], Rendered]
    renderListing: Callable[[Sequence[Bucket]], Rendered]


def _batched(body: SubscribeBody) -> IHoldPolicy:
    return BATCHED


#: Firmware 5.x and later (PROTOCOL.md §6-§8): C{objects} bodies, chunked
#: answers held with a batch window.
V7 = Dialect(
    name="v7",
    maxBodyBytes=wire.MAX_BODY_BYTES,
    parseSubscribe=wire.parseSubscribe,
    renderAnswer=wire.renderAnswer,
    openingHeaders=wire.JSON_HEADERS,
    holdPolicy=_batched,
    parsePut=wire.parsePut,
    renderReceipts=wire.renderReceipts,
    renderListing=wire.renderReceipts,
)


def _endOnChange(body: SubscribeBody) -> IHoldPolicy:
    return EndOnChange(frozenset(entry.key for entry in body.objects))


#: Firmware 4.x on C{…/v3/…} and the apps of seed 001 (PROTOCOL.md §20):
#: key-list subscribes answered one bucket at a time, held with headers at
#: once and ended with no body when a listed key changes; nested puts.
KEY_LIST = Dialect(
    name="key-list",
    maxBodyBytes=keylist.MAX_BODY_BYTES,
    parseSubscribe=keylist.parseSubscribe,
    renderAnswer=keylist.renderAnswer,
    openingHeaders=(),
    holdPolicy=_endOnChange,
    parsePut=keylist.parsePut,
    renderReceipts=keylist.renderReceipts,
    renderListing=keylist.renderWholeState,
)
