"""Training any referenced model (:class:`~hasched.zoo.ref.ModelRef`) and the on-disk
checkpoint store.

Training is deterministic for a given seed on CPU: weights are initialised from an explicit
:class:`torch.Generator`, mini-batches are shuffled with another one, and dropout (which can
only draw from the global RNG) runs inside :func:`torch.random.fork_rng`, so the caller's
global RNG state is restored afterwards.

Checkpoints live in ``<models_dir>/<store name>/seed<seed>/`` as ``model.safetensors`` plus
``meta.json`` (the store name of a registered model on its own dataset is its name, e.g.
``mnist32-cnn``; see :attr:`~hasched.zoo.ref.ModelRef.store_name`); ``models_dir`` is the
explicit argument, else ``$HASCHED_MODELS_DIR``, else ``~/.cache/hasched/models``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from hasched.errors import HaschedError
from hasched.io import atomic_write, check_out_dir, make_dirs, read_json, require
from hasched.zoo.data import Dataset, dataset_classes, load_dataset
from hasched.zoo.fit import (
    TrainingState,
    check_outputs,
    evaluate_accuracy,
    fit,
    recalibrate_batchnorm,
)
from hasched.zoo.models import GENERIC_RECIPE, TrainRecipe, get_model_spec, init_weights
from hasched.zoo.ref import ModelRef, adapter_for, build_model, builder_origin
from hasched.zoo.weights import load_strict

__all__ = [
    "CheckpointNotFoundError",
    "TrainConfig",
    "check_store",
    "checkpoint_dir",
    "evaluate_accuracy",
    "load_checkpoint",
    "load_or_train",
    "load_or_train_ref",
    "load_stored",
    "missing_checkpoint_message",
    "recipe_for",
    "require_checkpoint",
    "require_stored",
    "resolve_models_dir",
    "save_checkpoint",
    "stored_seeds",
    "train_model",
    "train_ref",
]

_WEIGHTS = "model.safetensors"
_META = "meta.json"
# A killed training run's resume state, next to the checkpoint it will become.
TRAINING_STATE = "training-state.pt"
# Offsets the shuffling stream from the init stream so that neither depends on how many
# numbers the other consumed.
_SHUFFLE_SEED_OFFSET = 0x5EED_0FF5


class CheckpointNotFoundError(HaschedError):
    """No checkpoint is stored for a (model, seed) pair (as opposed to a corrupt one)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        ref: The model (and dataset) to train.
        seed: Seed for weight init, shuffling and dropout.
        epochs: Epoch count overriding the recipe's (scaled) one, or None.
        max_steps: Stop after this many optimiser steps (for tests), or None.
        train_subset: Use only the first N training images, or None.
        device: Torch device string.
    """

    ref: ModelRef
    seed: int
    epochs: int | None = None
    max_steps: int | None = None
    train_subset: int | None = None
    device: str = "cpu"


def _scaled_epochs(recipe_epochs: int, reference: int, n_train: int) -> int:
    # Keep the recipe's number of optimiser steps when the training set is smaller than the
    # one the recipe was written for (e.g. the 10k offline MNIST subset -> 6x the epochs).
    return max(1, round(recipe_epochs * reference / n_train))


def recipe_for(ref: ModelRef) -> TrainRecipe:
    """A registered model's own recipe; :data:`GENERIC_RECIPE` for any other model."""
    return get_model_spec(ref.name).recipe if ref.kind == "registered" else GENERIC_RECIPE


def train_model(
    model_name: str,
    seed: int,
    *,
    data_dir: str | Path | None = None,
    epochs: int | None = None,
    train_subset: int | None = None,
    max_steps: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    download: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a registered model with its recipe on its dataset (see :func:`train_ref`).

    Raises:
        HaschedError: Unknown model, missing data, or invalid arguments.
    """
    return train_ref(ModelRef(model_name), seed, data_dir=data_dir, epochs=epochs,
                     train_subset=train_subset, max_steps=max_steps, device=device,
                     progress=progress, download=download)


def _step_budget(cfg: TrainConfig, recipe, n_train: int) -> tuple[int, int, int]:
    """``(epochs, steps per epoch, total steps)`` of a run on ``n_train`` images.

    The recipe's epochs are scaled so that the number of optimiser steps matches the
    recipe's reference training-set size (unless ``cfg.epochs`` overrides them).
    """
    if n_train == 0:
        raise HaschedError(f"training split of {cfg.ref.dataset!r} is empty")
    n_epochs = cfg.epochs or _scaled_epochs(recipe.epochs, recipe.reference_train_size, n_train)
    steps_per_epoch = math.ceil(n_train / recipe.batch_size)
    total_steps = n_epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    return n_epochs, steps_per_epoch, total_steps


def train_ref(
    ref: ModelRef,
    seed: int,
    *,
    data_dir: str | Path | None = None,
    epochs: int | None = None,
    train_subset: int | None = None,
    max_steps: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    download: bool = True,
    state_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train any referenced model on its dataset and evaluate it on the test split.

    Registered models use their recipe (and, for the paper models, their Keras-style init
    from an explicit generator); other models use :data:`GENERIC_RECIPE` with their builder's
    own initialisation, drawn from a seeded fork of the global RNG. Images go through the
    model's :class:`~hasched.zoo.data.InputAdapter` batch by batch. Models with BatchNorm get
    their running statistics re-estimated after training (:func:`recalibrate_batchnorm`).

    Args:
        ref: The model and dataset.
        seed: Seed for init, shuffling and dropout; same seed on CPU gives identical weights.
        data_dir: Dataset location, see :func:`hasched.zoo.data.find_dataset_dir`.
        epochs: Override the epoch count; by default the recipe's epochs scaled so the number
            of optimiser steps matches the recipe's reference training-set size.
        train_subset: Train on the first N training images only.
        max_steps: Stop after this many optimiser steps.
        device: Torch device string.
        progress: Show a tqdm progress bar on stderr.
        download: Allow downloading the dataset if it is not found locally.
        state_dir: Keep a resume state (``training-state.pt``) here while training, and
            continue from one left by a killed run of the same training (bit for bit);
            :func:`save_checkpoint` removes it. ``None``: no state is kept.
        log: Called with one line when a run resumes.

    Returns:
        ``(model, meta)``: the trained model in eval mode and its metadata dict.

    Raises:
        HaschedError: Missing data, invalid arguments, a checkpoint reference (training
            starts from scratch), or a model that cannot take the dataset's images.
    """
    for label, value in (("epochs", epochs), ("train_subset", train_subset),
                         ("max_steps", max_steps)):
        if value is not None and value < 1:
            raise HaschedError(f"{label} must be at least 1, got {value}")
    if ref.checkpoint is not None:
        raise HaschedError(f"{ref.name}: training starts from scratch; drop the checkpoint"
                           f" {ref.checkpoint}")
    cfg = TrainConfig(ref, seed, epochs, max_steps, train_subset, device)
    recipe = recipe_for(ref)
    train = load_dataset(ref.dataset, "train", data_dir, download=download)
    test = load_dataset(ref.dataset, "test", data_dir, download=download)
    x_train, y_train = train.images, train.labels
    if cfg.train_subset is not None:
        x_train, y_train = x_train[: cfg.train_subset], y_train[: cfg.train_subset]
    n_train = int(y_train.shape[0])
    n_epochs, steps_per_epoch, total_steps = _step_budget(cfg, recipe, n_train)
    x_train, y_train = x_train.to(cfg.device), y_train.to(cfg.device)

    state = None if state_dir is None else TrainingState(
        Path(state_dir) / TRAINING_STATE, _run_identity(cfg, recipe, train, total_steps),
        log=log)
    started, cpu_started = time.perf_counter(), time.process_time()
    model, adapter, step, loss_value, n_recalibrated = _build_and_fit(
        cfg, recipe, x_train, y_train, total_steps, progress, state)
    timing = (time.perf_counter() - started, time.process_time() - cpu_started)
    accuracy = evaluate_accuracy(model, test, device=cfg.device, adapter=adapter)
    model.eval()
    epochs_done = step / steps_per_epoch if step < n_epochs * steps_per_epoch else n_epochs
    meta = _train_meta(cfg, recipe, (train, test), n_train, step, epochs_done, loss_value,
                       accuracy, timing)
    meta.update(ref=ref.to_dict(), builder=builder_origin(ref), input=adapter.describe())
    if n_recalibrated:
        meta["bn_recalibration_images"] = n_recalibrated
    return model, meta


def _build_and_fit(cfg: TrainConfig, recipe: TrainRecipe, x_train: torch.Tensor,
                   y_train: torch.Tensor, total_steps: int, progress: bool,
                   state: TrainingState | None):
    """Builds, initialises and trains the model inside a forked global RNG (dropout and
    builders' own inits draw from it), so the caller's RNG is untouched.

    Returns:
        ``(model, adapter, steps taken, last loss, BatchNorm recalibration images)``.
    """
    ref = cfg.ref
    init_gen = torch.Generator().manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + _SHUFFLE_SEED_OFFSET)
    dev = torch.device(cfg.device)
    # fork_rng restores the CPU RNG plus the listed CUDA devices' RNGs afterwards.
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        model = build_model(ref)
        init_weights(model, recipe.init, init_gen)
        model.to(cfg.device)
        adapter = adapter_for(ref, model)
        check_outputs(model, ref, adapter(x_train[:2]), dataset_classes(ref.dataset))
        model.train()
        step, loss_value = fit(model, recipe, x_train, y_train, adapter, total_steps,
                                shuffle_gen, progress, f"train {ref.store_name} seed{cfg.seed}",
                                state)
        n_recalibrated = recalibrate_batchnorm(model, x_train, adapter, recipe.batch_size)
    return model, adapter, step, loss_value, n_recalibrated


def _run_identity(cfg: TrainConfig, recipe: TrainRecipe, train: Dataset,
                  total_steps: int) -> dict[str, Any]:
    """What a resume state must match: the same model, seed, recipe, data and budget."""
    return json.loads(json.dumps({
        "ref": cfg.ref.to_dict(), "seed": cfg.seed, "recipe": repr(recipe),
        "train_subset": cfg.train_subset, "train_fingerprint": train.fingerprint,
        "total_steps": total_steps, "device": cfg.device}, default=str))


def _train_meta(cfg: TrainConfig, recipe: TrainRecipe, data: tuple[Dataset, Dataset],
                n_train: int, step: int, epochs_done: float, loss_value: float,
                accuracy: float, timing: tuple[float, float]) -> dict[str, Any]:
    train, test = data
    return {
        "model": cfg.ref.store_name,
        "seed": cfg.seed,
        "epochs": epochs_done,
        "steps": step,
        "batch_size": recipe.batch_size,
        "optimizer": recipe.optimizer,
        "lr": recipe.lr,
        "train_images": n_train,
        "final_loss": loss_value,
        "test_accuracy": accuracy,
        "test_images": len(test),
        "dataset": cfg.ref.dataset,
        "dataset_fingerprint": {"train": train.fingerprint, "test": test.fingerprint},
        "train_seconds": round(timing[0], 2),
        # CPU seconds too: on a shared machine wall time says more about the neighbours.
        "train_cpu_seconds": round(timing[1], 2),
        "torch_threads": torch.get_num_threads(),
        "device": cfg.device,
        "torch_version": torch.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def resolve_models_dir(models_dir: str | Path | None = None) -> Path:
    """The checkpoint root: ``models_dir``, else ``$HASCHED_MODELS_DIR``, else the user cache."""
    if models_dir is not None:
        return Path(models_dir).expanduser()
    env = os.environ.get("HASCHED_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/hasched/models").expanduser()


def checkpoint_dir(model_name: str, seed: int, models_dir: str | Path | None = None) -> Path:
    """Folder of one checkpoint: ``<models_dir>/<model>/seed<seed>``."""
    return resolve_models_dir(models_dir) / model_name / f"seed{seed}"


def stored_seeds(model_name: str, models_dir: str | Path | None = None) -> list[int]:
    """Seeds of ``model_name`` that have a checkpoint folder in the store."""
    folder = resolve_models_dir(models_dir) / model_name
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(int(n[4:]) for n in names
                  if n.startswith("seed") and n[4:].isdigit() and (folder / n / _META).is_file())


def check_store(model_name: str, seed: int, models_dir: str | Path | None = None) -> Path:
    """The store policy, checked before a training run rather than after it.

    The checkpoint folder must be new, empty or hold only checkpoint files; the store
    itself may hold anything else.

    Returns:
        The checkpoint folder.

    Raises:
        HaschedError: The store or the folder is (or lies under) a file, or the folder
            holds files that are not a checkpoint's.
    """
    store = resolve_models_dir(models_dir)
    if store.exists() and not store.is_dir():  # say so about the store, not a folder inside
        raise HaschedError(f"--models-dir {store} is a file, not a folder; use another "
                           "--models-dir")
    folder = checkpoint_dir(model_name, seed, models_dir)
    check_out_dir(folder, what="checkpoint", option="--models-dir",
                  compatible=lambda _cfg, path: _foreign_store_file(path),
                  legacy=lambda names: set(names) <= {_WEIGHTS, _META, TRAINING_STATE})
    return folder


def _foreign_store_file(path: Path) -> None:
    raise HaschedError(f"{path} is not a checkpoint file, so {path.parent} is not a "
                       "checkpoint folder; use another --models-dir")


def save_checkpoint(
    model: nn.Module, meta: dict[str, Any], models_dir: str | Path | None = None
) -> Path:
    """Store ``model``'s weights and ``meta`` under ``meta["model"]`` / ``meta["seed"]``.

    Each file is replaced atomically; if the second cannot be written, a first one that
    had no predecessor is removed again, so no half checkpoint is left.

    Returns:
        The checkpoint folder.

    Raises:
        HaschedError: The folder is not a checkpoint folder, or a write failed (full or
            read-only disk).
    """
    folder = check_store(meta["model"], int(meta["seed"]), models_dir)
    make_dirs(folder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    had_weights = (folder / _WEIGHTS).exists()
    atomic_write(folder / _WEIGHTS, save_safetensors(state))
    try:
        atomic_write(folder / _META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    except HaschedError:
        if not had_weights:
            with contextlib.suppress(OSError):
                os.unlink(folder / _WEIGHTS)
        raise
    with contextlib.suppress(OSError):  # the run is stored: its resume state is not needed
        os.unlink(folder / TRAINING_STATE)
    return folder


def _check_meta(meta: Any, meta_path: Path, model_name: str, seed: int, hint: str) -> None:
    """Schema of ``meta.json``: an object for this model and seed, numbers where numbers go."""
    try:
        require(meta, "model", str, file=meta_path)
        require(meta, "seed", int, file=meta_path)
        require(meta, "test_accuracy", float, file=meta_path, default=None)
        require(meta, "epochs", float, file=meta_path, default=None)
    except HaschedError as err:
        raise HaschedError(f"corrupt checkpoint metadata {err}{hint}") from None
    if meta["model"] != model_name or meta["seed"] != seed:
        raise HaschedError(
            f"checkpoint metadata {meta_path} is not for {model_name} seed {seed}{hint}"
        )


def _check_finite(state: dict[str, torch.Tensor], weights: Path, hint: str) -> None:
    """A header can be valid while the numbers are NaN: check every float tensor."""
    for key, tensor in state.items():
        # NaN and inf propagate into the sum, so one cheap reduction clears a tensor; only
        # a suspect one (or one whose finite values overflow the sum) is counted exactly.
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum(dtype=torch.float64)):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise HaschedError(f"checkpoint {weights} has {bad} non-finite (NaN or inf) "
                                   f"values in {key}{hint}")


def load_checkpoint(
    model_name: str, seed: int, models_dir: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a registered model's stored checkpoint (see :func:`load_stored`)."""
    return load_stored(ModelRef(model_name), seed, models_dir)


def load_stored(
    ref: ModelRef, seed: int, models_dir: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a stored checkpoint, validating it against the referenced architecture.

    The folder is ``<models_dir>/<ref.store_name>/seed<seed>``. Files are only read, never
    repaired or removed.

    Returns:
        ``(model, meta)`` with the model on CPU in eval mode.

    Raises:
        CheckpointNotFoundError: If neither file exists.
        HaschedError: If a file is missing, unreadable, or does not match the model.
    """
    name = ref.store_name
    folder = checkpoint_dir(name, seed, models_dir)
    weights, meta_path = folder / _WEIGHTS, folder / _META
    if not weights.exists() and not meta_path.exists():
        raise CheckpointNotFoundError(f"no checkpoint for {name} seed {seed} in {folder}")
    for path in (weights, meta_path):
        if not path.is_file():
            raise HaschedError(
                f"incomplete checkpoint: {path} is missing; delete {folder} to retrain"
            )
    hint = f"; delete {folder} to retrain"
    try:
        meta = read_json(meta_path, what="checkpoint metadata")
    except HaschedError as exc:
        raise HaschedError(f"corrupt {exc}{hint}") from None
    _check_meta(meta, meta_path, name, seed, hint)
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise HaschedError(f"corrupt checkpoint weights {weights}: {exc}{hint}") from None
    _check_finite(state, weights, hint)
    model = build_model(ref, seed)
    load_strict(model, state, weights, name, hint=hint)
    model.eval()
    return model, meta


def missing_checkpoint_message(
    model_name: str, seed: int, models_dir: str | Path | None = None
) -> str:
    """Says which checkpoint is missing, which seeds the store has and how to train it."""
    store = resolve_models_dir(models_dir)
    seeds = stored_seeds(model_name, models_dir)
    have = (f"it has {model_name} seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))}" if seeds else f"it has no {model_name} checkpoint")
    return (f"no checkpoint for {model_name} seed {seed} in the store {store} ({have}); "
            f"train it with `hasched train --model {model_name} --seed {seed} --models-dir "
            f"{store}` (~20-30 min on 2 cores) or add --train")


def require_checkpoint(model_name: str, seed: int, models_dir: str | Path | None = None) -> None:
    """Loads a registered model's checkpoint once to check it (see :func:`require_stored`)."""
    require_stored(ModelRef(model_name), seed, models_dir)


def require_stored(ref: ModelRef, seed: int, models_dir: str | Path | None = None) -> None:
    """Loads the stored checkpoint once to check it (missing, corrupt, NaN) before any
    output exists.

    Raises:
        CheckpointNotFoundError: Missing (the message names the seeds stored).
        HaschedError: Present but unusable.
    """
    try:
        load_stored(ref, seed, models_dir)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            missing_checkpoint_message(ref.store_name, seed, models_dir)) from None


def load_or_train(
    model_name: str,
    seed: int,
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    *,
    epochs: int | None = None,
    train: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a registered model's stored checkpoint; train and store it only when ``train``
    is set (see :func:`load_or_train_ref`)."""
    return load_or_train_ref(ModelRef(model_name), seed, models_dir, data_dir, progress, log,
                             epochs=epochs, train=train)


def load_or_train_ref(
    ref: ModelRef,
    seed: int,
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    *,
    epochs: int | None = None,
    train_subset: int | None = None,
    train: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the stored checkpoint; train and store it only when ``train`` is set.

    Training takes minutes (the full recipe ~20-30 min on 2 cores), so a missing
    checkpoint (e.g. a mistyped seed) is an error unless the caller asked for training.
    A corrupt checkpoint is reported, never silently overwritten. ``epochs`` and
    ``train_subset`` only apply when training; an existing checkpoint is returned whatever
    it was trained with.

    Args:
        ref: The model.
        seed: Model seed.
        models_dir: Checkpoint root, see :func:`resolve_models_dir`.
        data_dir: Dataset location for training.
        progress: Show a progress bar while training.
        log: Called with a one-line message when training starts.
        epochs: Epoch override for training (see :func:`train_ref`).
        train_subset: Train on the first N training images only.
        train: Train a missing checkpoint instead of raising.

    Returns:
        ``(model, meta)`` with the model in eval mode.

    Raises:
        CheckpointNotFoundError: Missing and ``train`` is False; the message names the
            store, the seeds it has and the command that trains the missing one.
    """
    try:
        return load_stored(ref, seed, models_dir)
    except CheckpointNotFoundError:
        if not train:
            raise CheckpointNotFoundError(
                missing_checkpoint_message(ref.store_name, seed, models_dir)) from None
    folder = check_store(ref.store_name, seed, models_dir)  # before, not after, training
    make_dirs(folder)  # a read-only store fails now, too
    if log is not None:
        log(f"no checkpoint for {ref.store_name} seed {seed}: training it now (stored in"
            f" {folder})")
    model, meta = train_ref(ref, seed, data_dir=data_dir, epochs=epochs,
                            train_subset=train_subset, progress=progress, state_dir=folder,
                            log=log)
    save_checkpoint(model, meta, models_dir)
    return model, meta
