"""The mechanics of one training run: the optimisation loop, checks, BatchNorm statistics.

:mod:`hasched.zoo.train` decides what to train (reference, recipe, data, seeds) and stores
the result; the functions here only run models on tensors and draw no random numbers except
through the generator they are given.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from hasched.errors import HaschedError
from hasched.zoo.data import Dataset, InputAdapter
from hasched.zoo.models import TrainRecipe
from hasched.zoo.ref import ModelRef

__all__ = ["BN_RECALIBRATION_IMAGES", "TrainingState", "check_outputs", "evaluate_accuracy", "fit",
           "make_optimizer", "min_batch_size", "recalibrate_batchnorm"]

# Training images that re-estimate BatchNorm statistics after training.
BN_RECALIBRATION_IMAGES = 2048


def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 1000,
    device: str = "cpu",
    adapter: InputAdapter | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (model is put in eval mode).

    ``adapter`` turns the dataset's images into the model's input (default: as they are).
    """
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            x = dataset.images[start : start + batch_size].to(device)
            if adapter is not None:
                x = adapter(x)
            y = dataset.labels[start : start + batch_size].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / max(len(dataset), 1)


def recalibrate_batchnorm(
    model: nn.Module,
    images: torch.Tensor,
    adapter: InputAdapter,
    batch_size: int = 128,
    n_images: int = BN_RECALIBRATION_IMAGES,
) -> int:
    """Recompute BatchNorm running statistics as an equal-weight average over training images.

    After a short training run the running statistics are still close to their initial
    values when the momentum is small (torchvision's MobileNetV3 uses 0.01: after 79 steps
    45% of the running mean is still the initial zero), and the model is useless in eval
    mode. So the statistics are re-estimated from the first ``n_images`` training images in
    order ("precise BN"): only the BatchNorm layers run in training mode, without gradients,
    with ``momentum=None`` (a cumulative average); weights are untouched and no random
    number is drawn.

    Returns:
        The number of images used (0 when the model has no BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = min(n_images, int(images.shape[0]))
    used = 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = images[start : min(start + batch_size, n)]
            if batch.shape[0] < 2:  # one image at 1x1 has no batch statistics
                break
            model(adapter(batch))
            used += int(batch.shape[0])
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return used


def check_outputs(model: nn.Module, ref: ModelRef, x: torch.Tensor, n_classes: int) -> None:
    """One eval-mode forward on two images: the model must take them and score every class.

    Eval mode so that BatchNorm statistics and dropout are untouched by the probe.
    """
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise HaschedError(f"{ref.name} cannot take {ref.dataset} images shaped"
                           f" {tuple(x.shape[1:])}: {first}") from None
    if out.ndim != 2 or out.shape[1] < n_classes:
        raise HaschedError(f"{ref.name} gives outputs shaped {tuple(out.shape[1:])} per image;"
                           f" {ref.dataset} needs {n_classes} class scores (set num_classes)")


def make_optimizer(model: nn.Module, recipe: TrainRecipe, lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``model``'s parameters (``lr`` overrides the recipe's)."""
    lr = recipe.lr if lr is None else lr
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=recipe.momentum)
    # Keras' Adam epsilon is 1e-7 (PyTorch's default is 1e-8).
    return torch.optim.Adam(model.parameters(), lr=lr, eps=1e-7)


def min_batch_size(model: nn.Module) -> int:
    """Smallest mini-batch the loop trains on: BatchNorm cannot train on one image at 1x1
    (resnet18 at 32 px), so a model with BatchNorm skips a last batch of one."""
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                    for m in model.modules()) else 1


def fit(
    model: nn.Module,
    recipe: TrainRecipe,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    adapter: InputAdapter,
    total_steps: int,
    shuffle_gen: torch.Generator,
    progress: bool,
    desc: str,
    state: TrainingState | None = None,
) -> tuple[int, float]:
    """The optimisation loop; returns ``(steps taken, last loss)``.

    With ``state``, the loop saves everything it needs to continue (weights, optimiser,
    step, position in the epoch's shuffled order, the shuffle generator at the epoch's
    start and the global RNG that dropout draws from) and, when a saved state for the same
    run exists, continues from it: a run killed at any point ends with the same weights,
    bit for bit, as an uninterrupted one.
    """
    opt = make_optimizer(model, recipe)
    loss_fn = nn.CrossEntropyLoss()
    n_train = int(y_train.shape[0])
    min_batch = min_batch_size(model)
    step, loss_value, resume_at = 0, float("nan"), 0
    saved = state.load() if state is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step, loss_value, resume_at = saved["step"], saved["loss"], saved["next_start"]
        shuffle_gen.set_state(saved["epoch_gen"])
        _set_global_rng(saved["rng"], x_train.device)
    bar = tqdm(total=total_steps, initial=step, desc=desc, file=sys.stderr,
               disable=not progress, unit="step", leave=False)
    with bar:
        while step < total_steps:
            epoch_gen = shuffle_gen.get_state()  # the order below is redrawn from this
            order = torch.randperm(n_train, generator=shuffle_gen).to(x_train.device)
            for start in range(resume_at, n_train, recipe.batch_size):
                if step >= total_steps:
                    break
                idx = order[start : start + recipe.batch_size]
                if len(idx) < min_batch:
                    continue
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(adapter(x_train[idx])), y_train[idx])
                loss.backward()
                opt.step()
                step += 1
                loss_value = float(loss.detach())
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                if state is not None and step < total_steps and state.due(step):
                    state.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "step": step, "loss": loss_value,
                                "next_start": start + recipe.batch_size,
                                "epoch_gen": epoch_gen,
                                "rng": _global_rng(x_train.device)})
            resume_at = 0
    return step, loss_value


def _global_rng(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_global_rng(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


class TrainingState:
    """Where an interrupted training run is kept, and when it is saved.

    Args:
        path: The state file (``training-state.pt`` in the checkpoint's folder).
        run: What identifies the run (model, seed, recipe, data, step budget); a state
            saved for another run is ignored and replaced.
        every_steps: Save after every this many steps; ``None``: every ``every_seconds``.
        every_seconds: Wall-clock interval between saves when ``every_steps`` is None.
        log: Called with one line when a run resumes or a stale state is replaced.
    """

    def __init__(self, path: Path, run: dict, every_steps: int | None = None,
                 every_seconds: float = 60.0, log=None) -> None:
        self.path, self.run = Path(path), run
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.log = log or (lambda msg: None)
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every_steps is not None:
            return step % self.every_steps == 0
        return time.monotonic() - self._last >= self.every_seconds

    def load(self) -> dict | None:
        """The saved state of this run, or None (no file, or another run's)."""
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a truncated or foreign file: start over
            self.log(f"ignoring an unreadable training state {self.path}; starting over")
            return None
        if saved.get("run") != self.run:
            self.log(f"{self.path} belongs to another training run; starting over")
            return None
        self.log(f"resuming training from step {saved['step']} ({self.path})")
        return saved

    def save(self, payload: dict) -> None:
        from hasched.io import atomic_write

        atomic_write(self.path, lambda fh: torch.save({**payload, "run": self.run}, fh))
        self._last = time.monotonic()

    def clear(self) -> None:
        """Removes the state once the finished checkpoint is stored."""
        self.path.unlink(missing_ok=True)
