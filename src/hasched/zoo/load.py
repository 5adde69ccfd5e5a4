"""One entry point for "give me this model, with weights, and its evaluation data".

:func:`load_model` resolves a :class:`~hasched.zoo.ref.ModelRef` to a module in eval mode:

- a checkpoint file -> built and loaded strictly (no store involved);
- a registered model -> the checkpoint store, trained on first use (as always);
- a torchvision or ``module:`` model -> the store; when it holds nothing, training only if
  asked (``train=True``), random weights only if asked (``init_only=True``), else an error
  that says both;
- ``init_only=True`` -> seeded random weights for any reference, store untouched.

:func:`eval_data` loads the reference's dataset and adapts it to the model's input.

Example:
    >>> from hasched.zoo.load import eval_data, load_model
    >>> from hasched.zoo.ref import ModelRef
    >>> ref = ModelRef.from_options(torchvision="resnet18", dataset="fashion-mnist")
    >>> model, meta = load_model(ref, 1, init_only=True)
    >>> x, y, info = eval_data(ref, 100)  # doctest: +SKIP
    >>> info["input"]["steps"]  # doctest: +SKIP
    ['resize 28x28 -> 32x32 (bilinear, half-pixel)', 'repeat channels 1 -> 3']
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hasched.errors import HaschedError
from hasched.io import make_dirs
from hasched.zoo.data import load_dataset, parse_image_range
from hasched.zoo.ref import ModelRef, adapter_for, build_model, builder_origin
from hasched.zoo.train import (
    CheckpointNotFoundError,
    check_store,
    load_or_train_ref,
    load_stored,
    save_checkpoint,
    train_ref,
)
from hasched.zoo.weights import file_sha256, load_strict, read_state_file

__all__ = ["eval_data", "load_model"]


def load_model(
    ref: ModelRef,
    seed: int,
    *,
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    train: bool = False,
    init_only: bool = False,
    epochs: int | None = None,
    train_subset: int | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """The referenced model with its weights, on CPU in eval mode, and its metadata.

    Args:
        ref: The model.
        seed: Model seed: which stored/trained instance, or the seed of random weights.
        models_dir: Checkpoint store, see :func:`hasched.zoo.train.resolve_models_dir`.
        data_dir: Dataset location (for training).
        train: Train (and store) a model the store does not hold (otherwise a missing
            checkpoint is an error: training takes minutes).
        init_only: Random weights from ``seed`` (builder's init); nothing is read or stored.
        epochs: Epoch override when training.
        train_subset: Train on the first N training images only.
        log: Called with one-line progress messages (training needed...).
        progress: Show a progress bar while training.

    Returns:
        ``(model, meta)``; ``meta["weights"]`` is ``"checkpoint"`` (a file), ``"trained"``
        (the store or a fresh training run) or ``"random-init"``.

    Raises:
        HaschedError: Contradictory options, a bad or mismatched checkpoint, a missing stored
            model that may not be trained, or any error of building/training.
    """
    if init_only and (train or ref.checkpoint):
        raise HaschedError("random initial weights (init_only) exclude training and a"
                           " checkpoint file")
    if ref.checkpoint is not None:
        return _load_file(ref, seed)
    if init_only:
        model = build_model(ref, seed).eval()
        return model, _meta(ref, seed, "random-init")
    if ref.kind == "registered":
        model, meta = load_or_train_ref(ref, seed, models_dir, data_dir, progress, log,
                                        epochs=epochs, train_subset=train_subset, train=train)
        return model, {**meta, "weights": "trained"}
    try:
        model, meta = load_stored(ref, seed, models_dir)
        return model, {**meta, "weights": "trained"}
    except CheckpointNotFoundError as err:
        if not train:
            raise HaschedError(f"{err}; train it first (hasched train), give a checkpoint"
                               " file, or ask for random weights explicitly") from None
    folder = check_store(ref.store_name, seed, models_dir)  # before, not after, training
    make_dirs(folder)
    if log is not None:
        log(f"training {ref.store_name} seed {seed} on {ref.dataset}")
    model, meta = train_ref(ref, seed, data_dir=data_dir, epochs=epochs,
                            train_subset=train_subset, progress=progress, state_dir=folder,
                            log=log)
    save_checkpoint(model, meta, models_dir)
    return model, {**meta, "weights": "trained"}


def _load_file(ref: ModelRef, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``ref`` and load its checkpoint file strictly."""
    path = Path(ref.checkpoint)
    state = read_state_file(path)
    model = build_model(ref, seed)
    hint = " (num_classes?)" if ref.num_classes is not None else ""
    load_strict(model, state, path, ref.name, exact_dtype=False, hint=hint)
    meta = _meta(ref, seed, "checkpoint")
    meta.update(checkpoint=str(path), checkpoint_sha256=file_sha256(path))
    return model.eval(), meta


def _meta(ref: ModelRef, seed: int, weights: str) -> dict[str, Any]:
    return {"model": ref.store_name, "seed": seed, "weights": weights, "ref": ref.to_dict(),
            "builder": builder_origin(ref), "dataset": ref.dataset}


def eval_data(
    ref: ModelRef,
    images: str | int | slice | None = None,
    data_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    *,
    model: nn.Module | None = None,
    split: str = "test",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Images of ``ref``'s dataset shaped for its model: ``(images, labels, info)``.

    Args:
        ref: The model reference (its dataset, and the input its model expects).
        images: Which images: None (all), N (the first N), ``"a:b"`` or a slice.
        data_dir: Dataset location.
        device: Where the tensors go.
        model: The built model, used to infer a ``module:`` model's input; built from seed 0
            when needed and not given.
        split: ``"test"`` (default) or ``"train"``.

    Returns:
        ``images (N, C, H, W)``, ``labels (N,)`` and ``info`` with ``dataset``,
        ``fingerprint``, ``start``, ``stop`` and ``input`` (what the adapter did).
    """
    ds = load_dataset(ref.dataset, split, data_dir)
    sl = parse_image_range(images, len(ds))
    adapter = adapter_for(ref, model)
    info = {"dataset": ds.name, "fingerprint": ds.fingerprint, "start": sl.start,
            "stop": sl.stop, "input": adapter.describe()}
    x = adapter(ds.images[sl].to(device))
    return x, ds.labels[sl].to(device), info
