# -*- test-case-name: tests.test_hub -*-
"""
Held subscribes, per device (PROTOCOL.md §6.4, §12).

A held subscribe is a subscription with a Deferred that fires when the
answer is over: after the hold timeout when nothing came, or once the batch
window passes quietly after the last push. Pushes go to every live
subscription of the device; a push that could not be written is kept and
replayed to that device's next held subscribe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .buckets import Bucket
from .model import Commit

#: Writes one chunk of pushed buckets to the device; raises when it cannot.
Deliver = Callable[[Sequence[Bucket]], None]
#: Picks, from undelivered buckets, those a new subscribe should still get.
ReplayFilter = Callable[[Sequence[Bucket]], list[Bucket]]
#: The devices that see a change of a bucket: (scope, key) -> serials.
DevicesSeeing = Callable[[str, str], Iterable[str]]

HOLD_SECONDS = 290.0
BATCH_SECONDS = 3.0
MAX_SUBSCRIPTIONS_PER_DEVICE = 100


@define(eq=False)
class _Subscription:
    serial: str
    deliver: Deliver
    done: Deferred[None]
    timer: IDelayedCall | None = None


@define
class SubscriberHub:
    """
    The held subscribes of every device.

    @ivar holdSeconds: how long an idle subscribe is held (suspend − 10 s).
    @ivar batchSeconds: how long a connection stays open after a push for
        further pushes, each its own chunk (less than the device's 5 s
        closing timer).
    """

    log = Logger()

    clock: IReactorTime
    holdSeconds: float = HOLD_SECONDS
    batchSeconds: float = BATCH_SECONDS
    maxPerDevice: int = MAX_SUBSCRIPTIONS_PER_DEVICE
    #: Called with each batch delivered to at least one held subscribe.
    onPushed: Callable[[Sequence[Bucket]], object] | None = None
    _subscriptions: dict[str, list[_Subscription]] = field(factory=dict, init=False)
    _undelivered: dict[str, dict[str, Bucket]] = field(factory=dict, init=False)
    #: Set by L{endAll}: the server is stopping.
    closed: bool = field(default=False, init=False)

    def hold(
        self, serial: str, deliver: Deliver, replayFilter: ReplayFilter
    ) -> Deferred[None] | None:
        """
        Hold a subscribe for C{serial}.

        @param deliver: called with each batch pushed to this subscribe.
        @param replayFilter: applied to pushes that earlier subscribes of this
            device failed to receive; what it keeps is delivered at once.
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

        subscription = _Subscription(serial, deliver, Deferred(cancel))
        live.append(subscription)
        subscription.timer = self.clock.callLater(
            self.holdSeconds, self._end, subscription
        )
        replay = replayFilter(list(self._undelivered.pop(serial, {}).values()))
        if replay:
            self._deliver(subscription, replay)
        return subscription.done

    def push(self, serial: str, buckets: Sequence[Bucket]) -> int:
        """
        Deliver C{buckets} to every held subscribe of C{serial}.

        @return: how many subscribes received them. With none, nothing is
            queued: the device gets the change on its next subscribe because
            the bucket's timestamp moved (PROTOCOL.md §12).
        """
        if not buckets:
            return 0
        live = list(self._subscriptions.get(serial, ()))
        delivered = 0
        for subscription in live:
            if self._deliver(subscription, buckets):
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

    def _deliver(self, subscription: _Subscription, buckets: Sequence[Bucket]) -> bool:
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
        if subscription.timer is not None and subscription.timer.active():
            subscription.timer.cancel()
        subscription.timer = self.clock.callLater(
            self.batchSeconds, self._end, subscription
        )
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
