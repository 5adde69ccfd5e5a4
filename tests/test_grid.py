"""The generic resumable grid: resume after an interruption gives identical rows."""

from __future__ import annotations

import json

import pytest

from hasched.errors import HaschedError
from hasched.study.grid import GridCell, grid_rows, run_grid

CELLS = [GridCell(f"c{i}", {"i": i}) for i in range(5)]


def square(cell: GridCell) -> list[dict]:
    return [{"i": cell.params["i"], "sq": cell.params["i"] ** 2}]


def test_resume_gives_the_rows_of_an_uninterrupted_run(tmp_path):
    full = run_grid(tmp_path / "a", "t", {"n": 5}, CELLS, square, progress=False)
    part = run_grid(tmp_path / "b", "t", {"n": 5}, CELLS, square, progress=False, max_cells=2)
    assert [r["i"] for r in part] == [0, 1]
    calls = []
    rest = run_grid(tmp_path / "b", "t", {"n": 5}, CELLS,
                    lambda c: calls.append(c.key) or square(c), progress=False)
    assert rest == full and calls == ["c2", "c3", "c4"]
    (tmp_path / "b" / "parts" / "c3.json").write_text("{garbage")  # a torn part is redone
    assert run_grid(tmp_path / "b", "t", {"n": 5}, CELLS, square, progress=False) == full
    assert grid_rows(tmp_path / "b", CELLS) == full


def test_other_settings_and_foreign_folders_are_refused(tmp_path):
    run_grid(tmp_path / "a", "t", {"n": 5}, CELLS, square, progress=False)
    with pytest.raises(HaschedError, match="differs in: n"):
        run_grid(tmp_path / "a", "t", {"n": 6}, CELLS, square, progress=False)
    with pytest.raises(HaschedError, match="another command"):
        run_grid(tmp_path / "a", "u", {"n": 5}, CELLS, square, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep")
    with pytest.raises(HaschedError, match="not empty"):
        run_grid(tmp_path / "mine", "t", {}, CELLS, square, progress=False)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep"
    assert json.loads((tmp_path / "a" / "config.json").read_text())["hasched"] == "t"
    with pytest.raises(ValueError):
        GridCell("a/b")
