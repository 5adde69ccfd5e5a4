"""Seeds and crash-safe checkpoints shared by all searchers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hasched.errors import HaschedError
from hasched.io import atomic_write, make_dirs


def make_generator(seed: int | torch.Generator) -> torch.Generator:
    """Return the generator to draw from: a fresh CPU one for an int, else ``seed`` itself.

    A passed-in generator is advanced (and, on resume, reset to the checkpointed state).
    """
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise HaschedError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def seed_tag(seed: int | torch.Generator) -> int | None:
    """The seed as recorded in a checkpoint; ``None`` when a generator was passed in."""
    return None if isinstance(seed, torch.Generator) else int(seed)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a kill mid-write leaves the previous file intact.

    Raises:
        HaschedError: The write failed (full or read-only disk, ...); nothing is left behind.
    """
    path = Path(path)
    make_dirs(path.parent)
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """Load a checkpoint if ``path`` exists and was written by a run with the same ``meta``.

    ``meta`` holds ``algorithm``, ``config``, ``sizes`` (as a list of pairs, order counts)
    and ``seed`` (``None`` = not checked, for runs seeded with a generator).

    Returns:
        The saved state, or ``None`` when there is no file yet.

    Raises:
        HaschedError: if the file is unreadable or belongs to a different run.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise HaschedError(f"checkpoint {path} is unreadable: {e}".splitlines()[0]) from e
    saved = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise HaschedError(f"checkpoint {path} is not a hasched search checkpoint")
    for key in ("algorithm", "config", "sizes"):
        if _norm(saved.get(key)) != _norm(meta[key]):
            raise HaschedError(
                f"checkpoint {path} is from a different run ({key}: saved {saved.get(key)!r}, "
                f"now {meta[key]!r}); delete it or pass another path"
            )
    if saved.get("seed") is not None and meta["seed"] is not None and saved["seed"] != meta["seed"]:
        raise HaschedError(
            f"checkpoint {path} is from seed {saved['seed']}, not {meta['seed']}; "
            "delete it or pass another path"
        )
    return state


def _norm(x: Any) -> Any:
    # torch.save round-trips tuples as tuples but users may build lists; compare loosely.
    if isinstance(x, list | tuple):
        return [_norm(v) for v in x]
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()}
    return x
