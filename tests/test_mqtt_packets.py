# -*- test-case-name: tests.test_mqtt_packets -*-
"""
The MQTT 3.1.1 packets: what goes out byte for byte, and a reader that
splits any chunking of the stream into the same packets.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nestproto.mqtt import packets
from nestproto.mqtt.packets import MalformedPacket, Packet, PacketReader, Will


class EncodingTests(SynchronousTestCase):
    def test_remainingLengthBoundaries(self) -> None:
        """Remaining lengths use 1 to 4 bytes at the boundaries of §2.2.3."""
        for length, encoded in [
            (0, b"\x00"),
            (127, b"\x7f"),
            (128, b"\x80\x01"),
            (16_383, b"\xff\x7f"),
            (16_384, b"\x80\x80\x01"),
            (2_097_151, b"\xff\xff\x7f"),
            (2_097_152, b"\x80\x80\x80\x01"),
            (268_435_455, b"\xff\xff\xff\x7f"),
        ]:
            self.assertEqual(packets.remainingLength(length), encoded)
        self.assertRaises(ValueError, packets.remainingLength, 268_435_456)

    def test_connect(self) -> None:
        """
        CONNECT names MQTT level 4, a clean session, the keep-alive, the
        will (QoS 1, retained) and the credentials, in the order of §3.1.
        """
        packet = packets.connect(
            "id", 30, "user", "pw", Will("p/status", b"offline"), cleanSession=True
        )
        body = (
            b"\x00\x04MQTT\x04"
            + bytes([0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02])
            + b"\x00\x1e"
            + b"\x00\x02id"
            + b"\x00\x08p/status\x00\x07offline"
            + b"\x00\x04user\x00\x02pw"
        )
        self.assertEqual(packet, b"\x10" + bytes([len(body)]) + body)

    def test_connectAnonymous(self) -> None:
        """Without a user name neither credential flag is set."""
        packet = packets.connect("id", 60)
        self.assertEqual(packet, b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02id")

    def test_publish(self) -> None:
        """A retained QoS 0 PUBLISH has no packet identifier."""
        self.assertEqual(
            packets.publish("a/b", b"on", retain=True), b"\x31\x07\x00\x03a/bon"
        )
        self.assertEqual(
            packets.publish("a", b"", qos=1, packetId=7), b"\x32\x05\x00\x01a\x00\x07"
        )

    def test_publishRefusesWildcards(self) -> None:
        """A topic name with a wildcard, a NUL or nothing is refused."""
        for topic in ["", "a/+", "a/#", "a\0b"]:
            self.assertRaises(ValueError, packets.publish, topic, b"")

    def test_subscribe(self) -> None:
        """SUBSCRIBE has the reserved flags 0010 and a QoS byte per filter."""
        self.assertEqual(
            packets.subscribe(1, [("a/+", 1), ("b", 0)]),
            b"\x82\x0c\x00\x01\x00\x03a/+\x01\x00\x01b\x00",
        )


class ParsingTests(SynchronousTestCase):
    def test_publishFields(self) -> None:
        """A QoS 1 PUBLISH gives its topic, id, flags and payload."""
        [packet] = PacketReader().feed(
            packets.publish("p/s/ha/mode/set", b"heat", 1, True, 9, dup=True)
        )
        message = packets.parsePublish(packet)
        self.assertEqual(
            message,
            packets.Publish(
                "p/s/ha/mode/set", b"heat", qos=1, retain=True, dup=True, packetId=9
            ),
        )

    def test_connackAndSuback(self) -> None:
        """CONNACK gives its return code, SUBACK the granted QoS."""
        self.assertEqual(
            packets.parseConnack(Packet(packets.CONNACK, 0, b"\x00\x04")), (False, 4)
        )
        self.assertEqual(
            packets.parseSuback(Packet(packets.SUBACK, 0, b"\x00\x02\x01\x80")),
            (2, [1, 0x80]),
        )
        self.assertRaises(
            MalformedPacket, packets.parseConnack, Packet(packets.CONNACK, 0, b"")
        )

    def test_malformedPublish(self) -> None:
        """A PUBLISH whose topic runs past its end is malformed."""
        self.assertRaises(
            MalformedPacket,
            packets.parsePublish,
            Packet(packets.PUBLISH, 0, b"\x00\x09abc"),
        )
        self.assertRaises(
            MalformedPacket, packets.parsePublish, Packet(packets.PUBLISH, 6, b"\x00")
        )

    def test_lengthOfFiveBytes(self) -> None:
        """A remaining length longer than four bytes is malformed."""
        self.assertRaises(
            MalformedPacket, PacketReader().feed, b"\x30\xff\xff\xff\xff\x01"
        )

    def test_oversizedSkipped(self) -> None:
        """
        A packet above the limit is handed on truncated, with its topic and
        packet id, and the packets after it are read as usual.
        """
        reader = PacketReader(maxBodyBytes=100, keepBytes=20)
        big = packets.publish("t", b"x" * 1000, qos=1, packetId=3)
        stream = big + packets.publish("u", b"small")
        received = []
        for start in range(0, len(stream), 7):
            received.extend(reader.feed(stream[start : start + 7]))
        first, second = received
        self.assertTrue(first.truncated)
        self.assertEqual(len(first.body), 20)
        message = packets.parsePublish(first)
        self.assertEqual((message.topic, message.packetId), ("t", 3))
        self.assertTrue(message.truncated)
        self.assertEqual(packets.parsePublish(second).payload, b"small")


publishes = st.lists(
    st.tuples(
        st.text(
            st.characters(blacklist_characters="+#\0", blacklist_categories=["Cs"]),
            min_size=1,
            max_size=40,
        ),
        st.binary(max_size=300),
        st.booleans(),
    ),
    min_size=1,
    max_size=8,
)


class ReaderProperties(SynchronousTestCase):
    @given(publishes, st.lists(st.integers(1, 50), min_size=1, max_size=20))
    def test_anyChunking(
        self, messages: list[tuple[str, bytes, bool]], cuts: list[int]
    ) -> None:
        """However the stream is cut, the same PUBLISHes come out, in order."""
        stream = b"".join(packets.publish(t, p, retain=r) for t, p, r in messages)
        reader = PacketReader()
        read: list[Packet] = []
        position = 0
        for cut in cuts * (len(stream) // max(sum(cuts), 1) + 1):
            read.extend(reader.feed(stream[position : position + cut]))
            position += cut
            if position >= len(stream):
                break
        read.extend(reader.feed(stream[position:]))
        self.assertEqual(
            [
                (m.topic, m.payload, m.retain)
                for m in (packets.parsePublish(p) for p in read)
            ],
            messages,
        )
