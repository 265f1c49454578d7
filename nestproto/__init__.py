"""
nestproto: a Twisted server for the Nest Learning Thermostat's cloud protocol.
"""

from ._version import __version__
from .buckets import Bucket
from .control.api import ControlAPI, ControlSettings
from .device.api import DeviceAPI, TransportSettings
from .hub import SubscriberHub
from .pairing import Pairing
from .state import DeviceState
from .store import IBucketStore, SQLiteStore

__all__ = [
    "Bucket",
    "ControlAPI",
    "ControlSettings",
    "DeviceAPI",
    "DeviceState",
    "IBucketStore",
    "Pairing",
    "SQLiteStore",
    "SubscriberHub",
    "TransportSettings",
    "__version__",
]
