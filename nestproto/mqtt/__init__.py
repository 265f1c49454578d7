# -*- test-case-name: tests.test_mqtt_bridge -*-
"""
MQTT with Home Assistant discovery: L{bridgeService} connects a wired
nestproto to a broker.

 - L{packets}: the MQTT 3.1.1 packets, no I/O;
 - L{client}: the connection, its protocol and reconnection;
 - L{homeassistant}: topics and payloads, no I/O;
 - L{bridge}: the feed consumer and the command entry.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen
from twisted.application.internet import backoffPolicy

from ..admission import Admission
from ..control.status import DEFAULT_UNAVAILABLE_AFTER_SECONDS
from ..hub import SubscriberHub
from ..state import DeviceState
from .bridge import MQTTBridge
from .client import BrokerConnection, BrokerSettings, MQTTClientProtocol, clientId
from .homeassistant import Topics
from .packets import Will

__all__ = [
    "BrokerConnection",
    "BrokerSettings",
    "MQTTBridge",
    "MQTTSettings",
    "Topics",
    "bridgeService",
]


@frozen(kw_only=True)
class MQTTSettings:
    """What the user chose for MQTT (C{--mqtt} and the options after it)."""

    broker: BrokerSettings
    prefix: str = "nestproto"
    discoveryPrefix: str = "homeassistant"
    unavailableAfterSeconds: float = DEFAULT_UNAVAILABLE_AFTER_SECONDS
    #: Seconds before reconnect attempt N (1, 2, ...).
    retryDelay: Callable[[int], float] = backoffPolicy(initialDelay=1.0, maxDelay=60.0)
    flushDelaySeconds: float = 0.05


def bridgeService(
    state: DeviceState,
    hub: SubscriberHub,
    settings: MQTTSettings,
    reactor: object,
    admission: Admission,
) -> BrokerConnection:
    """
    The bridge, listening to C{state}'s store, and the service that keeps
    its connection (start it to connect).

    @param admission: which devices the control side shows; MQTT shows the
        same ones.
    """
    topics = Topics(settings.prefix, settings.discoveryPrefix)
    bridge = MQTTBridge(
        state,
        hub,
        topics,
        admission=admission,
        unavailableAfterSeconds=settings.unavailableAfterSeconds,
        flushDelaySeconds=settings.flushDelaySeconds,
    )
    state.store.listen(bridge.commitArrived)
    broker = settings.broker
    will = Will(topics.status, b"offline")
    name = clientId()

    def makeProtocol() -> MQTTClientProtocol:
        return MQTTClientProtocol(
            state.clock, name, bridge, broker.username, broker.password, will
        )

    return BrokerConnection(
        clock=state.clock,
        broker=broker,
        endpoint=broker.endpoint(reactor),
        makeProtocol=makeProtocol,
        connected=bridge.connected,
        disconnected=bridge.disconnected,
        stopping=bridge.stopping,
        retryDelay=settings.retryDelay,
    )
