# -*- test-case-name: tests.test_proinfo -*-
"""
The installer ("Nest Pro") lookup, C{GET /nest/pro_info/{code}} (PROTOCOL.md §9).

A self-hosted cloud has no installers; like the anchor it answers a stable stub
so the device's installer screen has something to show.
"""

from __future__ import annotations

from typing import Any

from nestproto.errors import MissingQuery
from nestproto.weather import queryArgument


def proInfo(code: str) -> dict[str, Any]:
    """
    The installer answer for an entry code.
    """
    return {
        "id": 1,
        "pro_id": code,
        "dba": "nestproto",
        "locality": "A self-hosted thermostat",
        "website": "",
        "rating": 5.0,
    }


def proInfoCode(pathCode: str | None, args: dict[bytes, list[bytes]]) -> str:
    """
    The entry code of a pro_info request: from the path, else C{?code=}, else
    C{?entry_code=} (the C# backend's forms, PROTOCOL.md §3).

    @param args: C{request.args}.
    @raise MissingQuery: no code is given.
    @raise BadQuery: the query value is not UTF-8.
    """
    code = pathCode or queryArgument(args, b"code", b"entry_code")
    if not code:
        raise MissingQuery("Missing entry code")
    return code
