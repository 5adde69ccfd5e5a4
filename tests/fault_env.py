"""Helpers of tests/test_io_faults.py: a tiny world, the commands, faults, and the checks.

A world is synthetic MNIST (256 train, 128 test images) and an untrained mnist32-cnn seed 1
checkpoint; the commands are built with tiny settings so that a successful run takes a
second; the disk faults monkeypatch the ``os`` calls (the tests may run as root, where
chmod protects nothing).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hasched.cli import main
from hasched.io import LOCK_NAME  # noqa: F401  (re-exported for the tests)
from hasched.zoo.data import load_dataset
from hasched.zoo.models import create_model, get_model_spec, init_weights
from hasched.zoo.train import evaluate_accuracy, save_checkpoint
from idx_files import write_learnable


@dataclass(frozen=True)
class World:
    data: Path
    models: Path


def make_world(root: Path) -> World:
    """Synthetic data and an untrained checkpoint (these tests are about files, not
    accuracy; skipping the training keeps them fast). Its metadata is what train_model
    would record."""
    write_learnable(root / "data", 256, 128, seed=0, folders=("mnist",))
    spec = get_model_spec("mnist32-cnn")
    with torch.random.fork_rng():  # creating a model draws from the global RNG
        model = create_model("mnist32-cnn")
    init_weights(model, spec.recipe.init, torch.Generator().manual_seed(1))
    test = load_dataset(spec.dataset, "test", root / "data", download=False)
    meta = {"model": "mnist32-cnn", "seed": 1, "epochs": 0, "steps": 0,
            "test_accuracy": evaluate_accuracy(model, test), "test_images": len(test),
            "dataset_fingerprint": {"test": test.fingerprint}}
    save_checkpoint(model, meta, root / "models")
    return World(root / "data", root / "models")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def invoke(world: World, *args) -> Result:
    """Runs ``hasched ARGS`` in-process, as the console script does (``main``: one-line
    errors, exit 2), with the world's data and store as the defaults."""
    env = {"HASCHED_DATA_DIR": str(world.data), "HASCHED_MODELS_DIR": str(world.models),
           "HASCHED_OFFLINE": "1"}
    with CliRunner().isolation(env=env) as (out, err, _):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return Result(code, out.getvalue().decode(), err.getvalue().decode())


def snapshot(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for r in roots if r.exists() for p in r.rglob("*") if p.is_file()}


def refused(res: Result, before: dict[Path, bytes], *needles: str, roots: tuple = ()) -> str:
    """The checks of every fault case; returns the error line."""
    assert res.code == 2, (res.code, res.err[-2000:])
    assert "Traceback" not in res.out + res.err
    lines = [ln for ln in res.err.splitlines() if ln.startswith("hasched: error:")]
    assert len(lines) == 1 and res.err.rstrip().endswith(lines[0]), res.err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    after = snapshot(*roots)
    for path, content in before.items():
        assert path.is_file() and path.read_bytes() == content, f"{path} changed"
    assert set(after) <= set(before), f"left behind: {sorted(set(after) - set(before))}"
    return lines[0]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def finished_campaign(tmp: Path) -> Path:
    """A campaign folder filled by a stand-in engine (no model, no data)."""
    from hasched.study.campaign import CampaignConfig, run_campaign

    cfg = CampaignConfig.from_args("mnist32-cnn", seeds="1", layers="c0,op", errors="bitflip",
                                   fr_max="1e-3,5e-3", profile_seeds="1", repeats=2, images=64)
    run_campaign(cfg, tmp / "camp", progress=False, evaluate_fn=lambda c, cell: {
        "clean_accuracy": 0.9, "accuracies": [0.9 - cell.fr_max * 10] * 2, "images": 64})
    return tmp / "camp"


# The commands, each with the option that names its output (the world fills in the rest).
def search_args(w: World, out, *extra):
    return ["search", "--out", out, "--models-dir", w.models, "--data-dir", w.data,
            "--population", "2", "--generations", "1", "--runs", "1", "--repeats", "1",
            "--search-images", "96:", "--holdout-images", ":32", "--holdout-repeats", "2", *extra]


def sens_args(w: World, out, *extra):
    return ["sensitivity", "--out", out, "--models-dir", w.models, "--data-dir", w.data,
            "--seeds", "1", "--layers", "op", "--errors", "bitflip", "--fr-max", "5e-3",
            "--profile-seeds", "1", "--repeats", "1", "--images", "32", "--no-report", *extra]


def repro_args(w: World, out, *extra):
    return ["reproduce", "--quick", "--out", out, "--models-dir", w.models, "--data-dir", w.data,
            *extra]


def demo_args(w: World, out, *extra):
    return ["demo", "--out", out, "--data-dir", w.data, "--search-images", "96:",
            "--holdout-images", ":32", "--generations", "0", "--train-epochs", "1", *extra]


def report_args(w: World, out, *extra):
    base = next(p for p in Path(out).parents if p.is_dir())  # never inside a test's trap
    return ["report", finished_campaign(base), "--out", out, *extra]


def train_args(w: World, store, *extra):
    return ["train", "--models-dir", store, "--data-dir", w.data, "--epochs", "1", *extra]


def bench_args(w: World, md, *extra):
    return ["bench", "--markdown", md, "--images", "96:", "--trials", "1", "--filter", "none",
            *extra]


def profile_args(w: World, path, *extra):
    return ["profile", "--out", path, *extra]


FOLDER_COMMANDS = {"search": search_args, "sensitivity": sens_args, "reproduce": repro_args,
                   "demo": demo_args, "report": report_args, "train": train_args}
ALL_COMMANDS = {**FOLDER_COMMANDS, "bench": bench_args, "profile": profile_args}


def folder_of(name: str, out: Path) -> Path:
    """Where a command keeps its files: ``out``, or the checkpoint folder in a store."""
    return out / "mnist32-cnn" / "seed1" if name == "train" else out


def _under(path, root: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(root)
    except TypeError:  # a file descriptor
        return False


def _fail(code: int, path=None):
    raise OSError(code, os.strerror(code), os.fsdecode(path) if path is not None else None)


def simulate_read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Makes a folder tree behave like a read-only mount: reads work, any change is EROFS."""
    real_open, real_os_open = builtins.open, os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path, flags, *a, **k):
        if flags & writes and _under(path, root):
            _fail(errno.EROFS, path)
        return real_os_open(path, flags, *a, **k)

    def py_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and _under(file, root):
            _fail(errno.EROFS, file)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(io, "open", py_open)
    for fn in ("mkdir", "rmdir", "unlink", "remove"):
        real = getattr(os, fn)
        monkeypatch.setattr(os, fn, lambda p, *a, _r=real, **k: _fail(errno.EROFS, p)
                            if _under(p, root) else _r(p, *a, **k))
    for fn in ("replace", "rename", "link"):
        real = getattr(os, fn)
        monkeypatch.setattr(os, fn, lambda s, d, *a, _r=real, **k: _fail(errno.EROFS, d)
                            if _under(d, root) else _r(s, d, *a, **k))


def simulate_disk_full(monkeypatch: pytest.MonkeyPatch, where: str = "") -> None:
    """Every write to a regular file (whose path contains ``where``) fails with ENOSPC."""
    real = os.write

    def write(fd, payload):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISREG(os.fstat(fd).st_mode) and where in target:
            _fail(errno.ENOSPC)
        return real(fd, payload)

    monkeypatch.setattr(os, "write", write)
