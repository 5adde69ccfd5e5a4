"""User-facing errors.

Every mistake a user can make (unknown names, malformed files, missing data, values out of
range) is raised as :class:`HaschedError`. The CLI prints its message on one line and exits
with status 2; the library never prints or exits by itself.
"""

from __future__ import annotations


class HaschedError(Exception):
    """A user-facing error whose message is complete on one line."""

    exit_code: int = 2
