"""Nothing lost, no traceback (issue 13): every command against bad folders, bad files,
full and read-only disks, damaged checkpoints and a second writer.

Every case runs the real CLI in-process (``hasched.cli.main`` inside Typer's CliRunner
isolation, so ``HaschedError`` goes through the same one-line printer as in a shell) and
checks, with :func:`fault_env.refused`: exit status 2, exactly one ``hasched: error:`` line
and it is the last line on stderr, no traceback, every file that existed before
byte-identical, and no new file (partial, temporary or lock) left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fault_env import (
    ALL_COMMANDS,
    FOLDER_COMMANDS,
    LOCK_NAME,
    World,
    bench_args,
    dead_pid,
    demo_args,
    finished_campaign,
    folder_of,
    invoke,
    make_world,
    refused,
    repro_args,
    search_args,
    sens_args,
    simulate_disk_full,
    simulate_read_only,
    snapshot,
)
from hasched.zoo import data


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no dl")))
    yield make_world(tmp_path_factory.mktemp("world"))
    mp.undo()


@pytest.fixture
def run(world):
    return lambda *args: invoke(world, *args)


@pytest.fixture
def read_only(monkeypatch):
    return lambda root: simulate_read_only(monkeypatch, root)


@pytest.fixture
def disk_full(monkeypatch):
    return lambda where="": simulate_disk_full(monkeypatch, where)


# ---------------------------------------------------------------- output paths


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_out_is_a_file(name, world, run, tmp_path):
    out = tmp_path / ("x.npy" if name == "profile" else "out")
    out.write_text("thesis chapter 3\n")
    args = ALL_COMMANDS[name](world, out)
    before = snapshot(tmp_path)
    line = refused(run(*args), before, str(out), roots=(tmp_path,))
    assert "is a file" in line or "exists" in line


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_out_lies_under_a_file(name, world, run, tmp_path):
    (tmp_path / "afile").write_text("not a folder\n")
    out = tmp_path / "afile" / ("p.npy" if name == "profile" else "sub")
    args = ALL_COMMANDS[name](world, out)
    before = snapshot(tmp_path)
    refused(run(*args), before, "lies under", str(tmp_path / "afile"), roots=(tmp_path,))


@pytest.mark.parametrize("name", ["bench", "profile"])
def test_out_file_is_a_folder(name, world, run, tmp_path):
    (tmp_path / "x.npy").mkdir()
    (tmp_path / "x.npy" / "keep.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    refused(run(*ALL_COMMANDS[name](world, tmp_path / "x.npy")), before, "is a folder",
            roots=(tmp_path,))


@pytest.mark.parametrize("name", FOLDER_COMMANDS)
def test_foreign_non_empty_folder(name, world, run, tmp_path):
    out = tmp_path / "out"
    args = FOLDER_COMMANDS[name](world, out)
    target = folder_of(name, out)
    target.mkdir(parents=True)
    (target / "summary.json").write_text('{"my": "results"}\n')
    (target / "thesis.txt").write_text("years of work\n")
    before = snapshot(tmp_path)
    refused(run(*args), before, "is not empty", "thesis.txt", roots=(tmp_path,))


@pytest.mark.parametrize("config", ["{oops", "[1, 2, 3]", '{"title": "my thesis"}'],
                         ids=["garbage", "list", "foreign"])
@pytest.mark.parametrize("name", FOLDER_COMMANDS)
def test_foreign_config_json(name, config, world, run, tmp_path):
    out = tmp_path / "out"
    args = FOLDER_COMMANDS[name](world, out)
    target = folder_of(name, out)
    target.mkdir(parents=True)
    (target / "config.json").write_text(config)
    before = snapshot(tmp_path)
    refused(run(*args), before, str(target / "config.json"), roots=(tmp_path,))


def test_search_never_overwrites_a_users_summary(world, run, tmp_path):
    """The case of the issue: a user's folder holding summary.json and thesis.txt."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text('{"results": "mine"}')
    (out / "thesis.txt").write_text("chapter 1")
    before = snapshot(tmp_path)
    refused(run(*search_args(world, out)), before, "not a hasched search folder",
            roots=(tmp_path,))


def test_another_commands_folder_is_refused(world, run, tmp_path):
    from hasched.study.schedule_search import SearchSettings

    out = tmp_path / "s"  # an unfinished search: its config only
    out.mkdir()
    (out / "config.json").write_text(json.dumps(SearchSettings().key()))
    before = snapshot(tmp_path)
    refused(run(*sens_args(world, out)), before, "not a sensitivity campaign's config",
            roots=(tmp_path,))
    refused(run(*repro_args(world, out)), before, "not a hasched reproduce config",
            roots=(tmp_path,))


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_read_only_file_system(name, world, run, tmp_path, read_only):
    out = tmp_path / ("p.npy" if name == "profile" else "out.md" if name == "bench" else "out")
    args = ALL_COMMANDS[name](world, out)
    before = snapshot(tmp_path)
    read_only(tmp_path)
    refused(run(*args), before, "read-only", roots=(tmp_path,))


def test_read_only_resume_keeps_the_finished_campaign(world, run, tmp_path, read_only):
    from hasched.study.campaign import CampaignConfig, run_campaign

    out = tmp_path / "sens"  # the grid of sens_args, finished by a stand-in engine
    cfg = CampaignConfig.from_args("mnist32-cnn", seeds="1", layers="op", errors="bitflip",
                                   fr_max="5e-3", profile_seeds="1", repeats=1, images="32")
    run_campaign(cfg, out, progress=False, evaluate_fn=lambda c, cell: {
        "clean_accuracy": 0.5, "accuracies": [0.4], "images": 32})
    before = snapshot(tmp_path)
    read_only(tmp_path)
    refused(run(*sens_args(world, out)), before, "read-only", LOCK_NAME, roots=(tmp_path,))


@pytest.mark.parametrize("name", ["sensitivity", "search", "report", "profile", "bench",
                                  "train", "demo"])
def test_disk_full(name, world, run, tmp_path, disk_full):
    out = tmp_path / ("p.json" if name == "profile" else "out.md" if name == "bench" else "out")
    args = ALL_COMMANDS[name](world, out)
    before = snapshot(tmp_path)
    disk_full()
    refused(run(*args), before, "no space left", roots=(tmp_path,))


def test_disk_full_mid_campaign_then_resume(world, run, tmp_path, disk_full, monkeypatch):
    out = tmp_path / "sens"
    disk_full(where="/parts/")  # the config is written, the first finished cell is not
    refused(run(*sens_args(world, out, "--profile-seeds", "1,2")), {}, "no space left",
            "parts", roots=())
    assert sorted(p.name for p in out.rglob("*")) == ["config.json", "parts"]
    monkeypatch.undo()
    res = run(*sens_args(world, out, "--profile-seeds", "1,2"))
    assert res.code == 0 and "2 cells computed" in res.out


def test_report_disk_full_keeps_the_old_report(world, run, tmp_path, disk_full):
    camp = finished_campaign(tmp_path)
    assert run("report", camp).code == 0
    before = snapshot(tmp_path)
    disk_full(where="report.md")
    refused(run("report", camp), before, "no space left", "report.md", roots=(tmp_path,))


# ---------------------------------------------------------------- schedule files


def _perm(n: int = 32) -> list[int]:
    return list(range(n))


SCHEDULES = {
    "float": ({"permutations": {"c0": [0.9] + _perm()[1:]}}, "permutations.c0[0] must be an "
              "integer, got 0.9"),
    "float-integral": ({"permutations": {"c0": [0.0] + _perm()[1:]}}, "got 0.0"),
    "bool": ({"permutations": {"c0": [True] + _perm()[1:]}}, "got true"),
    "string": ({"permutations": {"c0": ["1"] + _perm()[1:]}}, 'must be an integer, got "1"'),
    "empty": ({"permutations": {}}, "'permutations' is empty"),
    "perms-list": ({"permutations": [_perm()]}, "permutations must be an object"),
    "top-list": (_perm(), "the top level must be an object, got a JSON list"),
    "no-perms": ({"perm": {"c0": _perm()}}, "missing field 'permutations'"),
    "not-a-list": ({"permutations": {"c0": 5}},
                   "permutations.c0 must be a list of integers, got 5"),
    "duplicate": ({"permutations": {"c0": _perm(31) + [0]}}, "needs a permutation of 0..31"),
    "short": ({"permutations": {"c0": _perm(10)}}, "needs a permutation of 0..31"),
    "unknown-layer": ({"permutations": {"h7": _perm()}}, "names layer 'h7'"),
}


@pytest.mark.parametrize("case", SCHEDULES)
def test_bad_schedule(case, world, run, tmp_path):
    obj, needle = SCHEDULES[case]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(obj))
    before = snapshot(tmp_path, world.models)
    refused(run("evaluate", "--images", "32", "--repeats", "1", "--schedule", path), before,
            str(path), needle, roots=(tmp_path, world.models))


def test_schedule_not_json_or_missing(world, run, tmp_path):
    (tmp_path / "s.json").write_text('{"permutations": ')
    before = snapshot(tmp_path)
    refused(run("evaluate", "--images", "32", "--schedule", tmp_path / "s.json"), before,
            "not valid JSON (line 1", roots=(tmp_path,))
    refused(run("evaluate", "--images", "32", "--schedule", tmp_path), before,
            "schedule file not found", roots=(tmp_path,))


def test_good_schedule_is_accepted(world, run, tmp_path):
    """The control of the cases above: a real permutation runs."""
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "s.json").write_text(json.dumps({"permutations": {"c0": perm}}))
    res = run("evaluate", "--images", "32", "--repeats", "1", "--schedule", tmp_path / "s.json")
    assert res.code == 0 and "(with schedule)" in res.out


# ---------------------------------------------------------------- damaged checkpoints


def _store_copy(world: World, tmp: Path, key: str | None = None, value=None) -> Path:
    store = tmp / "store"
    shutil.copytree(world.models, store)
    if key is not None:
        path = store / "mnist32-cnn" / "seed1" / "model.safetensors"
        state = load_file(str(path))
        state[key].view(-1)[0] = value
        save_file(state, str(path))
    return store


@pytest.mark.parametrize("key,value", [("c0.weight", float("nan")), ("op.bias", float("inf"))])
def test_non_finite_weights(key, value, world, run, tmp_path):
    store = _store_copy(world, tmp_path, key, value)
    before = snapshot(tmp_path)
    refused(run("evaluate", "--images", "32", "--models-dir", store), before,
            "non-finite", key, "model.safetensors", roots=(tmp_path,))


@pytest.mark.parametrize("name", ["search", "sensitivity"])
def test_non_finite_weights_refused_before_any_output(name, world, run, tmp_path):
    store = _store_copy(world, tmp_path, "c0.weight", float("nan"))
    args = FOLDER_COMMANDS[name](world, tmp_path / "out")
    args[args.index("--models-dir") + 1] = store
    before = snapshot(tmp_path)
    refused(run(*args), before, "non-finite", roots=(tmp_path,))
    assert not (tmp_path / "out").exists()


def test_recorded_accuracy_mismatch_warns(world, run, tmp_path):
    store = _store_copy(world, tmp_path)
    meta_path = store / "mnist32-cnn" / "seed1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["test_accuracy"] = 0.95 if meta["test_accuracy"] < 0.7 else 0.05
    meta_path.write_text(json.dumps(meta))
    full = run("evaluate", "--models-dir", store, "--repeats", "1")  # all 128 test images
    assert full.code == 0
    warnings = [ln for ln in full.err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint records" in warnings[0], full.err
    part = run("evaluate", "--models-dir", store, "--repeats", "1", "--images", "32")
    assert part.code == 0 and "warning:" not in part.err  # a subset is not comparable


def test_checkpoint_metadata_with_wrong_types(world, run, tmp_path):
    store = _store_copy(world, tmp_path)
    meta_path = store / "mnist32-cnn" / "seed1" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "seed": "1"}))
    before = snapshot(tmp_path)
    refused(run("evaluate", "--images", "32", "--models-dir", store), before, str(meta_path),
            'seed must be an integer, got "1"', roots=(tmp_path,))


# ---------------------------------------------------------------- missing checkpoints


@pytest.mark.parametrize("name", ["evaluate", "search", "sensitivity", "reproduce"])
def test_missing_checkpoint_asks_for_train(name, world, run, tmp_path):
    if name == "evaluate":
        args = ["evaluate", "--images", "32", "--seed", "7"]
    elif name == "search":
        args = search_args(world, tmp_path / "out", "--seed", "7")
    elif name == "sensitivity":
        args = sens_args(world, tmp_path / "out", "--seeds", "1,7")
    else:
        args = repro_args(world, tmp_path / "out")
        args[args.index("--models-dir") + 1] = tmp_path / "empty-store"
    before = snapshot(tmp_path, world.models)
    line = refused(run(*args), before, "--train", "hasched train --model mnist32-cnn --seed",
                   roots=(tmp_path, world.models))
    if name == "reproduce":
        assert "it has no mnist32-cnn checkpoint" in line
    else:
        assert "seed 7" in line and "it has mnist32-cnn seed 1" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- everything checked first


@pytest.mark.parametrize("extra,needle", [
    (["--images", "5:3"], "--images must be N >= 1, A:B"),
    (["--images", "100:200"], "image range"),
    (["--layers", "h7"], "unknown layer"),
    (["--workers", "0"], "--workers"),
])
def test_sensitivity_validates_before_creating(extra, needle, world, run, tmp_path):
    out = tmp_path / "sens"
    refused(run(*sens_args(world, out, *extra)), {}, needle, roots=(tmp_path,))
    assert not out.exists()


def test_sensitivity_corrected_rerun_is_not_refused(world, run, tmp_path):
    out = tmp_path / "sens"
    refused(run(*sens_args(world, out, "--images", "5:3")), {}, "--images", roots=(tmp_path,))
    res = run(*sens_args(world, out, "--images", "8:40"))
    assert res.code == 0 and "1 cells computed" in res.out


@pytest.mark.parametrize("extra,needle", [
    (["--search-images", "16:", "--holdout-images", ":32"], "overlap"),
    (["--search-images", "96:500"], "image range"),
    (["--layers", "h7"], "unknown layer"),
    (["--fr-max", "2"], "--fr-max"),
    (["--population", "1"], "population"),
])
def test_search_validates_before_creating(extra, needle, world, run, tmp_path):
    out = tmp_path / "search"
    refused(run(*search_args(world, out, *extra)), {}, needle, roots=(tmp_path,))
    assert not out.exists()


@pytest.mark.parametrize("extra,needle", [
    (["--train-epochs", "0"], "--train-epochs"),
    (["--search-images", "0:64"], "overlap"),
])
def test_demo_validates_before_training(extra, needle, world, run, tmp_path):
    refused(run(*demo_args(world, tmp_path / "demo", *extra)), {}, needle, roots=(tmp_path,))
    assert not (tmp_path / "demo").exists()


def test_campaign_config_schema(world, run, tmp_path):
    camp = finished_campaign(tmp_path)
    cfg_path = camp / "config.json"
    good = json.loads(cfg_path.read_text())
    for bad, needle in (({**good, "config": {**good["config"], "seeds": ["1"]}},
                         'config.seeds[0] must be an integer, got "1"'),
                        ({**good, "config": {**good["config"], "colour": 1}},
                         "unknown field config.colour"),
                        ([good], "the top level must be an object")):
        cfg_path.write_text(json.dumps(bad))
        before = snapshot(tmp_path)
        refused(run("report", camp), before, str(cfg_path), needle, roots=(tmp_path,))


# ---------------------------------------------------------------- concurrent writers


def _lock(folder: Path, content: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(content)


@pytest.mark.parametrize("name", ["sensitivity", "search", "reproduce"])
def test_live_writer_is_refused(name, world, run, tmp_path):
    out = tmp_path / "out"
    _lock(out, f"{os.getpid()} {os.uname().nodename} abc\n")  # this very process: alive
    before = snapshot(tmp_path)
    refused(run(*FOLDER_COMMANDS[name](world, out)), before, "being written by another",
            f"pid {os.getpid()}", roots=(tmp_path,))


def test_lock_from_another_host_is_respected(world, run, tmp_path):
    out = tmp_path / "out"
    _lock(out, f"{dead_pid()} some-cluster-node\n")  # cannot be checked from here
    before = snapshot(tmp_path)
    refused(run(*sens_args(world, out)), before, "on some-cluster-node", roots=(tmp_path,))


@pytest.mark.parametrize("name", ["sensitivity", "search"])
def test_stale_lock_is_recovered(name, world, run, tmp_path):
    out = tmp_path / "out"
    pid = dead_pid()
    _lock(out, f"{pid} {os.uname().nodename}\n")
    args = FOLDER_COMMANDS[name](world, out)
    first = run(*args)
    assert first.code == 0, first.err
    assert f"recovered a stale lock of pid {pid}" in first.err
    assert not (out / LOCK_NAME).exists()  # and ours is released at the end
    # The control of the policy: our own finished folder is resumed, not refused.
    again = run(*args)
    assert again.code == 0, again.err
    assert ("1 already done" in again.out if name == "sensitivity"
            else "finished earlier" in again.err and again.out == first.out)


def test_rewrite_our_own_outputs(world, run, tmp_path):
    """The controls of the file policy: what we wrote may be written again."""
    md = tmp_path / "bench.md"
    assert run(*bench_args(world, md)).code == 0
    assert run(*bench_args(world, md)).code == 0  # a table bench wrote may be replaced
    camp = finished_campaign(tmp_path)
    assert run("report", camp, "--out", tmp_path / "rep").code == 0
    assert run("report", camp, "--out", tmp_path / "rep").code == 0
