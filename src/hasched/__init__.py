"""hasched: run DNNs on faulty, marginal or inexact accelerators.

The package is a library first: nothing here reads ``sys.argv`` or seeds global random
state. The ``hasched`` command line lives in :mod:`hasched.cli`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from hasched.errors import HaschedError  # noqa: E402

__all__ = ["HaschedError", "__version__"]
