# -*- test-case-name: tests.test_appsubscribe -*-
"""
The browser's key-list subscribe (PROTOCOL.md §20.6, seed 001): the answer
is a script calling the page's callback with what the headers and body of
a key-list answer would carry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from ..buckets import Bucket
from ..errors import BadCallback
from ..hub import Deliver
from ..state import DeviceState

#: A plain JavaScript name, as PROTOCOL.md §20.6 allows: anything else
#: (C{alert(1)//}) would run in the page that asked.
_CALLBACK = re.compile(r"^[A-Za-z_$][0-9A-Za-z_$.]{0,63}$")


def callbackName(value: str | None) -> str:
    """
    The C{jsonp} query parameter, checked.

    @raise BadCallback: when it is missing or not a plain name.
    """
    if value is None or not _CALLBACK.match(value):
        raise BadCallback("jsonp must be a JavaScript name of at most 64 characters")
    return value


def envelope(bucket: Bucket | None, serviceMs: int) -> dict[str, Any]:
    """
    C{{"status": 200, "headers": {...}, "payload": {...}}}: the bucket's
    C{X-nl-skv-*} headers and bare value; none, only the service time.
    """
    headers = {"X-nl-service-timestamp": str(serviceMs)}
    if bucket is None:
        return {"status": 200, "headers": headers, "payload": {}}
    headers.update(
        {
            "X-nl-skv-key": bucket.key,
            "X-nl-skv-version": str(bucket.revision),
            "X-nl-skv-timestamp": str(bucket.timestamp),
        }
    )
    return {"status": 200, "headers": headers, "payload": dict(bucket.value)}


def render(
    request: IRequest, callback: str, bucket: Bucket | None, state: DeviceState
) -> bytes:
    """The script answering with C{bucket} (or none)."""
    request.setHeader(b"content-type", b"application/javascript")
    request.setHeader(b"cache-control", b"no-store")
    document = json.dumps(envelope(bucket, state.nowMs()), separators=(",", ":"))
    return f"{callback}({document})".encode()


def writer(request: IRequest, callback: str, state: DeviceState) -> Deliver:
    """
    Writes a held JSONP answer once the hub delivers its bucket; raises
    when the browser has gone.
    """
    web: Request = request  # type: ignore[assignment]
    gone: list[bool] = []
    web.notifyFinish().addBoth(lambda result: gone.append(True))

    def deliver(batch: Sequence[Bucket]) -> None:
        if gone:
            raise ConnectionLost("subscriber left before the push")
        if batch:
            request.write(render(request, callback, batch[0], state))

    return deliver
