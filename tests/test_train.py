"""Tests for hasched.zoo.train: determinism, epoch scaling, checkpoint store (tiny synthetic
data)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hasched.errors import HaschedError
from hasched.zoo import data, train
from hasched.zoo.train import (
    CheckpointNotFoundError,
    checkpoint_dir,
    load_checkpoint,
    load_or_train,
    resolve_models_dir,
    save_checkpoint,
    train_model,
)
from idx_files import FILES, write_idx


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A parent folder holding small synthetic mnist/ and fashion-mnist/ datasets."""
    monkeypatch.delenv("HASCHED_DATA_DIR", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("tests must never download")

    monkeypatch.setattr(data, "_download", no_download)
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for folder in ("mnist", "fashion-mnist"):
        (root / folder).mkdir(parents=True)
        for split, n in (("train", 256), ("test", 64)):
            labels = rng.integers(0, 10, n, dtype=np.uint8)
            # Learnable: brightness of a label-dependent row band, plus noise.
            images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
            for i, lab in enumerate(labels):
                images[i, 2 * lab + 4 : 2 * lab + 6, :] = 255
            img_file, lab_file = FILES[split]
            write_idx(root / folder / img_file, images)
            write_idx(root / folder / lab_file, labels)
    return root


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("HASCHED_MODELS_DIR", raising=False)
    return tmp_path / "models"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_deterministic_per_seed_and_keeps_global_rng(data_dir):
    state = torch.get_rng_state()
    kwargs = dict(data_dir=data_dir, max_steps=2, train_subset=64, progress=False, download=False)
    a, meta = train_model("mnist32-cnn", 1, **kwargs)
    b, _ = train_model("mnist32-cnn", 1, **kwargs)
    c, _ = train_model("mnist32-cnn", 2, **kwargs)
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    assert not a.training
    assert meta["steps"] == 2 and meta["train_images"] == 64 and meta["dataset"] == "mnist32"
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and meta["test_images"] == 64


def test_dropout_model_is_deterministic(data_dir):
    kwargs = dict(data_dir=data_dir, max_steps=2, train_subset=128, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's even-kernel 'same' padding note
        a, meta = train_model("fashion-cnn", 3, **kwargs)
        # Dropout masks must come from the seed, not from whatever the global RNG holds.
        torch.rand(100)
        b, _ = train_model("fashion-cnn", 3, **kwargs)
    assert _same_weights(a, b)
    assert meta["train_images"] == 128 and meta["steps"] == 2


def test_epochs_are_scaled_to_keep_the_recipe_steps(data_dir):
    assert train._scaled_epochs(25, 60000, 10000) == 150
    assert train._scaled_epochs(25, 60000, 60000) == 25
    assert train._scaled_epochs(25, 60000, 200000) == 8
    # 200 images with batch 128 = 2 steps per epoch (the last one partial).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, meta = train_model(
            "fashion-cnn", 0, data_dir=data_dir, epochs=2, train_subset=200, progress=False
        )
    assert (meta["epochs"], meta["steps"], meta["train_images"]) == (2, 4, 200)


def test_training_learns_the_synthetic_task(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, meta = train_model("fashion-cnn", 0, data_dir=data_dir, epochs=5, progress=False)
    assert meta["test_accuracy"] > 0.5, meta


def test_invalid_arguments(data_dir):
    with pytest.raises(HaschedError, match="epochs must be at least 1"):
        train_model("mnist32-cnn", 0, data_dir=data_dir, epochs=0, progress=False)
    with pytest.raises(HaschedError, match="unknown model"):
        train_model("nope", 0, data_dir=data_dir, progress=False)


def test_models_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HASCHED_MODELS_DIR", str(tmp_path / "env"))
    assert resolve_models_dir() == tmp_path / "env"
    assert resolve_models_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("HASCHED_MODELS_DIR")
    assert resolve_models_dir() == Path("~/.cache/hasched/models").expanduser()
    assert checkpoint_dir("mnist32-cnn", 4, tmp_path) == tmp_path / "mnist32-cnn" / "seed4"


def test_checkpoint_round_trip(data_dir, models_dir):
    model, meta = train_model(
        "mnist32-cnn", 5, data_dir=data_dir, max_steps=1, train_subset=16, progress=False
    )
    folder = save_checkpoint(model, meta, models_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors"]
    loaded, loaded_meta = load_checkpoint("mnist32-cnn", 5, models_dir)
    assert _same_weights(model, loaded) and not loaded.training
    assert loaded_meta == json.loads(json.dumps(meta))
    for key in ("model", "seed", "epochs", "steps", "test_accuracy", "dataset",
                "dataset_fingerprint", "train_images", "torch_version", "created"):  # fmt: skip
        assert key in loaded_meta


def test_missing_checkpoint(models_dir):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint for fashion-cnn seed 9"):
        load_checkpoint("fashion-cnn", 9, models_dir)


@pytest.fixture
def stored(data_dir, models_dir):
    model, meta = train_model(
        "mnist32-cnn", 0, data_dir=data_dir, max_steps=1, train_subset=16, progress=False
    )
    return save_checkpoint(model, meta, models_dir)


def _assert_rejected_untouched(folder: Path, match: str, models_dir: Path, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(HaschedError, match=match) as err:
        load_checkpoint("mnist32-cnn", 0, models_dir)
    assert not isinstance(err.value, CheckpointNotFoundError)

    def no_training(*args, **kwargs):
        raise AssertionError("a corrupt checkpoint must not be retrained over")

    monkeypatch.setattr(train, "train_ref", no_training)
    with pytest.raises(HaschedError, match=match):
        load_or_train("mnist32-cnn", 0, models_dir)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_corrupt_weights_are_reported_not_overwritten(stored, models_dir, monkeypatch):
    weights = stored / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _assert_rejected_untouched(stored, "corrupt checkpoint weights", models_dir, monkeypatch)


def test_wrong_shapes_are_reported(stored, models_dir, monkeypatch):
    state = dict(load_checkpoint("mnist32-cnn", 0, models_dir)[0].state_dict())
    state["op.weight"] = torch.zeros(10, 65)
    save_file(state, str(stored / "model.safetensors"))
    _assert_rejected_untouched(stored, r"op\.weight is \(10, 65\)", models_dir, monkeypatch)


def test_wrong_keys_are_reported(stored, models_dir, monkeypatch):
    save_file({"c0.weight": torch.zeros(32, 1, 4, 4)}, str(stored / "model.safetensors"))
    _assert_rejected_untouched(stored, "keys differ", models_dir, monkeypatch)


def test_bad_json_is_reported(stored, models_dir, monkeypatch):
    (stored / "meta.json").write_text("{not json", encoding="utf-8")
    _assert_rejected_untouched(stored, "corrupt checkpoint metadata", models_dir, monkeypatch)


def test_meta_for_another_model_is_reported(stored, models_dir, monkeypatch):
    meta = json.loads((stored / "meta.json").read_text(encoding="utf-8"))
    (stored / "meta.json").write_text(json.dumps({**meta, "seed": 1}), encoding="utf-8")
    _assert_rejected_untouched(stored, "not for mnist32-cnn seed 0", models_dir, monkeypatch)


def test_half_missing_checkpoint_is_reported(stored, models_dir, monkeypatch):
    (stored / "meta.json").unlink()
    _assert_rejected_untouched(stored, "incomplete checkpoint", models_dir, monkeypatch)


def test_load_or_train_trains_once_then_loads(data_dir, models_dir, monkeypatch):
    real_train = train.train_ref
    calls = []

    def quick_train(*args, **kwargs):
        calls.append(kwargs)
        return real_train(*args, **{**kwargs, "max_steps": 1, "train_subset": 16})

    monkeypatch.setattr(train, "train_ref", quick_train)
    messages: list[str] = []
    # A missing checkpoint is an error unless training was asked for: the message names
    # the store, the seeds it holds and the command to run.
    with pytest.raises(CheckpointNotFoundError, match=r"seed 7 in the store .*--train") as err:
        load_or_train("mnist32-cnn", 7, models_dir, data_dir, False, messages.append)
    assert "hasched train --model mnist32-cnn --seed 7" in str(err.value)
    assert not calls and not messages
    model, meta = load_or_train("mnist32-cnn", 7, models_dir, data_dir, False, messages.append,
                                train=True)
    assert len(calls) == 1 and len(messages) == 1
    assert messages[0].startswith("no checkpoint for mnist32-cnn seed 7: training")
    assert (checkpoint_dir("mnist32-cnn", 7, models_dir) / "model.safetensors").is_file()
    again, meta2 = load_or_train("mnist32-cnn", 7, models_dir, data_dir, False, messages.append)
    assert len(calls) == 1 and len(messages) == 1
    assert _same_weights(model, again) and not again.training
    assert meta2["steps"] == meta["steps"] == 1


class _Killed(BaseException):
    """Stands in for kill -9: nothing after it runs (not even ``except Exception``)."""


@pytest.mark.parametrize("when", ["right after a save", "between saves"])
def test_a_killed_training_run_resumes_bit_for_bit(data_dir, models_dir, monkeypatch, when):
    from hasched.zoo import fit as fit_mod
    from hasched.zoo.ref import ModelRef
    from hasched.zoo.train import TRAINING_STATE, train_ref

    # fashion-cnn: Adam state and dropout draws must both survive; 256 images at batch 128
    # are 2 steps per epoch, so step 3 is in the middle of the second epoch.
    ref = ModelRef("fashion-cnn")
    kwargs = dict(data_dir=data_dir, max_steps=5, train_subset=256, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        whole, meta = train_ref(ref, 2, **kwargs)
        folder = models_dir / "fashion-cnn" / "seed2"
        folder.mkdir(parents=True)
        real_save, real_due = fit_mod.TrainingState.save, fit_mod.TrainingState.due

        def save_then_die(self, payload):
            real_save(self, payload)
            if payload["step"] == 3:
                raise _Killed

        def die_before_saving(self, step):
            if step == 3:  # step 3 is done, its state is not saved: resume redoes it
                raise _Killed
            return step % 2 == 0

        if when == "right after a save":
            monkeypatch.setattr(fit_mod.TrainingState, "due", lambda self, step: True)
            monkeypatch.setattr(fit_mod.TrainingState, "save", save_then_die)
        else:
            monkeypatch.setattr(fit_mod.TrainingState, "due", die_before_saving)
        with pytest.raises(_Killed):
            train_ref(ref, 2, state_dir=folder, **kwargs)
        saved = torch.load(folder / TRAINING_STATE, weights_only=True)
        assert saved["step"] == (3 if when == "right after a save" else 2)
        monkeypatch.setattr(fit_mod.TrainingState, "save", real_save)
        monkeypatch.setattr(fit_mod.TrainingState, "due", real_due)
        lines: list[str] = []
        torch.rand(10)  # the global RNG moved on meanwhile: the state must not care
        resumed, meta2 = train_ref(ref, 2, state_dir=folder, log=lines.append, **kwargs)
    assert _same_weights(whole, resumed) and meta2["steps"] == meta["steps"] == 5
    assert lines == [f"resuming training from step {saved['step']} ({folder / TRAINING_STATE})"]
    save_checkpoint(resumed, meta2, models_dir)
    assert not (folder / TRAINING_STATE).exists()  # stored: the state is gone


def test_a_resume_state_of_another_run_is_ignored(data_dir, models_dir, monkeypatch):
    from hasched.zoo import fit as fit_mod
    from hasched.zoo.ref import ModelRef
    from hasched.zoo.train import TRAINING_STATE, train_ref

    ref = ModelRef("mnist32-cnn")
    folder = models_dir / "mnist32-cnn" / "seed1"
    folder.mkdir(parents=True)
    kwargs = dict(data_dir=data_dir, train_subset=64, progress=False)
    monkeypatch.setattr(fit_mod.TrainingState, "due", lambda self, step: True)
    train_ref(ref, 1, state_dir=folder, max_steps=3, **kwargs)  # leaves a state at step 2
    assert torch.load(folder / TRAINING_STATE, weights_only=True)["step"] == 2
    lines: list[str] = []
    fresh, _ = train_ref(ref, 1, max_steps=2, **kwargs)
    other, _ = train_ref(ref, 1, state_dir=folder, max_steps=2, log=lines.append, **kwargs)
    assert _same_weights(fresh, other) and "another training run" in lines[0]
