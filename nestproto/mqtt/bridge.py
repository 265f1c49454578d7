# -*- test-case-name: tests.test_mqtt_bridge -*-
"""
The MQTT bridge: committed changes from the store's feed go out as
retained topics (raw buckets, Home Assistant states and discovery), and
commands on C{/set} topics go through the command layer like C{/command}.

The feed listener only notes which devices changed; what they publish is
worked out a moment later, a bounded number of devices per reactor turn,
and only topics whose payload changed are sent. So a burst of puts costs
the device port a set insertion per commit, and a broker that is slow or
gone costs it nothing: while the connection's buffer is full (or there is
no connection) nothing is written, and on every (re)connect everything is
published again from committed state.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from typing import Protocol as TypingProtocol

from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._version import __version__
from ..admission import Admission
from ..buckets import Bucket
from ..control import commands
from ..control.commands import CommandError, Plan
from ..control.events import serialsChangedBy
from ..control.status import DEFAULT_UNAVAILABLE_AFTER_SECONDS, isAvailable
from ..errors import NestError
from ..hub import SubscriberHub
from ..membership import GLOBAL_SCOPE
from ..model import Commit
from ..state import DeviceState
from . import homeassistant as ha
from .homeassistant import Thermostat, Topics, topicSafe
from .packets import Publish

#: Commands waiting longer than this are dropped: a thermostat should not
#: jump to a setpoint someone chose minutes ago. MQTT 3.1.1 messages carry
#: no time, so a command's age counts from when the bridge read it. Older
#: ones cannot reach us otherwise: the session is clean (the broker keeps
#: nothing for us while we are away) and retained messages on C{/set}
#: topics, which may be any age, are ignored.
MAX_COMMAND_AGE_SECONDS = 30.0
#: Commands of one device run one after the other (the second of a
#: low/high pair must see the first); this many may wait.
MAX_QUEUED_COMMANDS = 16
#: Devices published per reactor turn: a (re)connect with thousands of
#: devices must not hold the reactor.
DEVICES_PER_TURN = 25
#: A device published less than this long ago waits until then: under a
#: stream of puts its topics go out about once a second, not once a put.
MIN_INTERVAL_SECONDS = 1.0
#: How often availability and timers (time to target, fan timer) are
#: looked at again.
REFRESH_SECONDS = 15.0
#: Raw buckets published, with a topic per field.
RAW_BUCKETS = ("device", "shared")
_RANGE_PARTNER = {
    "target_temperature_low": ("low", "high", "target_temperature_high"),
    "target_temperature_high": ("high", "low", "target_temperature_low"),
}
_HA_MODES = {"off": "off", "heat": "heat", "cool": "cool", "heat_cool": "range"}


class Publisher(TypingProtocol):
    """What the bridge uses of a connection (an L{Publisher})."""

    @property
    def paused(self) -> bool:
        """The connection's buffer is full: publish nothing more for now."""

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None: ...

    def subscribe(self, filters: Sequence[tuple[str, int]]) -> Deferred[list[int]]: ...


@define
class _Published:
    """What the broker holds of one device, as this connection sent it."""

    raw: dict[str, dict[str, Any]] = field(factory=dict)
    ha: dict[str, str] = field(factory=dict)
    availability: str | None = None
    #: The discovery topics published, and what their configs were made of.
    discovery: list[str] = field(factory=list)
    discoveryInputs: tuple[object, ...] | None = None


@frozen
class _Command:
    topic: str
    serial: str
    receivedAt: float
    #: Planned when its turn comes, against state as it is then.
    plan: Callable[[], Plan]
    what: str


@define
class MQTTBridge:
    """
    Feed consumer and command entry of the MQTT connection; the
    L{MessageListener} of its protocol.
    """

    log = Logger()

    state: DeviceState
    hub: SubscriberHub
    topics: Topics = field(factory=Topics)
    #: Which devices are published and commanded: those the control side
    #: shows (with pairing required, only claimed ones).
    admission: Admission = field(
        default=Factory(lambda self: Admission(self.state), takes_self=True)
    )
    unavailableAfterSeconds: float = DEFAULT_UNAVAILABLE_AFTER_SECONDS
    #: How long changes gather before they are published.
    flushDelaySeconds: float = 0.05
    minIntervalSeconds: float = MIN_INTERVAL_SECONDS
    refreshSeconds: float = REFRESH_SECONDS
    version: str = __version__
    client: Publisher | None = field(default=None, init=False)
    _published: dict[str, _Published] = field(factory=dict, init=False, repr=False)
    _dirty: dict[str, None] = field(factory=dict, init=False, repr=False)
    _rediscover: set[str] = field(factory=set, init=False, repr=False)
    _ticking: set[str] = field(factory=set, init=False, repr=False)
    _flushCall: IDelayedCall | None = field(default=None, init=False, repr=False)
    #: When each device was last published, and those changed since that
    #: wait for L{_laterCall}.
    _lastPublished: dict[str, float] = field(factory=dict, init=False, repr=False)
    _later: set[str] = field(factory=set, init=False, repr=False)
    _laterCall: IDelayedCall | None = field(default=None, init=False, repr=False)
    _refresh: LoopingCall | None = field(default=None, init=False, repr=False)
    _queues: dict[str, deque[_Command]] = field(factory=dict, init=False, repr=False)

    @property
    def clock(self) -> IReactorTime:
        return self.state.clock

    # The connection

    def connected(self, client: Publisher) -> None:
        """A new connection: subscribe, then publish everything again."""
        self.client = client
        self._published.clear()
        client.publish(self.topics.status, b"online", retain=True)
        # The climate configs come back retained: those of devices removed
        # while there was no connection are found and cleared that way.
        client.subscribe(
            [
                (self.topics.commands, 1),
                (self.topics.homeAssistantStatus, 0),
                (self.topics.climates, 0),
            ]
        ).addCallbacks(self._subscribed, lambda failure: None)
        self._markAll(rediscover=True)
        refresh = LoopingCall(self._refreshAll)
        refresh.clock = self.clock
        refresh.start(self.refreshSeconds, now=False)
        self._refresh = refresh

    def disconnected(self) -> None:
        """The connection is gone: nothing is published until the next one."""
        self.client = None
        self._published.clear()
        self._dirty.clear()
        self._rediscover.clear()
        self._ticking.clear()
        self._later.clear()
        self._lastPublished.clear()
        for call in (self._flushCall, self._laterCall):
            if call is not None and call.active():
                call.cancel()
        self._flushCall = self._laterCall = None
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        self._refresh = None

    def stopping(self, client: Publisher) -> None:
        """A clean stop: say offline ourselves, as the will is not sent then."""
        client.publish(self.topics.status, b"offline", retain=True)
        self.disconnected()

    def writable(self) -> None:
        if self._dirty:
            self._scheduleFlush(0)

    def _subscribed(self, granted: list[int]) -> None:
        if 0x80 in granted:
            self.log.warn(
                "MQTT broker refused a subscription ({filters}): commands "
                "or Home Assistant restarts will not be seen",
                filters=", ".join(
                    (
                        self.topics.commands,
                        self.topics.homeAssistantStatus,
                        self.topics.climates,
                    )
                ),
            )

    # Publishing

    def commitArrived(self, commit: Commit) -> None:
        """A feed listener: note the devices whose topics may change."""
        if self.client is None:
            return
        recently = self.clock.seconds() - self.minIntervalSeconds
        for serial in serialsChangedBy(
            commit, self.state.membership.devicesSeeing, self.admission.hidden
        ):
            if self._lastPublished.get(serial, recently) > recently:
                self._later.add(serial)
            else:
                self._dirty[serial] = None
        if self._dirty:
            self._scheduleFlush(self.flushDelaySeconds)
        if self._later and self._laterCall is None:
            self._laterCall = self.clock.callLater(
                self.minIntervalSeconds, self._publishLater
            )

    def _publishLater(self) -> None:
        self._laterCall = None
        self._dirty.update(dict.fromkeys(self._later))
        self._later.clear()
        self._scheduleFlush(0)

    def _markAll(self, rediscover: bool) -> None:
        serials = self.state.membership.knownSerials()
        self._dirty.update(dict.fromkeys(serials))
        if rediscover:
            self._rediscover.update(serials)
        self._scheduleFlush(0)

    def _scheduleFlush(self, delay: float) -> None:
        if self._flushCall is None and self.client is not None:
            self._flushCall = self.clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        client = self.client
        done = 0
        while self._dirty and client is not None and not client.paused:
            if done == DEVICES_PER_TURN:
                self._scheduleFlush(0)
                return
            serial = next(iter(self._dirty))
            del self._dirty[serial]
            self._later.discard(serial)
            self._lastPublished[serial] = self.clock.seconds()
            try:
                self._publishDevice(client, serial)
            except Exception:
                # Our bug; the other devices are still published.
                self.log.failure("MQTT: publishing {serial} failed", serial=serial)
            done += 1

    def _refreshAll(self) -> None:
        """Availability and running timers change without a commit."""
        for serial, published in self._published.items():
            if serial in self._ticking or published.availability != self._availability(
                serial
            ):
                self._dirty[serial] = None
        if self._dirty:
            self._scheduleFlush(0)

    def _availability(self, serial: str) -> str:
        available = isAvailable(
            self.state, self.hub, serial, self.unavailableAfterSeconds
        )
        return "online" if available else "offline"

    def _value(self, scope: str, key: str) -> dict[str, Any] | None:
        bucket = self.state.store.get(scope, key)
        return None if bucket is None else bucket.value

    def _publishDevice(self, client: Publisher, serial: str) -> None:
        if not topicSafe(serial):
            return
        membership = self.state.membership
        if not self.admission.shown(serial):
            self._clear(client, serial)
            return
        published = self._published.setdefault(serial, _Published())
        publish = client.publish
        topics = self.topics
        values: dict[str, dict[str, Any]] = {}
        for bucketType in RAW_BUCKETS:
            value = self._value(serial, f"{bucketType}.{serial}")
            if value is None:
                continue
            values[bucketType] = value
            before = published.raw.get(bucketType)
            if before is value:
                continue
            publish(topics.bucket(serial, bucketType), ha.bucketPayload(value), True)
            for name, fieldValue in value.items():
                if before is not None and name in before and before[name] == fieldValue:
                    continue
                if topicSafe(name):
                    publish(
                        topics.field(serial, bucketType, name),
                        ha.fieldPayload(fieldValue),
                        True,
                    )
            for name in set(before or ()) - set(value):
                if topicSafe(name):
                    publish(topics.field(serial, bucketType, name), b"", True)
            published.raw[bucketType] = value
        nowS = self.clock.seconds()
        device = values.get("device", {})
        thermostat = Thermostat(
            serial,
            device,
            values.get("shared", {}),
            self._value(GLOBAL_SCOPE, membership.structureKey(serial)) or {},
            commands.safetyBounds(device),
        )
        states = ha.states(thermostat, nowS)
        for name, payload in states.items():
            if published.ha.get(name) != payload:
                publish(topics.ha(serial, name), payload.encode("utf-8"), True)
        for name in set(published.ha) - set(states):
            publish(topics.ha(serial, name), b"", True)
        published.ha = states
        if ha.timeDependent(thermostat, nowS):
            self._ticking.add(serial)
        else:
            self._ticking.discard(serial)
        availability = self._availability(serial)
        if availability != published.availability:
            publish(topics.availability(serial), availability.encode("ascii"), True)
            published.availability = availability
        inputs = ha.discoveryInputs(thermostat)
        if serial in self._rediscover or inputs != published.discoveryInputs:
            if serial in self._rediscover:
                self._rediscover.discard(serial)
                for topic in topics.peerOnlyTopics(serial):
                    publish(topic, b"", True)
            configs = ha.discovery(thermostat, topics, self.version)
            for topic, config in configs:
                publish(topic, json.dumps(config, sort_keys=True).encode(), True)
            published.discovery = [topic for topic, config in configs]
            published.discoveryInputs = inputs

    def _clear(self, client: Publisher, serial: str) -> None:
        """
        A removed device: empty retained payloads on its discovery topics
        (Home Assistant then removes its entities) and on every topic this
        connection published for it.
        """
        self._rediscover.discard(serial)
        self._ticking.discard(serial)
        self._lastPublished.pop(serial, None)
        published = self._published.pop(serial, None)
        if published is None:
            return
        topics = self.topics
        gone = list(published.discovery)
        for bucketType, value in published.raw.items():
            gone.append(topics.bucket(serial, bucketType))
            gone.extend(
                topics.field(serial, bucketType, name)
                for name in value
                if topicSafe(name)
            )
        gone.extend(topics.ha(serial, name) for name in published.ha)
        gone.append(topics.availability(serial))
        for topic in gone:
            client.publish(topic, b"", True)
        self.log.info("MQTT: removed {serial}'s topics", serial=serial)

    # Commands

    def messageReceived(self, message: Publish, receivedAt: float) -> None:
        """A message on a subscribed topic: a command or HA's birth."""
        topic = message.topic
        if topic == self.topics.homeAssistantStatus:
            # A retained birth is an old one; everything was sent on connect.
            if not message.retain and message.payload.strip() == b"online":
                self.log.info(
                    "Home Assistant announced itself; publishing discovery again"
                )
                self._markAll(rediscover=True)
            return
        stale = self.topics.climateSerial(topic)
        if stale is not None:
            if message.retain and message.payload:
                self._staleConfig(stale, message.payload)
            return
        parsed = self.topics.parseCommand(topic)
        if parsed is None:
            return
        if message.retain:
            self.log.warn(
                "MQTT: ignored the retained command on {topic} (a retained "
                "command may be any age; publish commands without retain)",
                topic=topic,
            )
            return
        if message.truncated:
            self.log.warn("MQTT: ignored the oversized command on {topic}", topic=topic)
            return
        serial, bucketType, name = parsed
        if not self.admission.shown(serial):
            self._refused(topic, f"no device {serial} is shown")
            return
        try:
            value = _payloadValue(message.payload)
            if bucketType == "ha":
                command = self._haCommand(serial, name, value)
            else:
                command = self._rawCommand(serial, bucketType, name, value)
        except CommandError as e:
            self._refused(topic, str(e))
            return
        self._enqueue(_Command(topic, serial, receivedAt, *command))

    def _staleConfig(self, serial: str, payload: bytes) -> None:
        """
        A retained climate config: if it is ours (its unique id) and its
        device is gone, clear the device's configs and availability.
        """
        if self.client is None or self.admission.shown(serial):
            return
        try:
            config = json.loads(payload)
        except ValueError:
            return
        if not isinstance(config, dict) or config.get("unique_id") != (
            f"{self.topics.uniquePrefix}_{serial}"
        ):
            return
        for topic in (
            *self.topics.discoveryTopics(serial),
            *self.topics.peerOnlyTopics(serial),
            self.topics.availability(serial),
        ):
            self.client.publish(topic, b"", True)
        self.log.info(
            "MQTT: cleared the discovery of {serial}, which is no longer known",
            serial=serial,
        )

    def _refused(self, topic: str, why: str) -> None:
        self.log.warn("MQTT command on {topic} refused: {why}", topic=topic, why=why)

    def _planner(
        self, serial: str, command: str, value: object
    ) -> tuple[Callable[[], Plan], str]:
        return (lambda: commands.plan(self.state, serial, command, value)), command

    def _haCommand(
        self, serial: str, name: str, value: object
    ) -> tuple[Callable[[], Plan], str]:
        if name == "mode":
            mode = _HA_MODES.get(value) if isinstance(value, str) else None
            if mode is None:
                raise CommandError(f"mode must be one of {', '.join(_HA_MODES)}")
            return self._planner(serial, "set_mode", mode)
        if name == "target_temperature":
            return self._planner(serial, "set_temperature", value)
        if name in _RANGE_PARTNER:
            return self._rangePlanner(serial, name, value)
        if name == "fan_mode":
            if value not in ha.FAN_MODES:
                raise CommandError(f"fan_mode must be one of {', '.join(ha.FAN_MODES)}")
            return self._planner(serial, "set_fan", value)
        if name == "preset":
            # The eco the cloud can switch is the structure's (set_away),
            # so eco and away both set it; home leaves it.
            if value not in ha.PRESETS:
                raise CommandError(f"preset must be one of {', '.join(ha.PRESETS)}")
            return self._planner(serial, "set_away", value != "home")
        raise CommandError(f"ha/{name} is not a command")

    def _rangePlanner(
        self, serial: str, name: str, value: object
    ) -> tuple[Callable[[], Plan], str]:
        """
        One end of the heat-cool range; the other is kept as stored, unless
        the new end would cross it, when it moves along.
        """
        end, otherEnd, otherName = _RANGE_PARTNER[name]
        if not ha.isNumber(value):
            raise CommandError(f"{name} must be a number")
        assert isinstance(value, int | float)

        def planned() -> Plan:
            shared = self._value(serial, f"shared.{serial}") or {}
            other = shared.get(otherName)
            if not ha.isNumber(other):
                other = value
            if (end == "low" and value > other) or (end == "high" and value < other):
                other = value
            return commands.plan(
                self.state, serial, "set_temperature", {end: value, otherEnd: other}
            )

        return planned, "set_temperature"

    def _rawCommand(
        self, serial: str, bucketType: str, name: str, value: object
    ) -> tuple[Callable[[], Plan], str]:
        if bucketType == "shared":
            if name == "target_temperature":
                return self._planner(serial, "set_temperature", value)
            if name in _RANGE_PARTNER:
                return self._rangePlanner(serial, name, value)
            if name == "target_temperature_type":
                return self._planner(serial, "set_mode", value)
            if name == "schedule_mode":
                return self._planner(serial, "set_schedule_mode", value)
        elif bucketType == "device":
            if name in ("away_temperature_low", "away_temperature_high"):
                end = name.rsplit("_", 1)[1]
                return self._planner(serial, "set_eco_temperatures", {end: value})
            if name in commands.DEVICE_SETTINGS or name in (
                commands.DEVICE_SETTING_ALIASES
            ):
                return self._planner(serial, "set_device_setting", {name: value})
        raise CommandError(
            f"{bucketType}.{name} cannot be set: shared takes target_temperature"
            "(_low/_high), target_temperature_type and schedule_mode; device "
            "takes away_temperature_low/high and the settings of "
            "set_device_setting"
        )

    def _enqueue(self, command: _Command) -> None:
        queue = self._queues.get(command.serial)
        if queue is None:
            self._queues[command.serial] = deque([command])
            self._runNext(command.serial)
        elif len(queue) >= MAX_QUEUED_COMMANDS:
            self._refused(command.topic, "too many commands waiting for this device")
        else:
            queue.append(command)

    def _runNext(self, serial: str) -> None:
        """
        Run C{serial}'s first waiting command; its queue stays (with the
        running command first) until the command's write is done.
        """
        queue = self._queues[serial]
        while queue:
            command = queue[0]
            age = self.clock.seconds() - command.receivedAt
            if age > MAX_COMMAND_AGE_SECONDS:
                self._refused(command.topic, f"dropped after waiting {age:.0f} s")
                queue.popleft()
                continue
            try:
                planned = command.plan()
            except NestError as e:
                self._refused(command.topic, str(e))
                queue.popleft()
                continue
            self.log.info(
                "MQTT {command} for {serial}", command=command.what, serial=serial
            )
            written: Deferred[list[Bucket]] = commands.execute(self.state, planned)
            written.addErrback(self._failed, command)
            written.addBoth(self._ran, serial)
            return
        del self._queues[serial]

    def _failed(self, failure: Failure, command: _Command) -> None:
        if failure.check(NestError):
            self._refused(command.topic, failure.getErrorMessage())
        else:
            self.log.failure(
                "MQTT command on {topic} failed", failure, topic=command.topic
            )

    def _ran(self, ignored: object, serial: str) -> None:
        self._queues[serial].popleft()
        self._runNext(serial)


def _payloadValue(payload: bytes) -> object:
    """
    A command's value: JSON (a bare number is JSON too), else the text as a
    string, so C{heat} works as well as C{"heat"}.
    """
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError("the payload is not UTF-8 text") from None
    if not text:
        raise CommandError("the payload is empty")
    try:
        return json.loads(text)
    except ValueError:
        return text
