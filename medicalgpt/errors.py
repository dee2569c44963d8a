"""Errors the user can fix, and the CLI entry that shows them as one line instead of a traceback."""

import sys
from collections.abc import Callable


class UsageError(ValueError):
    """A problem with the user's arguments or data; the message says what to change."""


class DataError(UsageError):
    """A problem with the user's data; the message names the file, line and field."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); a UsageError prints `error: <message>` and exits with status 2."""
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
