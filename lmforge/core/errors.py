"""User-facing errors.

Anything the user can fix (a bad path, a malformed line, a wrong config key) is raised as
`LmforgeError`; the CLI prints its one-line message and exits non-zero instead of a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class LmforgeError(Exception):
    """An error caused by user input; `str(err)` is the whole message shown to the user."""

    exit_code = 1


class ConfigError(LmforgeError):
    """A recipe or command line that does not fit the config dataclasses."""

    exit_code = 2


def describe_os_error(e: OSError) -> str:
    """'PATH: No space left on device': the file and the OS's reason, on one line."""
    where = e.filename if e.filename is not None else "file"
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{where}: {e.strerror or e}"


@contextlib.contextmanager
def os_errors() -> Iterator[None]:
    """Report a file the OS will not read or write (permissions, a device, a full disk) as one line."""
    try:
        yield
    except OSError as e:
        raise LmforgeError(describe_os_error(e)) from None
