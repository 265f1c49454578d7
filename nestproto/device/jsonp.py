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
_NAME = r"[A-Za-z_$][0-9A-Za-z_$.]{0,63}"
_CALLBACK = re.compile(f"^{_NAME}$")
#: An answer as L{render} writes it: the callback, one JSON document.
_SCRIPT = re.compile(rf"^({_NAME})\((.*)\);?\s*$", re.DOTALL)


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

    The headers are those of a key-list answer (PROTOCOL.md §20.3) in the
    order seed 001 shows them, but as JSON numbers, not strings: the
    browser's script reads them from a document, not from HTTP.
    """
    headers: dict[str, Any] = {}
    payload: dict[str, Any] = {}
    if bucket is not None:
        headers = {
            "X-nl-skv-key": bucket.key,
            "X-nl-skv-version": bucket.revision,
            "X-nl-skv-timestamp": bucket.timestamp,
        }
        payload = dict(bucket.value)
    headers["X-nl-service-timestamp"] = serviceMs
    return {"status": 200, "headers": headers, "payload": payload}


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


def parseScript(text: str) -> tuple[str, Any] | None:
    """
    The callback name and the document of a JSONP answer (what L{render}
    wrote), or C{None} when C{text} is not one.
    """
    match = _SCRIPT.match(text)
    if match is None:
        return None
    try:
        return match.group(1), json.loads(match.group(2))
    except ValueError:
        return None
