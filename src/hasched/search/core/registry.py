"""timm-style searcher registry: ``register_searcher``, ``create_searcher``, ``list_searchers``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from hasched.errors import HaschedError
from hasched.registry import Registry
from hasched.search.core.problem import PermutationProblem
from hasched.search.core.result import SearchResult


class Searcher(Protocol):
    """What ``create_searcher`` returns."""

    name: str
    config: Any

    def run(
        self,
        problem: PermutationProblem,
        seed: int | torch.Generator,
        progress: Callable[[dict], None] | None = None,
        checkpoint: Path | None = None,
        *,
        stop_after: int | None = None,
        hooks: Sequence[Callable[[Any], None]] = (),
    ) -> SearchResult: ...


T = TypeVar("T")
SEARCHERS: Registry[type] = Registry("searcher")


def register_searcher(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a searcher constructible by ``create_searcher(name)``.

    The class needs a ``config_cls`` (a dataclass with defaults) and ``__init__(config)``;
    subclassing :class:`hasched.search.core.loop.SearchLoop` provides both the latter and
    ``run``.
    """

    def deco(cls: type[T]) -> type[T]:
        SEARCHERS.add(name, cls)
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def list_searchers() -> list[str]:
    """Registered searcher names, sorted."""
    return sorted(SEARCHERS.names())


def create_searcher(name: str, config: Any = None) -> Searcher:
    """Build a searcher by name.

    Args:
        name: one of :func:`list_searchers`.
        config: ``None`` (defaults), an instance of the searcher's config dataclass, or a
            mapping of its fields (e.g. parsed from a config file); missing fields keep
            their defaults.

    Raises:
        HaschedError: unknown name, unknown config field or wrong config type.
    """
    cls = SEARCHERS.get(name)
    cfg_cls = cls.config_cls  # type: ignore[attr-defined]
    if config is None:
        config = cfg_cls()
    elif isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(cfg_cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise HaschedError(
                f"unknown {name} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        config = cfg_cls(**config)
    elif not isinstance(config, cfg_cls):
        raise HaschedError(
            f"searcher {name!r} takes a {cfg_cls.__name__}, got {type(config).__name__}"
        )
    return cls(config)


def budget_options(name: str, population: int, generations: int) -> dict:
    """A common budget expressed in the fields a searcher's config has.

    Pipelines size every searcher with one ``population x (generations + 1)`` budget
    without knowing its config: ``population``, ``generations`` and ``batch`` are set
    where the config has such fields, ``evaluations`` to ``population * (generations + 1)``.
    Searchers with none of these (e.g. ``criticality``, whose cost is set by the rows)
    get nothing.
    """
    fields = {f.name for f in dataclasses.fields(SEARCHERS.get(name).config_cls)}
    offered = {"population": population, "generations": generations, "batch": population,
               "evaluations": population * (generations + 1)}
    return {k: v for k, v in offered.items() if k in fields}
