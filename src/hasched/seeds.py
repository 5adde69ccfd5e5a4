"""The one seed-derivation scheme: a stable 63-bit seed from any tuple of parts.

Stable across runs, processes, platforms and Python versions (SHA-256 of a canonical text,
never Python's ``hash``), so a resumed or distributed computation draws exactly what the
uninterrupted one would.

Example:
    >>> derive_seed("mnist32-cnn", "s1_c0_flip-to-1_0.005_p1") == derive_seed(
    ...     "mnist32-cnn", "s1_c0_flip-to-1_0.005_p1")
    True
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: object) -> int:
    """A seed in ``[0, 2^63)`` determined by ``parts`` (ints, floats, strings)."""
    text = "|".join(f"{type(p).__name__}:{p!r}" for p in parts)
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
