# -*- test-case-name: tests.test_mqtt_client -*-
"""
A small MQTT 3.1.1 client on Twisted: the connection to one broker, kept
up with backoff, and the protocol spoken on it.

Why not paho-mqtt: paho's connect is blocking (DNS, TCP and TLS on the
calling thread), its loop and keep-alive read the wall clock, and driving
its socket from the reactor would still leave the connect to a thread. The
bridge needs only a handful of packets (L{packets}), so the client is
Twisted's own: the endpoint connects without blocking (HostnameEndpoint
resolves in the reactor's resolver, TLS is Twisted's), every timer is on
the injected clock, backpressure comes from the transport as an
L{IPushProducer}, and tests drive it with a StringTransport and a Clock.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol as TypingProtocol
from urllib.parse import unquote, urlsplit

from attrs import define, field, frozen
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import packets
from .packets import Publish, Will

#: How long the broker has to answer CONNECT.
CONNACK_TIMEOUT_SECONDS = 10.0
#: PINGREQ this often; no PINGRESP by the next one ends the connection
#: (a half-open TCP connection is found within two intervals).
KEEPALIVE_SECONDS = 30
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
#: How long a clean stop waits for the broker to take the last messages.
STOP_SECONDS = 5.0


class BrokerRefused(Exception):
    """The broker answered CONNECT with a refusal (CONNACK return code)."""

    def __init__(self, code: int) -> None:
        super().__init__(packets.CONNACK_REASONS.get(code, f"return code {code}"))
        self.code = code


@frozen
class BrokerSettings:
    """
    Where the broker is and who we are to it, from C{--mqtt}:
    C{mqtt://[user[:password]@]host[:port]}, or C{mqtts://} for TLS
    (optionally C{?ca=FILE}: trust the CA certificate in FILE instead of
    the system's).
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    caFile: str | None = None

    @classmethod
    def fromURL(cls, url: str) -> BrokerSettings:
        """
        @raise ValueError: with a sentence saying what is wrong.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError("the URL must start with mqtt:// or mqtts://")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        if not parts.hostname:
            raise ValueError("the URL names no host")
        if parts.path not in ("", "/"):
            raise ValueError("the URL must not have a path")
        caFile = None
        for pair in filter(None, parts.query.split("&")):
            name, _, value = pair.partition("=")
            if name != "ca" or not value or scheme != "mqtts":
                raise ValueError("the only query parameter is ca=FILE, with mqtts://")
            caFile = unquote(value)
        return cls(
            host=parts.hostname,
            port=port,
            tls=scheme == "mqtts",
            username=None if parts.username is None else unquote(parts.username),
            password=None if parts.password is None else unquote(parts.password),
            caFile=caFile,
        )

    def describe(self) -> str:
        """The broker's URL without credentials, for the log."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = "" if self.username is None else f"{self.username}@"
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"

    def endpoint(self, reactor: object) -> IStreamClientEndpoint:
        """A client endpoint for the broker, TLS-wrapped for C{mqtts}."""
        tcp = HostnameEndpoint(reactor, self.host, self.port, timeout=15)
        if not self.tls:
            return tcp
        if self.caFile is None:
            options = optionsForClientTLS(self.host)
        else:
            with open(self.caFile, "rb") as f:
                authority = Certificate.loadPEM(f.read())
            options = optionsForClientTLS(self.host, trustRoot=authority)
        return wrapClientTLS(options, tcp)


class MessageListener(TypingProtocol):
    """What the protocol tells of the broker's messages and its own state."""

    def messageReceived(self, message: Publish, receivedAt: float) -> None:
        """A PUBLISH from the broker, read at C{receivedAt} (clock seconds)."""

    def writable(self) -> None:
        """The transport's buffer has drained: publishing may go on."""


@implementer(IPushProducer)
class MQTTClientProtocol(Protocol):
    """
    One MQTT 3.1.1 connection: CONNECT with a clean session, then
    publishing at QoS 0, subscribing, keep-alive and DISCONNECT.

    @ivar ready: fires with the protocol once the broker accepts CONNECT;
        fails with L{BrokerRefused}, or with the reason the connection
        ended before.
    @ivar lost: fires with C{None} once the connection has ended (the
        reason is then L{lostReason}).
    @ivar paused: the transport's buffer is full; publish no more until
        the listener is told L{MessageListener.writable}.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        clientId: str,
        listener: MessageListener,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        keepAliveSeconds: int = KEEPALIVE_SECONDS,
    ) -> None:
        self.clock = clock
        self.clientId = clientId
        self.listener = listener
        self._username = username
        self._password = password
        self.will = will
        self.keepAliveSeconds = keepAliveSeconds
        self.ready: Deferred[MQTTClientProtocol] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.lostReason: Failure | None = None
        self.paused = False
        self.accepted = False
        self._reader = packets.PacketReader()
        self._nextPacketId = 0
        self._subscribing: dict[int, Deferred[list[int]]] = {}
        self._connackTimer: IDelayedCall | None = None
        self._keepAlive: LoopingCall | None = None
        self._awaitingPong = False

    # Protocol

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.transport.write(
            packets.connect(
                self.clientId,
                self.keepAliveSeconds,
                self._username,
                self._password,
                self.will,
            )
        )
        self._connackTimer = self.clock.callLater(
            CONNACK_TIMEOUT_SECONDS, self._noConnack
        )

    def dataReceived(self, data: bytes) -> None:
        receivedAt = self.clock.seconds()
        try:
            for packet in self._reader.feed(data):
                self._handle(packet, receivedAt)
        except packets.MalformedPacket as e:
            self.log.warn("MQTT broker sent a malformed packet: {why}", why=str(e))
            self._abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for timer in (self._connackTimer,):
            if timer is not None and timer.active():
                timer.cancel()
        self._connackTimer = None
        if self._keepAlive is not None and self._keepAlive.running:
            self._keepAlive.stop()
        waiting, self._subscribing = self._subscribing, {}
        for d in waiting.values():
            d.errback(reason)
        if not self.ready.called:
            self.ready.errback(reason)
        self.lostReason = reason
        self.lost.callback(None)

    # IPushProducer: the transport's backpressure

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.listener.writable()

    def stopProducing(self) -> None:
        pass

    # What the bridge does with it

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """
        Publish at QoS 0: on a lost connection everything is republished
        anyway, so acknowledgements would buy nothing.
        """
        assert self.transport is not None
        self.transport.write(packets.publish(topic, payload, retain=retain))

    def subscribe(self, filters: Sequence[tuple[str, int]]) -> Deferred[list[int]]:
        """Subscribe; fires with the QoS granted per filter (0x80: refused)."""
        assert self.transport is not None
        packetId = self._packetId()
        d: Deferred[list[int]] = Deferred()
        self._subscribing[packetId] = d
        self.transport.write(packets.subscribe(packetId, filters))
        return d

    def disconnect(self) -> Deferred[None]:
        """Say DISCONNECT (so the broker drops the will) and close."""
        if self.transport is not None and not self.lost.called:
            self.transport.write(packets.DISCONNECT_PACKET)
            self.transport.loseConnection()
        return self.lost

    # Inside

    def _packetId(self) -> int:
        self._nextPacketId = self._nextPacketId % 0xFFFF + 1
        return self._nextPacketId

    def abort(self) -> None:
        """End the connection at once, dropping what is not yet sent."""
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None and not self.lost.called:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _noConnack(self) -> None:
        self._connackTimer = None
        self.log.warn(
            "MQTT broker did not answer CONNECT in {seconds} s",
            seconds=CONNACK_TIMEOUT_SECONDS,
        )
        self._abort()

    def _handle(self, packet: packets.Packet, receivedAt: float) -> None:
        if not self.accepted:
            if packet.kind != packets.CONNACK:
                raise packets.MalformedPacket("the first packet was not CONNACK")
            self._connack(packet)
            return
        if packet.kind == packets.PUBLISH:
            message = packets.parsePublish(packet)
            if message.qos == 2:
                # Nothing subscribes at QoS 2, so the broker may not send it.
                raise packets.MalformedPacket("PUBLISH at QoS 2")
            if message.qos == 1 and message.packetId is not None:
                assert self.transport is not None
                self.transport.write(packets.puback(message.packetId))
            self.listener.messageReceived(message, receivedAt)
        elif packet.kind == packets.SUBACK:
            packetId, granted = packets.parseSuback(packet)
            waiting = self._subscribing.pop(packetId, None)
            if waiting is not None:
                waiting.callback(granted)
        elif packet.kind == packets.PINGRESP:
            self._awaitingPong = False
        elif packet.kind == packets.PUBACK:
            packets.parsePuback(packet)
        else:
            raise packets.MalformedPacket(f"unexpected packet type {packet.kind}")

    def _connack(self, packet: packets.Packet) -> None:
        if self._connackTimer is not None and self._connackTimer.active():
            self._connackTimer.cancel()
        self._connackTimer = None
        sessionPresent, code = packets.parseConnack(packet)
        if code:
            self.ready.errback(BrokerRefused(code))
            self._abort()
            return
        self.accepted = True
        keepAlive = LoopingCall(self._ping)
        keepAlive.clock = self.clock
        keepAlive.start(self.keepAliveSeconds, now=False)
        self._keepAlive = keepAlive
        self.ready.callback(self)

    def _ping(self) -> None:
        assert self.transport is not None
        if self._awaitingPong:
            self.log.warn("MQTT broker stopped answering pings; reconnecting")
            self._abort()
            return
        self._awaitingPong = True
        self.transport.write(packets.PINGREQ_PACKET)


class _OneConnection(Factory):
    """Builds the one protocol of one connection attempt, without a log line."""

    noisy = False

    def __init__(self, protocol: MQTTClientProtocol) -> None:
        self.protocol_ = protocol

    def buildProtocol(self, addr: IAddress | None) -> MQTTClientProtocol:
        return self.protocol_


def _reason(failure: Failure) -> str:
    error = failure.value
    if isinstance(error, BrokerRefused):
        reason = f"refused the connection: {error}"
        if error.code in (4, 5):
            reason += (
                " (check the user name and password of --mqtt, or the "
                "mqtt-password file in --data)"
            )
        return reason
    if failure.check(ConnectionDone):
        return "closed the connection"
    return failure.getErrorMessage() or type(error).__name__


@define
class BrokerConnection(Service):
    """
    Keeps one connection to the broker up: connects, waits for CONNACK,
    hands the protocol to C{connected}, and after any failure or loss tries
    again with exponential backoff on C{clock}.

    Problems are logged once each: the same reason again (a wrong password
    refused every minute, a broker that stays down) adds no line until the
    connection works or the reason changes.
    """

    log = Logger()

    clock: IReactorTime
    broker: BrokerSettings
    endpoint: IStreamClientEndpoint
    makeProtocol: Callable[[], MQTTClientProtocol]
    connected: Callable[[MQTTClientProtocol], object]
    disconnected: Callable[[], object]
    #: Called with the protocol just before a clean DISCONNECT.
    stopping: Callable[[MQTTClientProtocol], object] = lambda protocol: None
    retryDelay: Callable[[int], float] = field(
        factory=lambda: backoffPolicy(initialDelay=1.0, maxDelay=60.0)
    )
    protocol: MQTTClientProtocol | None = field(default=None, init=False)
    _attempt: int = field(default=0, init=False)
    _attempting: Deferred[MQTTClientProtocol] | None = field(default=None, init=False)
    _pending: MQTTClientProtocol | None = field(default=None, init=False)
    _retry: IDelayedCall | None = field(default=None, init=False)
    _problem: str | None = field(default=None, init=False)

    def startService(self) -> None:
        Service.startService(self)
        self._connect()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempting is not None:
            self._attempting.cancel()
        pending, self._pending = self._pending, None
        if pending is not None and pending.transport is not None:
            pending.transport.abortConnection()  # type: ignore[attr-defined]
        protocol, self.protocol = self.protocol, None
        if protocol is None:
            return succeed(None)
        self.stopping(protocol)
        stopped = protocol.disconnect()
        # A broker that reads nothing would keep the buffer, and so the
        # stop, waiting for ever.
        timer = self.clock.callLater(STOP_SECONDS, protocol.abort)

        def done(result: None) -> None:
            if timer.active():
                timer.cancel()

        return stopped.addCallback(done)

    def _connect(self) -> None:
        self._retry = None
        protocol = self.makeProtocol()
        self._pending = protocol
        attempt: Deferred[MQTTClientProtocol] = self.endpoint.connect(
            _OneConnection(protocol)
        ).addCallback(lambda connected: protocol.ready)
        self._attempting = attempt
        attempt.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: MQTTClientProtocol) -> None:
        self._attempting = self._pending = None
        self._attempt = 0
        self.log.info(
            "MQTT connected to {broker}{again}",
            broker=self.broker.describe(),
            again="" if self._problem is None else " again",
        )
        self._problem = None
        self.protocol = protocol
        protocol.lost.addCallback(self._lost, protocol)
        self.connected(protocol)

    def _lost(self, ignored: None, protocol: MQTTClientProtocol) -> None:
        if self.protocol is not protocol:
            return  # stopped on purpose
        self.protocol = None
        self.disconnected()
        reason = protocol.lostReason or Failure(ConnectionDone())
        self._note(f"connection lost: {_reason(reason)}")
        self._scheduleRetry()

    def _failed(self, reason: Failure) -> None:
        self._attempting = self._pending = None
        if reason.check(CancelledError) or not self.running:
            return
        self._note(_reason(reason))
        self._scheduleRetry()

    def _note(self, problem: str) -> None:
        if problem == self._problem:
            return
        self._problem = problem
        self.log.warn(
            "MQTT broker {broker}: {problem}; retrying with backoff, devices "
            "are served meanwhile",
            broker=self.broker.describe(),
            problem=problem,
        )

    def _scheduleRetry(self) -> None:
        if not self.running:
            return
        self._attempt += 1
        self._retry = self.clock.callLater(
            self.retryDelay(self._attempt), self._connect
        )


def clientId() -> str:
    """
    A client identifier unique to this process: two servers with the same
    one would take the connection from each other in turn (§3.1.4). 23
    characters at most, which every broker must accept (§3.1.3.1).
    """
    return f"nestproto-{os.urandom(6).hex()}"
