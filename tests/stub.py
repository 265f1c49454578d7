# -*- test-case-name: tests.test_device_api -*-
"""
L{StubTreq} with types. StubTreq attaches treq's functions to itself while it
is constructed, so a type checker sees none of them; L{StubClient} declares
the ones tests use and hands each call on.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse
from twisted.web.resource import IResource


class StubClient:
    """
    A treq client whose requests are served by C{resource} in memory.

    Keyword arguments are those of L{treq.client.HTTPClient.request}
    (C{headers}, C{data}, C{json}, C{unbuffered}, ...).
    """

    def __init__(self, resource: IResource) -> None:
        self._stub: Any = StubTreq(resource)

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[IResponse]:
        d: Deferred[IResponse] = self._stub.request(method, url, **kwargs)
        return d

    def get(self, url: str, **kwargs: Any) -> Deferred[IResponse]:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Deferred[IResponse]:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> Deferred[IResponse]:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Deferred[IResponse]:
        return self.request("DELETE", url, **kwargs)

    def flush(self) -> None:
        """Deliver everything written on either side of each connection."""
        self._stub.flush()
