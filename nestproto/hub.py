# -*- test-case-name: tests.test_hub -*-
"""
Held subscribes, per device (PROTOCOL.md §6.4, §12, §20.3).

A held subscribe is a subscription with a Deferred that fires when the
answer is over: after the hold timeout when nothing came, or when its hold
policy ends it after a push. Pushes go to every live subscription of the
device; a push that could not be written is kept and replayed to that
device's next held subscribe.

Each held subscribe names its L{IHoldPolicy}, the way its dialect answers
while holding: L{BatchWindow} (v7: a chunk per push, the answer ends when
pushes stop), L{EndOnChange} (key-list: the answer ends with no body when a
watched key changes) or L{OneBucketPerAnswer} (one bucket, then the end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from .buckets import Bucket
from .model import Commit

#: Writes one chunk of pushed buckets to the device; raises when it cannot.
#: Called with no buckets once, first, when the policy sends the headers at
#: once: the answer is open and the device may sleep.
Deliver = Callable[[Sequence[Bucket]], None]
#: Picks, from undelivered buckets, those a new subscribe should still get.
ReplayFilter = Callable[[Sequence[Bucket]], list[Bucket]]
#: The devices that see a change of a bucket: (scope, key) -> serials.
DevicesSeeing = Callable[[str, str], Iterable[str]]

HOLD_SECONDS = 290.0
BATCH_SECONDS = 3.0
MAX_SUBSCRIPTIONS_PER_DEVICE = 100


@frozen
class Reaction:
    """
    What a held subscribe does with a push.

    @ivar deliver: buckets written as one chunk; none: nothing is written.
    @ivar endAfterSeconds: the answer ends this long after the push, unless
        another push comes first; C{0}: it ends now.
    """

    deliver: tuple[Bucket, ...]
    endAfterSeconds: float


class IHoldPolicy(Interface):
    """How a held subscribe answers: chosen by the route's dialect."""

    headersAtOnce: bool = Attribute(
        "Whether the answer's headers go out when the hold begins (the hub "
        "calls deliver with no buckets), so the device may sleep"
    )
    holdSeconds: float | None = Attribute(
        "How long the subscribe is held when nothing comes; None or more "
        "than the hub's holdSeconds: the hub's"
    )

    def react(buckets: Sequence[Bucket]) -> Reaction | None:
        """What to do with C{buckets} pushed to the device; C{None}: ignore."""


@implementer(IHoldPolicy)
@frozen
class BatchWindow:
    """
    The v7 dialect (PROTOCOL.md §6.3, §12): headers at once; each push is a
    chunk of its own; the answer ends once C{batchSeconds} pass without a
    push, so pushes close together reach the device on one connection.
    """

    batchSeconds: float = BATCH_SECONDS
    headersAtOnce: bool = True
    holdSeconds: float | None = None

    def react(self, buckets: Sequence[Bucket]) -> Reaction | None:
        return Reaction(tuple(buckets), self.batchSeconds)


@implementer(IHoldPolicy)
@frozen
class EndOnChange:
    """
    The key-list dialect of a device (PROTOCOL.md §20.3): headers at once;
    when one of the C{watched} keys changes the answer ends with no body,
    and the device's next subscribe fetches the bucket with its headers.
    Changes to other keys leave the hold as it is.
    """

    watched: frozenset[str]
    holdSeconds: float | None = None
    headersAtOnce: bool = True

    def react(self, buckets: Sequence[Bucket]) -> Reaction | None:
        if any(bucket.key in self.watched for bucket in buckets):
            return Reaction((), 0)
        return None


@implementer(IHoldPolicy)
@frozen
class OneBucketPerAnswer:
    """
    One bucket per answer (PROTOCOL.md §20.3, the apps' long poll): nothing
    is sent while holding, since the headers name the bucket; the first
    pushed bucket among the C{watched} keys (any, when C{None}) is the
    answer, which then ends. The others go out on the following polls.
    """

    watched: frozenset[str] | None = None
    holdSeconds: float | None = None
    headersAtOnce: bool = False

    def react(self, buckets: Sequence[Bucket]) -> Reaction | None:
        for bucket in buckets:
            if self.watched is None or bucket.key in self.watched:
                return Reaction((bucket,), 0)
        return None


#: The v7 routes' policy.
BATCHED = BatchWindow()


@define(eq=False)
class _Subscription:
    serial: str
    deliver: Deliver
    policy: IHoldPolicy
    done: Deferred[None]
    timer: IDelayedCall | None = None


@define
class SubscriberHub:
    """
    The held subscribes of every device.

    @ivar holdSeconds: how long an idle subscribe is held (suspend − 10 s),
        at most; a policy may hold shorter.
    """

    log = Logger()

    clock: IReactorTime
    holdSeconds: float = HOLD_SECONDS
    maxPerDevice: int = MAX_SUBSCRIPTIONS_PER_DEVICE
    #: Called with each batch delivered to at least one held subscribe.
    onPushed: Callable[[Sequence[Bucket]], object] | None = None
    _subscriptions: dict[str, list[_Subscription]] = field(factory=dict, init=False)
    _undelivered: dict[str, dict[str, Bucket]] = field(factory=dict, init=False)
    #: Set by L{endAll}: the server is stopping.
    closed: bool = field(default=False, init=False)

    def hold(
        self,
        serial: str,
        deliver: Deliver,
        replayFilter: ReplayFilter,
        policy: IHoldPolicy,
    ) -> Deferred[None] | None:
        """
        Hold a subscribe for C{serial}, answering as C{policy} says.

        @param deliver: called with each batch this subscribe writes (and
            with none at first when the policy sends headers at once).
        @param replayFilter: applied to pushes that earlier subscribes of this
            device failed to receive; the policy reacts at once to what it
            keeps.
        @return: a Deferred that fires with C{None} when the answer is over;
            cancelling it (the client left) forgets the subscription at once.
            C{None} when the device already holds C{maxPerDevice}.
        """
        live = self._subscriptions.setdefault(serial, [])
        if len(live) >= self.maxPerDevice:
            if not live:
                del self._subscriptions[serial]
            return None

        def cancel(d: Deferred[None]) -> None:
            self._forget(subscription)

        subscription = _Subscription(serial, deliver, policy, Deferred(cancel))
        live.append(subscription)
        holdSeconds = self.holdSeconds
        if policy.holdSeconds is not None:
            holdSeconds = min(policy.holdSeconds, holdSeconds)
        subscription.timer = self.clock.callLater(holdSeconds, self._end, subscription)
        if policy.headersAtOnce and not self._write(subscription, ()):
            return subscription.done
        replay = replayFilter(list(self._undelivered.pop(serial, {}).values()))
        if replay:
            self._react(subscription, replay)
        return subscription.done

    def push(self, serial: str, buckets: Sequence[Bucket]) -> int:
        """
        Deliver C{buckets} to every held subscribe of C{serial}.

        @return: how many subscribes took them (those whose policy ignored
            them do not count). With none, nothing is queued: the device
            gets the change on its next subscribe because the bucket's
            timestamp moved (PROTOCOL.md §12).
        """
        if not buckets:
            return 0
        live = list(self._subscriptions.get(serial, ()))
        delivered = 0
        for subscription in live:
            if self._react(subscription, buckets):
                delivered += 1
        if delivered and self.onPushed is not None:
            self.onPushed(buckets)
        return delivered

    def pushCommit(self, commit: Commit, devicesSeeing: DevicesSeeing) -> None:
        """
        Push what C{commit} wrote to every device that sees it, one batch per
        device, except to the device whose own request it was: it has what
        it sent (PROTOCOL.md §12, the stale echo).
        """
        byDevice: dict[str, list[Bucket]] = {}
        for change in commit.buckets:
            if change.bucket is None:
                continue
            for serial in devicesSeeing(change.scope, change.key):
                if serial != commit.origin:
                    byDevice.setdefault(serial, []).append(change.bucket)
        for serial, batch in byDevice.items():
            self.push(serial, batch)

    def count(self, serial: str) -> int:
        """The number of subscribes of C{serial} held now."""
        return len(self._subscriptions.get(serial, ()))

    def subscribers(self) -> list[str]:
        """Who holds subscribes now: device serials and app subscribers."""
        return list(self._subscriptions)

    def total(self) -> int:
        """The number of subscribes held now, all devices together."""
        return sum(len(live) for live in self._subscriptions.values())

    def undelivered(self, serial: str) -> list[Bucket]:
        """Pushes kept for C{serial}'s next held subscribe."""
        return list(self._undelivered.get(serial, {}).values())

    def endAll(self) -> None:
        """
        End every held subscribe now, cleanly: at shutdown, so devices
        reconnect at once instead of waiting for their wake timer. The hub
        is L{closed} from then on.
        """
        self.closed = True
        for live in list(self._subscriptions.values()):
            for subscription in list(live):
                self._end(subscription)

    def _react(self, subscription: _Subscription, buckets: Sequence[Bucket]) -> bool:
        reaction = subscription.policy.react(buckets)
        if reaction is None:
            return False
        if reaction.deliver and not self._write(subscription, reaction.deliver):
            return False
        if reaction.endAfterSeconds <= 0:
            self._end(subscription)
            return True
        if subscription.timer is not None and subscription.timer.active():
            subscription.timer.cancel()
        subscription.timer = self.clock.callLater(
            reaction.endAfterSeconds, self._end, subscription
        )
        return True

    def _write(self, subscription: _Subscription, buckets: Sequence[Bucket]) -> bool:
        """
        Hand C{buckets} to the subscribe's deliver. When it cannot take them
        the subscribe ends, and its buckets are kept for the device's next.
        """
        try:
            subscription.deliver(buckets)
        except Exception:
            self.log.info(
                "push to {serial} not written; kept for its next subscribe",
                serial=subscription.serial,
            )
            kept = self._undelivered.setdefault(subscription.serial, {})
            for bucket in buckets:
                kept[bucket.key] = bucket
            self._end(subscription)
            return False
        return True

    def _forget(self, subscription: _Subscription) -> None:
        if subscription.timer is not None and subscription.timer.active():
            subscription.timer.cancel()
        subscription.timer = None
        live = self._subscriptions.get(subscription.serial)
        if live is None:
            return
        if subscription in live:
            live.remove(subscription)
        if not live:
            del self._subscriptions[subscription.serial]

    def _end(self, subscription: _Subscription) -> None:
        self._forget(subscription)
        if not subscription.done.called:
            subscription.done.callback(None)
