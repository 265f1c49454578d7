# -*- test-case-name: tests.test_mqtt_packets -*-
"""
The MQTT 3.1.1 packets the bridge sends and reads (OASIS MQTT 3.1.1, §2-§3):
CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP and
DISCONNECT, and nothing else. No I/O: bytes in, values out.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from attrs import frozen

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
SUBACK = 9
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

#: The largest remaining length the four-byte encoding can say (§2.2.3).
MAX_REMAINING_LENGTH = 268_435_455
#: What CONNACK's return codes mean (§3.2.2.3).
CONNACK_REASONS = {
    1: "the broker does not speak MQTT 3.1.1",
    2: "the broker refused the client identifier",
    3: "the broker is unavailable",
    4: "bad user name or password",
    # Mosquitto answers a wrong password with this one.
    5: "not authorized (a wrong user name or password, or a user that may not connect)",
}


class MalformedPacket(Exception):
    """Bytes from the broker that are not an MQTT 3.1.1 packet."""


@frozen
class Will:
    """The message the broker publishes for us when we vanish (§3.1.2.5)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@frozen
class Packet:
    """
    One packet as read: its type, the flags of its first byte and its body.

    @ivar truncated: the body was longer than the reader keeps; C{body} is
        its beginning only.
    """

    kind: int
    flags: int
    body: bytes
    truncated: bool = False


@frozen
class Publish:
    """A PUBLISH packet, parsed."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packetId: int | None = None
    truncated: bool = False


def remainingLength(length: int) -> bytes:
    """The variable-length encoding of C{length} (§2.2.3)."""
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"a packet body of {length} bytes cannot be sent")
    encoded = bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def _string(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) > 0xFFFF:
        raise ValueError("an MQTT string holds at most 65535 bytes")
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + remainingLength(len(body)) + body


def checkTopicName(topic: str) -> None:
    """
    Refuse a topic we may not publish to: empty, with a wildcard or a NUL
    (§4.7.1, §4.7.3).
    """
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"{topic!r} is not a topic name")


def connect(
    clientId: str,
    keepAliveSeconds: int,
    username: str | None = None,
    password: str | None = None,
    will: Will | None = None,
    cleanSession: bool = True,
) -> bytes:
    """A CONNECT packet (§3.1)."""
    flags = 0x02 if cleanSession else 0
    payload = _string(clientId)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _string(will.topic) + _string(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            payload += _string(password)
    header = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepAliveSeconds)
    return _packet(CONNECT << 4, header + payload)


def publish(
    topic: str,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    packetId: int | None = None,
    dup: bool = False,
) -> bytes:
    """A PUBLISH packet (§3.3); C{packetId} is required for QoS 1."""
    checkTopicName(topic)
    first = PUBLISH << 4 | (0x08 if dup else 0) | qos << 1 | (1 if retain else 0)
    body = _string(topic)
    if qos:
        if packetId is None:
            raise ValueError("QoS 1 needs a packet identifier")
        body += struct.pack("!H", packetId)
    return _packet(first, body + payload)


def puback(packetId: int) -> bytes:
    """A PUBACK packet (§3.4)."""
    return _packet(PUBACK << 4, struct.pack("!H", packetId))


def subscribe(packetId: int, filters: Sequence[tuple[str, int]]) -> bytes:
    """A SUBSCRIBE packet (§3.8): topic filters and their maximum QoS."""
    body = struct.pack("!H", packetId)
    for topicFilter, qos in filters:
        body += _string(topicFilter) + bytes([qos])
    return _packet(SUBSCRIBE << 4 | 0x02, body)


def parseConnack(packet: Packet) -> tuple[bool, int]:
    """Session present, and the return code (0: accepted)."""
    if len(packet.body) != 2:
        raise MalformedPacket("CONNACK is 2 bytes")
    return bool(packet.body[0] & 1), packet.body[1]


def parseSuback(packet: Packet) -> tuple[int, list[int]]:
    """The packet identifier and the granted QoS (0x80: refused) per filter."""
    if len(packet.body) < 3:
        raise MalformedPacket("SUBACK too short")
    (packetId,) = struct.unpack("!H", packet.body[:2])
    return packetId, list(packet.body[2:])


def parsePuback(packet: Packet) -> int:
    if len(packet.body) != 2:
        raise MalformedPacket("PUBACK is 2 bytes")
    packetId: int = struct.unpack("!H", packet.body)[0]
    return packetId


def parsePublish(packet: Packet) -> Publish:
    """
    A PUBLISH packet's fields. A truncated one keeps its topic and packet
    identifier (so it can still be acknowledged) and the payload's start.
    """
    qos = (packet.flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    body = packet.body
    if len(body) < 2:
        raise MalformedPacket("PUBLISH without a topic")
    (topicLength,) = struct.unpack("!H", body[:2])
    end = 2 + topicLength
    if len(body) < end:
        raise MalformedPacket("PUBLISH topic longer than the packet")
    packetId = None
    if qos:
        if len(body) < end + 2:
            raise MalformedPacket("PUBLISH without its packet identifier")
        (packetId,) = struct.unpack("!H", body[end : end + 2])
        payloadStart = end + 2
    else:
        payloadStart = end
    try:
        topic = body[2:end].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("PUBLISH topic is not UTF-8") from None
    return Publish(
        topic,
        body[payloadStart:],
        qos=qos,
        retain=bool(packet.flags & 0x01),
        dup=bool(packet.flags & 0x08),
        packetId=packetId,
        truncated=packet.truncated,
    )


class PacketReader:
    """
    Splits a byte stream into packets. A packet whose body is longer than
    C{maxBodyBytes} is not kept whole: its first C{keepBytes} (enough for
    the longest topic and a packet identifier) are handed on, marked
    truncated, and the rest is skipped as it arrives, so one huge message
    costs no memory and does not end the connection.
    """

    def __init__(
        self, maxBodyBytes: int = 256 * 1024, keepBytes: int = 0xFFFF + 4
    ) -> None:
        self.maxBodyBytes = maxBodyBytes
        self.keepBytes = keepBytes
        self._buffer = bytearray()
        #: An oversized packet being skipped: (kind, flags, kept, bytes left).
        self._skipping: tuple[int, int, bytes, int] | None = None

    def feed(self, data: bytes) -> list[Packet]:
        """The packets C{data} completes, in order."""
        self._buffer += data
        packets: list[Packet] = []
        while True:
            if self._skipping is not None:
                kind, flags, kept, left = self._skipping
                taken = min(left, len(self._buffer))
                del self._buffer[:taken]
                left -= taken
                if left:
                    self._skipping = (kind, flags, kept, left)
                    return packets
                self._skipping = None
                packets.append(Packet(kind, flags, kept, truncated=True))
                continue
            header = self._header()
            if header is None:
                return packets
            headerBytes, length = header
            first = self._buffer[0]
            kind, flags = first >> 4, first & 0x0F
            if length > self.maxBodyBytes:
                if len(self._buffer) < headerBytes + self.keepBytes:
                    return packets
                kept = bytes(self._buffer[headerBytes : headerBytes + self.keepBytes])
                del self._buffer[: headerBytes + self.keepBytes]
                self._skipping = (kind, flags, kept, length - self.keepBytes)
                continue
            if len(self._buffer) < headerBytes + length:
                return packets
            body = bytes(self._buffer[headerBytes : headerBytes + length])
            del self._buffer[: headerBytes + length]
            packets.append(Packet(kind, flags, body))

    def _header(self) -> tuple[int, int] | None:
        """The fixed header's size and the body's length, once both are here."""
        length = 0
        for index in range(1, 5):
            if index >= len(self._buffer):
                return None
            digit = self._buffer[index]
            length += (digit & 0x7F) << (7 * (index - 1))
            if not digit & 0x80:
                return index + 1, length
        raise MalformedPacket("remaining length longer than 4 bytes")
