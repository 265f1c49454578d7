# -*- test-case-name: tests.test_device_api -*-
"""
When each device was last heard from, and what it said of itself when it
last booted (PROTOCOL.md §3): what availability and status are shown from.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer


class IPresence(Interface):
    """Last seen times and entry fields of devices."""

    def touch(serial: str) -> None:
        """Note that C{serial} was heard from now."""

    def noteEntry(serial: str, fields: Mapping[str, str]) -> None:
        """Remember what C{serial} said of itself when it last booted."""

    def lastSeen(serial: str) -> float | None:
        """Server time (s) of C{serial}'s last request, if any."""

    def entryFields(serial: str) -> dict[str, str]:
        """The fields of C{serial}'s last entry request (model, firmware...)."""

    def forget(serial: str) -> None:
        """Drop what is known of C{serial} (it was deleted)."""

    def heardFrom() -> list[str]:
        """Every serial heard from, sorted."""


@implementer(IPresence)
@define
class Presence:
    """L{IPresence} kept in this process's memory."""

    clock: IReactorTime
    _lastSeen: dict[str, float] = field(factory=dict, init=False, repr=False)
    _entryFields: dict[str, dict[str, str]] = field(
        factory=dict, init=False, repr=False
    )

    def touch(self, serial: str) -> None:
        self._lastSeen[serial] = self.clock.seconds()

    def noteEntry(self, serial: str, fields: Mapping[str, str]) -> None:
        self.touch(serial)
        self._entryFields[serial] = dict(fields)

    def lastSeen(self, serial: str) -> float | None:
        return self._lastSeen.get(serial)

    def merge(
        self, serial: str, lastSeen: float, fields: Mapping[str, str] | None
    ) -> None:
        """
        Take what another process heard of C{serial}: last seen only moves
        forward; C{fields}, when given, replace the entry fields.
        """
        if lastSeen > self._lastSeen.get(serial, float("-inf")):
            self._lastSeen[serial] = lastSeen
        if fields is not None:
            self._entryFields[serial] = dict(fields)

    def entryFields(self, serial: str) -> dict[str, str]:
        return dict(self._entryFields.get(serial, {}))

    def forget(self, serial: str) -> None:
        self._lastSeen.pop(serial, None)
        self._entryFields.pop(serial, None)

    def heardFrom(self) -> list[str]:
        return sorted(self._lastSeen)
