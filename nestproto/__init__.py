"""
nestproto: a Twisted server for the Nest Learning Thermostat's cloud protocol.
"""

from ._version import __version__
from .buckets import Bucket
from .hub import SubscriberHub
from .state import DeviceState
from .store import IBucketStore, SQLiteStore

__all__ = [
    "Bucket",
    "DeviceState",
    "IBucketStore",
    "SQLiteStore",
    "SubscriberHub",
    "__version__",
]
