"""A resumable grid of independent cells: one part file per finished cell.

The engine behind study commands that evaluate many cells (resilience maps, fault grids):
the folder policy and lock of :mod:`hasched.io`, one atomically written
``parts/<key>.json`` per finished cell, and the rows of all finished cells in grid order.
A killed run resumes at the first unfinished cell; since every cell is seeded from its own
coordinates, the rows are byte-identical to an uninterrupted run's.

Example:
    >>> import tempfile
    >>> cells = [GridCell(f"x{i}", {"x": i}) for i in range(3)]
    >>> out = tempfile.mkdtemp() + "/g"
    >>> rows = run_grid(out, "demo-grid", {"n": 3}, cells, lambda c: [{"y": c.params["x"] ** 2}])
    >>> [r["y"] for r in rows]
    [0, 1, 4]
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hasched.errors import HaschedError
from hasched.io import atomic_write, check_out_dir, claim_out_dir, make_dirs

__all__ = ["GridCell", "run_grid", "grid_rows", "check_grid_dir"]

_KEY = re.compile(r"^[A-Za-z0-9_.+=@-]+$")


@dataclass(frozen=True)
class GridCell:
    """One cell: a file-name-safe ``key`` and the parameters its function needs."""

    key: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _KEY.match(self.key):
            raise ValueError(f"grid cell key {self.key!r} is not file-name safe")


def check_grid_dir(out: str | Path, kind: str, config: dict) -> bool:
    """The folder policy (reads only): True when ``out`` holds this grid to resume."""
    want = json.loads(json.dumps({"hasched": kind, **config}))

    def compatible(saved: dict, path: Path) -> None:
        if saved.get("hasched") != kind:
            raise HaschedError(f"{path} is not a hasched {kind} config (another command's "
                               "folder?); use another --out")
        if saved != want:
            diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
            raise HaschedError(f"{Path(out)} holds a {kind} with other settings (differs in: "
                               f"{', '.join(diff)}); rerun with its arguments or use another "
                               "--out")

    return check_out_dir(out, what=kind, compatible=compatible)


def _part(out: Path, cell: GridCell) -> Path:
    return out / "parts" / f"{cell.key}.json"


def _read_part(out: Path, cell: GridCell) -> list[dict] | None:
    """A finished cell's rows, or None (missing, partial or foreign part files count as
    unfinished and are recomputed)."""
    path = _part(out, cell)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or obj.get("key") != cell.key or not isinstance(
            obj.get("rows"), list):
        return None
    return obj["rows"]


def grid_rows(out: str | Path, cells: list[GridCell]) -> list[dict]:
    """Rows of every finished cell, in grid order."""
    out = Path(out)
    return [r for c in cells for r in (_read_part(out, c) or [])]


def run_grid(out: str | Path, kind: str, config: dict, cells: list[GridCell],
             fn: Callable[[GridCell], list[dict]], *, log: Callable[[str], None] | None = None,
             progress: bool = True, max_cells: int | None = None) -> list[dict]:
    """Computes (or resumes) every cell into ``out`` and returns all rows in grid order.

    Args:
        out: Grid folder (new, empty, or this grid's).
        kind: What the grid is (recorded in ``config.json``; another kind is refused).
        config: The grid's identity; a folder with another config is refused.
        cells: The cells, in order; keys must be unique.
        fn: ``cell -> rows`` (JSON-serialisable dicts); deterministic for the cell.
        log: One-line messages. progress: A tqdm bar on stderr.
        max_cells: Stop after this many newly finished cells (a controlled interruption).
    """
    from tqdm import tqdm

    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise HaschedError(f"{kind}: two grid cells share a key")
    out = Path(out)
    check_grid_dir(out, kind, config)
    with claim_out_dir(out, {"hasched": kind, **config}, log=log):
        make_dirs(out / "parts")
        todo = [c for c in cells if _read_part(out, c) is None]
        if max_cells is not None:
            todo = todo[:max_cells]
        with tqdm(total=len(cells), initial=len(cells) - len(todo), desc=kind, unit="cell",
                  file=sys.stderr, disable=not progress, leave=False) as bar:
            for cell in todo:
                rows = fn(cell)
                atomic_write(_part(out, cell), json.dumps({"key": cell.key, "params":
                                                           cell.params, "rows": rows}) + "\n")
                bar.update(1)
    return grid_rows(out, cells)
