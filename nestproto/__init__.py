"""
nestproto: a Twisted server for the Nest Learning Thermostat's cloud protocol.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
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

#: The module of each public name, imported when the name is first used and
#: not with the package: Klein installs Twisted's default reactor when it is
#: imported, and C{twistd --reactor nestproto} imports L{nestproto.reactor}
#: to install its own before that.
_MODULES = {
    "Bucket": ".buckets",
    "ControlAPI": ".control.api",
    "ControlSettings": ".control.api",
    "DeviceAPI": ".device.api",
    "TransportSettings": ".device.api",
    "SubscriberHub": ".hub",
    "Pairing": ".pairing",
    "DeviceState": ".state",
    "IBucketStore": ".store",
    "SQLiteStore": ".store",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_MODULES[name], __name__), name)
    globals()[name] = value
    return value
