"""The command line as a user runs it: JSON output, one-line errors, nothing overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hasched.zoo.train import save_checkpoint, train_model

DATA = os.environ.get("HASCHED_DATA_DIR", "")
needs_data = pytest.mark.skipif(not (Path(DATA) / "mnist").is_dir(),
                                reason="needs the offline MNIST files (HASCHED_DATA_DIR)")


def run(args: list[str], env: dict | None = None, cwd: Path | None = None):
    full = dict(os.environ, HASCHED_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "hasched.cli", *args], capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=300)


def assert_clean_error(res, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("hasched: error:")]
    assert len(errors) == 1 and res.stderr.rstrip().endswith(errors[0]), res.stderr
    for n in needles:
        assert n in errors[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 2-step checkpoint (only tests marked ``needs_data`` use it)."""
    d = tmp_path_factory.mktemp("models")
    model, meta = train_model("mnist32-cnn", 1, train_subset=256, max_steps=2, progress=False)
    save_checkpoint(model, meta, d)
    return d


@needs_data
def test_evaluate_json(models):
    res = run(["evaluate", "--layers", "c0+h2", "--error", "bitflip", "--fr-max", "5e-3",
               "--images", "64", "--repeats", "2", "--json"],
              {"HASCHED_MODELS_DIR": str(models)})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["scenario"]["layers"] == ["c0", "h2"] and out["scenario"]["fault"] == "bitflip"
    for key in ("model", "seed", "layers", "error", "fr_max", "profile_seed", "repeats",
                "images", "clean_accuracy", "accuracy_mean", "accuracy_std", "accuracies"):
        assert key in out
    assert out["layers"] == ["c0", "h2"] and out["images"] == 64 and out["repeats"] == 2
    assert len(out["accuracies"]) == 2 and all(0 <= a <= 1 for a in out["accuracies"])
    assert out["accuracy_mean"] == pytest.approx(np.mean(out["accuracies"]))


@needs_data
def test_evaluate_is_reproducible_and_profile_file_equals_seed(models, tmp_path):
    env = {"HASCHED_MODELS_DIR": str(models)}
    args = ["evaluate", "--images", "64", "--repeats", "2", "--json", "--fr-max", "0.3",
            "--error", "flip-to-0", "--layers", "h0"]
    a, b = run(args, env), run(args, env)
    assert json.loads(a.stdout)["accuracies"] == json.loads(b.stdout)["accuracies"]
    assert run(["profile", "--fr-max", "0.3", "--seed", "1", "--out",
                str(tmp_path / "p.npy")]).returncode == 0
    c = run(args + ["--profile", str(tmp_path / "p.npy")], env)
    assert json.loads(c.stdout)["accuracies"] == json.loads(a.stdout)["accuracies"]


@needs_data
@pytest.mark.parametrize("args,needle", [
    (["--model", "resnet-9000"], "unknown model"),
    (["--layers", "h7"], "unknown layer"),
    (["--error", "flip-to-2"], "unknown fault model"),
    (["--fr-max", "1.5"], "--fr-max"),
    (["--images", "20000"], "image range"),
    (["--repeats", "0"], "repeats"),
])
def test_bad_arguments(models, args, needle):
    res = run(["evaluate", "--images", "64", *args], {"HASCHED_MODELS_DIR": str(models)})
    assert_clean_error(res, needle)


@needs_data
def test_malformed_files(models, tmp_path):
    env = {"HASCHED_MODELS_DIR": str(models)}
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "rates.npy").write_bytes(b"nope")
    (tmp_path / "sched.json").write_text(json.dumps({"permutations": {"c0": [0, 0, 1]}}))
    assert_clean_error(run(["evaluate", "--profile", str(tmp_path / "bad.json")], env),
                       "malformed")
    assert_clean_error(run(["evaluate", "--profile", str(tmp_path / "rates.npy")], env))
    assert_clean_error(run(["evaluate", "--images", "8", "--schedule",
                            str(tmp_path / "sched.json")], env), "permutation")
    assert_clean_error(run(["evaluate", "--images", "8", "--schedule",
                            str(tmp_path / "missing.json")], env), "not found")


@needs_data
def test_corrupt_checkpoint_is_reported_and_left_alone(models, tmp_path):
    import shutil

    d = tmp_path / "store"
    shutil.copytree(models, d)
    weights = d / "mnist32-cnn" / "seed1" / "model.safetensors"
    weights.write_bytes(b"\x00" * 100)
    res = run(["evaluate", "--images", "8"], {"HASCHED_MODELS_DIR": str(d)})
    assert_clean_error(res, "corrupt")
    assert weights.read_bytes() == b"\x00" * 100


def test_missing_data_names_the_places_tried(tmp_path):
    res = run(["evaluate", "--images", "8", "--train"],
              {"HASCHED_DATA_DIR": str(tmp_path / "nodata"),
               "HASCHED_MODELS_DIR": str(tmp_path / "m"), "HOME": str(tmp_path)})
    assert_clean_error(res, "nodata")


def test_profile_never_overwrites(tmp_path):
    out = tmp_path / "p.json"
    out.write_text("keep me")
    assert_clean_error(run(["profile", "--out", str(out)]), "exists")
    assert out.read_text() == "keep me"
    res = run(["profile", "--fr-max", "0.01", "--seed", "2", "--out", str(tmp_path / "q.json")])
    assert res.returncode == 0
    obj = json.loads((tmp_path / "q.json").read_text())
    assert np.array_equal(np.array(obj["rates"]),
                          np.random.default_rng(2).uniform(0, 0.01, (20, 32)))


def test_list_shows_registries():
    res = run(["list"])
    assert res.returncode == 0
    for name in ("mnist32-cnn", "fashion-cnn", "flip-to-1", "bf16", "ga", "random",
                 "stuck-at", "dead", "systolic", "gpu-tiles", "drum4", "mitchell", "sdc1"):
        assert name in res.stdout
