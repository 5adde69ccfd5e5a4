"""One small name -> object registry, shared by models, error models, fault models,
multipliers, mappings, faulty-layer types and searchers (timm's ``register_model`` /
``create_model`` pattern).

One duplicate-name policy for all of them: registering a *different* object under a taken
name is a programming error (``ValueError``); registering the same object again is a no-op,
so re-importing a module is harmless. Looking up an unknown name is a user error
(:class:`~hasched.errors.HaschedError`) that lists the known names.

Example:
    >>> reg = Registry("widget")
    >>> @reg.register("round")
    ... def make_round(size=1):
    ...     return ("round", size)
    >>> reg.create("round", size=3)
    ('round', 3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from hasched.errors import HaschedError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> entries (factories, classes or specs), with a kind for messages.

    Args:
        kind: What the entries are, e.g. ``"error model"``; used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[T], T]:
        """Decorator registering ``entry`` under ``name`` (returns it unchanged).

        Args:
            name: Registry key.
            doc: One-line description for listings; defaults to the first line of the
                entry's docstring.
        """

        def deco(entry: T) -> T:
            self.add(name, entry, doc)
            return entry

        return deco

    def add(self, name: str, entry: T, doc: str | None = None) -> None:
        """Registers ``entry`` under ``name`` (see the module docstring for duplicates)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        if doc is None:
            doc = (getattr(entry, "__doc__", None) or "").strip().splitlines()
            doc = doc[0] if doc else ""
        self._docs[name] = doc

    def get(self, name: str) -> T:
        """The entry registered under ``name``.

        Raises:
            HaschedError: for an unknown name, listing the known ones.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names()) or "(none)"
            raise HaschedError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Calls the entry registered under ``name`` with the given arguments.

        A ``TypeError`` from bad keyword arguments becomes a one-line user error.
        """
        factory = self.get(name)
        try:
            return factory(*args, **kwargs)  # type: ignore[operator]
        except TypeError as err:
            raise HaschedError(f"{self.kind} {name!r}: bad parameters ({err})") from None

    def doc(self, name: str) -> str:
        """The entry's one-line description."""
        self.get(name)
        return self._docs[name]

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
