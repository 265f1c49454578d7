# -*- test-case-name: tests.test_startup -*-
"""
C{python -m nestproto}: the version, and how to run the server.
"""

from __future__ import annotations

import argparse
import sys

from ._version import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nestproto",
        description="nestproto serves the Nest thermostat cloud protocol. Run "
        "the server with 'twistd -n nestproto' (see 'twistd nestproto --help'); "
        "back up and restore with 'python -m nestproto.backup' and "
        "'python -m nestproto.restore'.",
    )
    parser.add_argument(
        "--version", action="version", version=f"nestproto {__version__}"
    )
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
