# -*- test-case-name: tests.test_service -*-
"""
The one place that wires nestproto's parts together: store, hub, state,
pairing and both HTTP apps. The twistd service, the in-memory replay server
and the tests all build through L{buildApps}, so they serve the same thing.
"""

from __future__ import annotations

from attrs import Factory, frozen
from twisted.internet.interfaces import IReactorTime

from .accounts import Accounts
from .admission import Admission, AdmissionSettings
from .control.api import ControlAPI, ControlSettings
from .control.events import EventStream
from .device.api import DeviceAPI, TransportSettings
from .hub import HOLD_SECONDS, SubscriberHub
from .membership import Membership
from .pairing import DEFAULT_TTL_SECONDS, Pairing
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


def buildApps(
    store: IBucketStore,
    clock: IReactorTime,
    runInThread: ThreadRunner,
    settings: AppSettings | None = None,
    weatherSource: IWeatherSource | None = None,
    logs: LogStore | None = None,
    deviceClass: type[DeviceAPI] = DeviceAPI,
    presence: IPresence | None = None,
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
    """
    settings = settings or AppSettings()
    # Every consumer learns of a change from the store's feed, in this order:
    # membership first, so the others route by who sees what after it.
    membership = Membership.following(store)
    hub = SubscriberHub(clock, holdSeconds=settings.holdSeconds)
    store.listen(lambda commit: hub.pushCommit(commit, membership.devicesSeeing))
    events = EventStream(clock, store, membership.devicesSeeing)
    store.listen(events.publish)
    state = DeviceState(store, membership, presence or Presence(clock), clock)
    # One Pairing for both ports: codes shown on one are claimed on the other.
    pairing = Pairing(state, ttlSeconds=settings.entryKeyTtlSeconds)
    # One set of accounts: created on the control port, logged in on the
    # device port (the apps' cloud, PROTOCOL.md §20.6).
    accounts = Accounts(store, clock, runInThread)
    # One Admission for both ports: the device port admits, the control port
    # shows only what it admits.
    admission = Admission(state, settings.admission)
    device = deviceClass(
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
    )
    control = ControlAPI(
        state=state,
        hub=hub,
        pairing=pairing,
        events=events,
        settings=settings.control,
        accounts=accounts,
        admission=admission,
    )
    return Apps(store, hub, state, pairing, events, device, control, accounts)
