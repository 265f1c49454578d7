# -*- test-case-name: tests.test_accounts -*-
"""
App accounts from a shell (PROTOCOL.md §20.6), while the server is stopped:

    python -m nestproto.users [--data DIR] add NAME      (asks for the password)
    python -m nestproto.users [--data DIR] remove NAME

While a server holds the data directory, use its control port instead
(C{POST /api/users}, C{DELETE /api/users}): the server keeps the store in
memory and would not see a change made beside it.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Callable, Sequence

from twisted.internet.task import Clock

from .accounts import Accounts
from .datadir import STORE_FILE, DataDirectoryInUse, DataLock
from .errors import NestError
from .store import SQLiteStore, runInline


def run(
    argv: Sequence[str],
    askPassword: Callable[[str], str] = getpass.getpass,
    now: float | None = None,
) -> tuple[int, str]:
    """
    Do what C{argv} says.

    @param askPassword: prompts for a password without echoing it.
    @param now: the time in seconds (the wall clock when C{None}).
    @return: the exit status and the sentence to print.
    """
    parser = argparse.ArgumentParser(prog="python -m nestproto.users")
    parser.add_argument("--data", default="./nestproto-data")
    parser.add_argument("action", choices=["add", "remove"])
    parser.add_argument("name")
    options = parser.parse_args(argv)
    try:
        os.makedirs(options.data, exist_ok=True)
        lock = DataLock.acquire(options.data)
    except DataDirectoryInUse:
        return 1, (
            f"A server is running on {options.data}: use its control port "
            "(POST /api/users, DELETE /api/users) instead."
        )
    try:
        clock = Clock()
        if now is None:
            now = time.time()
        clock.advance(now)
        store = SQLiteStore.open(
            os.path.join(options.data, STORE_FILE), runInline, clock
        )
        accounts = Accounts(store, clock, runInline)
        try:
            if options.action == "add":
                password = askPassword(f"Password for {options.name}: ")
                if askPassword("Again: ") != password:
                    return 1, "The passwords differ; nothing was changed."
                created: list[str] = []
                accounts.create(options.name, password).addCallback(created.append)
                return 0, f"Account {created[0]} created."
            accounts.remove(options.name)
            return 0, f"Account {options.name} removed."
        except NestError as e:
            return 1, f"{e}; nothing was changed."
        finally:
            store.close()
    finally:
        lock.release()


def main() -> None:  # pragma: no cover - the shell's entry point
    status, message = run(sys.argv[1:])
    print(message, file=sys.stderr if status else sys.stdout)  # noqa: T201
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
