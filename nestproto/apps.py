# -*- test-case-name: tests.test_service -*-
"""
The one place that wires nestproto's parts together: store, hub, state,
pairing and both HTTP apps. The twistd service, the in-memory replay server
and the tests all build through L{buildApps}, so they serve the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attrs import Factory, frozen
from twisted.internet.interfaces import IReactorTime

from .accounts import Accounts
from .admission import Admission, AdmissionSettings
from .control.api import ControlAPI, ControlSettings
from .control.appputs import appsSeeing, appSubscriber
from .control.events import EventStream
from .control.status import isAvailable
from .device.api import DeviceAPI, TransportSettings
from .history import History, HistorySettings, IHistoryStorage, sampleValues
from .hub import HOLD_SECONDS, SubscriberHub
from .membership import Membership
from .metrics import Metrics, Reading, StateSources
from .pairing import (
    CLAIM_THROTTLE_RECORD,
    DEFAULT_TTL_SECONDS,
    LOGIN_THROTTLE_RECORD,
    Pairing,
    SharedClaimThrottle,
)
from .presence import IPresence, Presence
from .state import DeviceState
from .store import IBucketStore, ThreadRunner
from .uploads import LogStore
from .weather import IWeatherSource, NoWeather, WeatherService


@frozen(kw_only=True)
class AppSettings:
    """Everything about the apps that a user may choose."""

    holdSeconds: float = HOLD_SECONDS
    transport: TransportSettings = Factory(TransportSettings)
    control: ControlSettings = Factory(ControlSettings)
    admission: AdmissionSettings = Factory(AdmissionSettings)
    entryKeyTtlSeconds: int = DEFAULT_TTL_SECONDS
    weatherTtlSeconds: float = 600.0
    #: C{None}: keep no history.
    history: HistorySettings | None = Factory(HistorySettings)


@frozen(eq=False)
class Apps:
    """A wired nestproto: its parts and the two Klein apps."""

    store: IBucketStore
    hub: SubscriberHub
    state: DeviceState
    pairing: Pairing
    events: EventStream
    device: DeviceAPI
    control: ControlAPI
    accounts: Accounts
    metrics: Metrics
    #: C{None} when history is off or the store has no history storage.
    history: History | None


def buildApps(
    store: IBucketStore,
    clock: IReactorTime,
    runInThread: ThreadRunner,
    settings: AppSettings | None = None,
    weatherSource: IWeatherSource | None = None,
    logs: LogStore | None = None,
    deviceClass: type[DeviceAPI] = DeviceAPI,
    presence: IPresence | None = None,
    sharedThrottles: bool = False,
) -> Apps:
    """
    Wire every part of nestproto around C{store}.

    @param runInThread: where blocking request work (log uploads) runs.
    @param weatherSource: defaults to none (503 to the device).
    @param logs: defaults to discarding uploads.
    @param deviceClass: a L{DeviceAPI} subclass to serve instead (tests of
        the replayer serve deliberately broken ones).
    @param presence: defaults to this process's memory; several processes
        on one store share one.
    @param sharedThrottles: count wrong pairing codes and control-token
        logins (control port) and app-account logins (device port) in the
        store, so that every process sharing it counts them.
    """
    settings = settings or AppSettings()
    # Every consumer learns of a change from the store's feed, membership
    # first, so the others route by who sees what after it.
    membership = Membership.following(store)
    metrics = Metrics(clock)
    hub = SubscriberHub(
        clock, holdSeconds=settings.holdSeconds, onPushed=metrics.pushed
    )

    def seeing(scope: str, key: str) -> list[str]:
        # Devices, and the apps holding subscribes whose account holds the
        # bucket (PROTOCOL.md §20.3, §20.6).
        apps = [
            subscriber
            for userId in sorted(appsSeeing(membership, scope, key))
            if hub.count(subscriber := appSubscriber(userId))
        ]
        return [*membership.devicesSeeing(scope, key), *apps]

    store.listen(lambda commit: hub.pushCommit(commit, seeing))
    storage = IHistoryStorage(store, None)
    history = None
    if settings.history is not None and storage is not None:
        history = History.following(store, storage, clock, settings.history)
    store.onCommitted = metrics.commitSeconds.observe
    state = DeviceState(store, membership, presence or Presence(clock), clock)
    # One Pairing for both ports: codes shown on one are claimed on the other.
    pairing = Pairing(state, ttlSeconds=settings.entryKeyTtlSeconds)
    # One set of accounts: created on the control port, logged in on the
    # device port (the apps' cloud, PROTOCOL.md §20.6).
    accounts = Accounts(store, clock, runInThread)
    # One Admission for both ports: the device port admits, the control port
    # shows only what it admits.
    admission = Admission(state, settings.admission)
    events = EventStream(clock, store, membership.devicesSeeing, admission.hidden)
    store.listen(events.publish)
    throttles: dict[str, Any] = {}
    if sharedThrottles:
        throttles["claim"] = SharedClaimThrottle(
            clock, store=store, kind=CLAIM_THROTTLE_RECORD
        )
        throttles["login"] = SharedClaimThrottle(
            clock, store=store, kind=LOGIN_THROTTLE_RECORD
        )
    device = deviceClass(
        **({"loginThrottle": throttles["login"]} if throttles else {}),
        state=state,
        hub=hub,
        pairing=pairing,
        weather=WeatherService(
            weatherSource or NoWeather(), clock, ttlSeconds=settings.weatherTtlSeconds
        ),
        logs=logs or LogStore(None, clock),
        runInThread=runInThread,
        settings=settings.transport,
        accounts=accounts,
        admission=admission,
        metrics=metrics,
    )
    control = ControlAPI(
        **({"throttle": throttles["claim"]} if throttles else {}),
        state=state,
        hub=hub,
        pairing=pairing,
        events=events,
        settings=settings.control,
        accounts=accounts,
        admission=admission,
        metrics=metrics,
        history=history,
    )
    metrics.watch(
        StateSources(
            held=hub.total,
            serials=membership.knownSerials,
            online=lambda serials: sum(
                isAvailable(
                    state, hub, serial, settings.control.unavailableAfterSeconds
                )
                for serial in serials
            ),
            readings=lambda serials: _readings(store, serials),
            databaseBytes=None if storage is None else storage.databaseBytes,
        )
    )
    return Apps(
        store,
        hub,
        state,
        pairing,
        events,
        device,
        control,
        accounts,
        metrics,
        history,
    )


def _readings(store: IBucketStore, serials: Sequence[str]) -> list[Reading]:
    """Each device's current temperature, target and humidity, as sampled."""
    readings = []
    for serial in serials:
        shared = store.get(serial, f"shared.{serial}")
        device = store.get(serial, f"device.{serial}")
        values = sampleValues(
            {} if shared is None else shared.value,
            {} if device is None else device.value,
        )
        numbers = [
            value if isinstance(value, float) else None
            for value in (values["temperature"], values["target"], values["humidity"])
        ]
        readings.append(Reading(serial, *numbers))
    return readings
