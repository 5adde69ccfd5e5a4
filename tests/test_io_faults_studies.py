"""Nothing lost, no traceback, for the study commands (searchers, Reduce, Fal-reTune,
Mquans): their output paths follow the same policy as the paper pipeline's.

Same checks as ``test_io_faults.py`` (:func:`fault_env.refused`): exit 2, one
``hasched: error:`` line, every pre-existing file byte-identical, nothing left behind.
"""

from __future__ import annotations

import pytest

from fault_env import World, invoke, make_world, refused, snapshot
from hasched.zoo import data

SMALL = ("--images", "16")


def _store(w: World) -> list:
    return ["--models-dir", w.models, "--data-dir", w.data]


# Each command with the option that names its output folder; tiny budgets.
FOLDER_STUDIES = {
    "compare": lambda w, out: ["compare", "--out", out, *_store(w), "--algorithms",
                               "criticality,random", "--runs", "1", "--search-images", "96:",
                               "--holdout-images", ":32", "--holdout-repeats", "2"],
    "chips": lambda w, out: ["chips", "--out", out, "--mapping", "systolic:4x4",
                             "--faulty-pes", "0.1", "--count", "1"],
    "resilience": lambda w, out: ["resilience", "--out", out, *_store(w), "--mapping",
                                  "systolic:4x4", "--fault-rates", "0", "--epochs", "0",
                                  "--maps", "1", *SMALL],
    "resilience-ax": lambda w, out: ["resilience-ax", "--out", out, *_store(w), "--mapping",
                                     "systolic:4x4", "--multipliers", "trunc4", "--sites",
                                     "product", "--bits", "6", "--values", "1", "--chips", "1",
                                     *SMALL],
    "retune": lambda w, out: ["retune", "--out", out, *_store(w), "--mapping", "systolic:4x4",
                              "--method", "prune", "--faulty-pes", "0.1", "--chips", "1",
                              *SMALL],
    "frames": lambda w, out: ["frames", "--out", out, "--data-dir", w.data, "--dataset",
                              "mnist", "--sequences", "2", "--length", "2", "--no-gif"],
    "criticality": lambda w, out: ["criticality", "--out", out, *_store(w), "--layers", "c0",
                                   *SMALL],
}
FILE_STUDIES = {
    "diagnose": lambda w, out: ["diagnose", "--out", out, "--runs", "1", "--columns", "8"],
    "export": lambda w, out: ["export", "--out", out, "--schedule", w.models / "missing.json",
                              "--models-dir", w.models],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no dl")))
    yield make_world(tmp_path_factory.mktemp("world"))
    mp.undo()


@pytest.mark.parametrize("name", sorted(FOLDER_STUDIES))
def test_study_out_is_a_file(name, world, tmp_path):
    out = tmp_path / "out"
    out.write_text("thesis chapter 3\n")
    before = snapshot(tmp_path)
    line = refused(invoke(world, *FOLDER_STUDIES[name](world, out)), before, str(out),
                   roots=(tmp_path,))
    assert "is a file" in line or "exists" in line or "not a folder" in line


@pytest.mark.parametrize("name", sorted(FOLDER_STUDIES))
def test_study_never_writes_into_a_foreign_folder(name, world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"my": "results"}\n')
    (out / "thesis.txt").write_text("years of work\n")
    before = snapshot(tmp_path)
    # "is not empty", or for chips (new or empty folders only) "is not an empty folder"
    refused(invoke(world, *FOLDER_STUDIES[name](world, out)), before, str(out), "empty",
            roots=(tmp_path,))


@pytest.mark.parametrize("name", sorted(FOLDER_STUDIES))
def test_study_refuses_a_garbage_config(name, world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{oops")
    before = snapshot(tmp_path)
    # chips takes only a new or empty folder, so it refuses before reading any config
    needle = "not an empty folder" if name == "chips" else str(out / "config.json")
    refused(invoke(world, *FOLDER_STUDIES[name](world, out)), before, needle,
            roots=(tmp_path,))


@pytest.mark.parametrize("name", sorted(FILE_STUDIES))
def test_study_never_overwrites_a_file(name, world, tmp_path):
    out = tmp_path / ("est.json" if name == "diagnose" else "model.safetensors")
    out.write_text("my file\n")
    before = snapshot(tmp_path)
    refused(invoke(world, *FILE_STUDIES[name](world, out)), before, roots=(tmp_path,))
