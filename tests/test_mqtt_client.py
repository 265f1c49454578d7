# -*- test-case-name: tests.test_mqtt_client -*-
"""
The MQTT client's protocol on a StringTransport, and the connection that
keeps it up, on a Clock.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from nestproto.mqtt import packets
from nestproto.mqtt.client import (
    CONNACK_TIMEOUT_SECONDS,
    STOP_SECONDS,
    BrokerConnection,
    BrokerRefused,
    BrokerSettings,
    MQTTClientProtocol,
)
from nestproto.mqtt.packets import Publish, Will

ACCEPTED = b"\x20\x02\x00\x00"
BAD_PASSWORD = b"\x20\x02\x00\x04"


class Listener:
    def __init__(self) -> None:
        self.messages: list[tuple[Publish, float]] = []
        self.writableCalls = 0

    def messageReceived(self, message: Publish, receivedAt: float) -> None:
        self.messages.append((message, receivedAt))

    def writable(self) -> None:
        self.writableCalls += 1


def connected(
    clock: Clock, listener: Listener | None = None
) -> tuple[MQTTClientProtocol, StringTransport]:
    protocol = MQTTClientProtocol(
        clock,
        "nestproto-test",
        listener or Listener(),
        "user",
        "secret",
        Will("p/status", b"offline"),
        keepAliveSeconds=30,
    )
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class ProtocolTests(SynchronousTestCase):
    def test_connectThenReady(self) -> None:
        """
        The protocol sends CONNECT at once and is ready when the broker
        accepts; the transport's producer is the protocol.
        """
        clock = Clock()
        protocol, transport = connected(clock)
        self.assertEqual(
            transport.value(),
            packets.connect(
                "nestproto-test", 30, "user", "secret", Will("p/status", b"offline")
            ),
        )
        self.assertIs(transport.producer, protocol)
        self.assertNoResult(protocol.ready)
        protocol.dataReceived(ACCEPTED)
        self.assertIs(self.successResultOf(protocol.ready), protocol)
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # the keep-alive

    def test_refused(self) -> None:
        """A refusal fails C{ready} with the reason and ends the connection."""
        protocol, transport = connected(Clock())
        protocol.dataReceived(BAD_PASSWORD)
        failure = self.failureResultOf(protocol.ready, BrokerRefused)
        self.assertEqual(str(failure.value), "bad user name or password")
        self.assertTrue(transport.disconnecting)

    def test_noConnack(self) -> None:
        """A broker that does not answer CONNECT is left after 10 s."""
        clock = Clock()
        protocol, transport = connected(clock)
        clock.advance(CONNACK_TIMEOUT_SECONDS)
        self.assertTrue(transport.disconnecting)

    def test_keepAlive(self) -> None:
        """
        A PINGREQ goes out every keep-alive interval; without a PINGRESP by
        the next one the connection is dropped.
        """
        clock = Clock()
        protocol, transport = connected(clock)
        protocol.dataReceived(ACCEPTED)
        transport.clear()
        clock.advance(30)
        self.assertEqual(transport.value(), packets.PINGREQ_PACKET)
        protocol.dataReceived(b"\xd0\x00")
        clock.advance(30)
        self.assertFalse(transport.disconnecting)
        clock.advance(30)
        self.assertTrue(transport.disconnecting)

    def test_qos1Acknowledged(self) -> None:
        """
        A QoS 1 message is acknowledged and handed on with the time it was
        read; a message split over reads arrives once whole.
        """
        clock = Clock()
        clock.advance(100)
        listener = Listener()
        protocol, transport = connected(clock, listener)
        protocol.dataReceived(ACCEPTED)
        transport.clear()
        data = packets.publish("p/s/ha/mode/set", b"heat", qos=1, packetId=5)
        protocol.dataReceived(data[:4])
        self.assertEqual(listener.messages, [])
        protocol.dataReceived(data[4:])
        [(message, at)] = listener.messages
        self.assertEqual(
            (message.topic, message.payload, at), ("p/s/ha/mode/set", b"heat", 100)
        )
        self.assertEqual(transport.value(), packets.puback(5))

    def test_subscribe(self) -> None:
        """C{subscribe} fires with what SUBACK grants."""
        protocol, transport = connected(Clock())
        protocol.dataReceived(ACCEPTED)
        transport.clear()
        d = protocol.subscribe([("p/+/+/+/set", 1)])
        self.assertEqual(transport.value(), packets.subscribe(1, [("p/+/+/+/set", 1)]))
        protocol.dataReceived(b"\x90\x03\x00\x01\x01")
        self.assertEqual(self.successResultOf(d), [1])

    def test_malformed(self) -> None:
        """Garbage from the broker ends the connection with one warning."""
        protocol, transport = connected(Clock())
        protocol.dataReceived(ACCEPTED)
        with capturedLogs() as events:
            protocol.dataReceived(b"\xf0\x00")
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e["log_level"].name for e in events], ["warn"])

    def test_backpressure(self) -> None:
        """Paused by the transport, the protocol says so; resumed, it tells."""
        listener = Listener()
        protocol, transport = connected(Clock(), listener)
        protocol.pauseProducing()
        self.assertTrue(protocol.paused)
        protocol.resumeProducing()
        self.assertFalse(protocol.paused)
        self.assertEqual(listener.writableCalls, 1)

    def test_disconnect(self) -> None:
        """A clean disconnect says DISCONNECT, so the will is not sent."""
        protocol, transport = connected(Clock())
        protocol.dataReceived(ACCEPTED)
        transport.clear()
        protocol.disconnect()
        self.assertEqual(transport.value(), packets.DISCONNECT_PACKET)
        self.assertTrue(transport.disconnecting)


class BrokerSettingsTests(SynchronousTestCase):
    def test_url(self) -> None:
        """The URL gives host, port, TLS and credentials (percent-decoded)."""
        broker = BrokerSettings.fromURL("mqtts://ha%40home:p%3Ass@broker.lan")
        self.assertEqual(
            (broker.host, broker.port, broker.tls, broker.username, broker.password),
            ("broker.lan", 8883, True, "ha@home", "p:ss"),
        )
        self.assertEqual(broker.describe(), "mqtts://ha@home@broker.lan:8883")
        self.assertNotIn("p:ss", repr(broker))
        plain = BrokerSettings.fromURL("mqtt://10.0.0.2")
        self.assertEqual((plain.port, plain.tls, plain.username), (1883, False, None))

    def test_badURLs(self) -> None:
        """A URL that is not a broker's is refused with a reason."""
        for url in [
            "http://host",
            "mqtt://",
            "mqtt://host:99999",
            "mqtt://host/path",
            "mqtt://host?ca=x",
        ]:
            self.assertRaises(ValueError, BrokerSettings.fromURL, url)


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """Connects to StringTransports, or fails, as the test says."""

    def __init__(self) -> None:
        self.refuse = False
        self.transports: list[StringTransport] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        if self.refuse:
            return fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1883))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)


class ConnectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = ScriptedEndpoint()
        self.connected: list[MQTTClientProtocol] = []
        self.disconnects = 0
        self.protocols: list[MQTTClientProtocol] = []

        def makeProtocol() -> MQTTClientProtocol:
            protocol = MQTTClientProtocol(self.clock, "id", Listener())
            self.protocols.append(protocol)
            return protocol

        def disconnected() -> None:
            self.disconnects += 1

        self.connection = BrokerConnection(
            clock=self.clock,
            broker=BrokerSettings("broker", 1883, username="u", password="p"),
            endpoint=self.endpoint,
            makeProtocol=makeProtocol,
            connected=self.connected.append,
            disconnected=disconnected,
            retryDelay=lambda attempt: 2.0**attempt,
        )

    def test_retriesWithBackoffLoggingOnce(self) -> None:
        """
        An unreachable broker is retried with growing delays and logged
        once; connecting logs once more, and nothing is left running after
        a stop.
        """
        self.endpoint.refuse = True
        with capturedLogs() as events:
            self.connection.startService()
            delays = []
            for _attempt in range(3):
                [call] = self.clock.getDelayedCalls()
                delays.append(call.getTime() - self.clock.seconds())
                self.clock.advance(delays[-1])
            self.endpoint.refuse = False
            [call] = self.clock.getDelayedCalls()
            self.clock.advance(call.getTime() - self.clock.seconds())
            self.protocols[-1].dataReceived(ACCEPTED)
        self.assertEqual(delays, [2.0, 4.0, 8.0])
        self.assertEqual(
            [(e["log_level"].name, e["log_format"].split(" ")[1]) for e in events],
            [("warn", "broker"), ("info", "connected")],
        )
        self.assertEqual(self.connected, [self.protocols[-1]])
        self.connection.stopService()
        self.assertTrue(self.endpoint.transports[-1].disconnecting)
        self.protocols[-1].connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.disconnects, 0)

    def test_wrongPasswordOneLine(self) -> None:
        """A broker refusing the password is retried, with one log line."""
        with capturedLogs() as events:
            self.connection.startService()
            for _attempt in range(3):
                self.protocols[-1].dataReceived(BAD_PASSWORD)
                self.protocols[-1].connectionLost(Failure(ConnectionRefusedError()))
                [call] = self.clock.getDelayedCalls()
                self.clock.advance(call.getTime() - self.clock.seconds())
        [event] = events
        self.assertEqual(event["log_level"].name, "warn")
        self.assertIn("bad user name or password", event["problem"])
        self.assertIn("mqtt-password", event["problem"])
        self.assertEqual(len(self.protocols), 4)
        self.assertEqual(self.connected, [])
        self.connection.stopService()

    def test_lostThenReconnected(self) -> None:
        """A lost connection is reported and made again."""
        self.connection.startService()
        self.protocols[-1].dataReceived(ACCEPTED)
        self.protocols[-1].connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.disconnects, 1)
        [call] = self.clock.getDelayedCalls()
        self.clock.advance(call.getTime() - self.clock.seconds())
        self.protocols[-1].dataReceived(ACCEPTED)
        self.assertEqual(self.connected, self.protocols)
        self.connection.stopService()

    def test_stopGivesUp(self) -> None:
        """
        A clean stop says offline and DISCONNECT; a broker that takes
        nothing more is dropped after 5 s, so the stop ends.
        """
        said: list[MQTTClientProtocol] = []
        self.connection.stopping = said.append
        self.connection.startService()
        protocol = self.protocols[-1]
        protocol.dataReceived(ACCEPTED)
        stopped = self.connection.stopService()
        self.assertEqual(said, [protocol])
        self.assertNoResult(stopped)
        transport = self.endpoint.transports[-1]
        self.assertFalse(transport.disconnected)
        self.clock.advance(STOP_SECONDS)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
