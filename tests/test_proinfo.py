# -*- test-case-name: tests.test_proinfo -*-
"""
Tests for L{nestproto.proinfo}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from nestproto.errors import BadQuery, MissingQuery
from nestproto.proinfo import proInfo, proInfoCode


class ProInfoTests(SynchronousTestCase):
    """
    L{proInfo} and L{proInfoCode}.
    """

    def test_stub(self) -> None:
        """
        Every code gets the same installer, named nestproto, echoing the code.
        """
        self.assertEqual(
            proInfo("ABC123"),
            {
                "id": 1,
                "pro_id": "ABC123",
                "dba": "nestproto",
                "locality": "A self-hosted thermostat",
                "website": "",
                "rating": 5.0,
            },
        )

    def test_pathCode(self) -> None:
        """
        The code in the path wins over the query.
        """
        self.assertEqual(proInfoCode("ABC123", {b"code": [b"XYZ"]}), "ABC123")

    def test_queryCodes(self) -> None:
        """
        Without a path code, C{?code=} then C{?entry_code=} are read.
        """
        self.assertEqual(proInfoCode(None, {b"code": [b"XYZ"]}), "XYZ")
        self.assertEqual(proInfoCode("", {b"entry_code": [b"E1"]}), "E1")

    def test_missing(self) -> None:
        """
        No code anywhere is a 400 "Missing entry code".
        """
        error = self.assertRaises(MissingQuery, proInfoCode, None, {b"code": [b""]})
        self.assertEqual(error.status, 400)
        self.assertEqual(str(error), "Missing entry code")

    def test_badUTF8(self) -> None:
        """
        A code that is not UTF-8 is a 400.
        """
        error = self.assertRaises(BadQuery, proInfoCode, None, {b"code": [b"\xfe"]})
        self.assertEqual(error.status, 400)
