"""Fault-aware pruning (FAP) and fault-aware retraining (FAP+T) of one chip.

**FAP.** On a weight-stationary array every weight sits on one PE
(:func:`hasched.sim.fap.faulty_weight_masks`). FAP bypasses each faulty PE: the partial sum
passes through it unchanged, so its product contributes exactly what a zero weight would.
A FAP model therefore runs *fault-free with those weights zeroed*, in plain PyTorch, for
every permanent fault kind (stuck-at and dead alike), which is what makes retraining cheap.

**FAP+T.** Fine-tune the pruned model on training images with the recipe's optimiser
(:func:`hasched.zoo.fit.make_optimizer`) and mini-batch size, re-applying the mask after
every optimiser step, so the pruned weights are exactly zero at every step and at the end.

Choices (each explicit in :class:`FineTune`):

- *Learning rate*: the recipe's own by default. The recipes here train at a constant rate,
  so it is the rate the model converged at, and prune-then-retrain methods continue at the
  final training rate. Measured on the mlp (Adam, 1e-3; README): a fresh Adam at that rate
  first *costs* accuracy at low faulty-PE rates (5 %: 96.9 -> 95.7 % after 0.25 epochs),
  while 1e-4 recovers monotonically and lets Reduce meet its target; pass ``--lr`` for
  Adam-trained models.
- *Mini-batch*: the recipe's by default. A large-batch recipe takes few steps per epoch of
  a small fine-tuning set: mnist32-cnn's (SGD, 0.01, batch 1024) takes 10 on the 10k MNIST
  subset, and its worst map chip at 10 % faulty PEs was still 1.1-1.3 points down after
  4 epochs. ``--batch-size 128 --lr 0.00125`` keeps the recipe's rate per example (linear
  scaling) with 79 steps per epoch and brings it within 1 point after 1 epoch, while
  batch 128 at the recipe's 0.01 overshoots (README, Reduce results).
- *Amount*: epochs over the fine-tuning set; a fraction ``e`` of an epoch is that share of
  the epoch's mini-batches, ``round_half_up(e * steps_per_epoch)`` optimiser steps
  (:func:`steps_for`). Training to several amounts is one run: the accuracy after ``e``
  epochs is read when the run passes ``steps_for(e)``, so ``e = 0.5`` then ``e = 1`` costs
  one epoch, not one and a half, and equals two separate runs bit for bit (same seed, same
  mini-batch order, same dropout stream).
- *Randomness*: a shuffling :class:`torch.Generator` and a dropout stream (the global RNG,
  forked, saved and restored between pieces of a run), both derived from one seed.
- *BatchNorm*: statistics re-estimated from the fine-tuning images before every
  evaluation (:func:`hasched.zoo.fit.recalibrate_batchnorm`), as after normal training.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from hasched.errors import HaschedError
from hasched.seeds import derive_seed
from hasched.sim.fap import apply_masks
from hasched.zoo.fit import make_optimizer, min_batch_size, recalibrate_batchnorm
from hasched.zoo.models import TrainRecipe

__all__ = ["FineTune", "FapTrainer", "steps_for", "top1", "masked_max", "pruned_share"]


@dataclass(frozen=True)
class FineTune:
    """How FAP+T fine-tunes (the same for every chip of a study).

    Attributes:
        train_images: Training images used (an image range, e.g. ``:10000``).
        lr: Learning rate; ``None`` = the recipe's (see the module docstring).
        batch_size: Mini-batch size; ``None`` = the recipe's.
        seed: Base seed; each chip's run derives its own from it and the chip's name.
    """

    train_images: str = ":10000"
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0

    def validate(self) -> FineTune:
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise HaschedError(f"--lr must be a positive number, got {self.lr!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise HaschedError(f"--batch-size must be >= 1, got {self.batch_size}")
        return self

    def resolved(self, recipe: TrainRecipe) -> tuple[float, int]:
        """``(learning rate, batch size)`` after the recipe's defaults."""
        return (recipe.lr if self.lr is None else float(self.lr),
                recipe.batch_size if self.batch_size is None else int(self.batch_size))


def steps_for(epochs: float, steps_per_epoch: int) -> int:
    """Optimiser steps of ``epochs`` epochs: the epoch's share of mini-batches, half up.

    ``round(..., 9)`` first, so that ``0.35 * 20`` (6.999999999999999 in floating point)
    counts as the 7 steps it means.
    """
    if not (math.isfinite(epochs) and epochs >= 0):
        raise HaschedError(f"epochs must be finite and >= 0, got {epochs!r}")
    return int(math.floor(round(epochs * steps_per_epoch, 9) + 0.5))


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on model-ready images ``x``."""
    model.eval()
    correct = 0
    for start in range(0, int(y.shape[0]), batch_size):
        correct += int((model(x[start:start + batch_size]).argmax(1)
                        == y[start:start + batch_size]).sum())
    return correct / max(int(y.shape[0]), 1)


def masked_max(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """Largest ``|w|`` among the pruned weights (0.0 when FAP holds)."""
    mods = dict(model.named_modules())
    vals = [float(mods[k].weight.detach()[m].abs().max()) for k, m in masks.items() if m.any()]
    return max(vals, default=0.0)


def pruned_share(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """Share of the accelerated layers' weights that FAP zeroes."""
    mods = dict(model.named_modules())
    total = sum(mods[k].weight.numel() for k in masks)
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def _as_is(images: torch.Tensor) -> torch.Tensor:
    return images  # the training images are model-ready already


class FapTrainer:
    """One chip's FAP+T run, advanced piecewise: ``advance_to(steps)``, evaluate, go on.

    Args:
        model: The trained model; it is copied, never changed.
        masks: ``{layer: BoolTensor}`` weights on faulty PEs (FAP zeroes them at once).
        recipe: The model's training recipe (optimiser, momentum).
        x: Model-ready training images ``(N, C, H, W)``. y: Their labels ``(N,)``.
        settings: :class:`FineTune`. run_key: Names the run (e.g. the chip), so that each
            chip draws its own mini-batch order and dropout from ``settings.seed``.
        progress: A tqdm bar over the optimiser steps. desc: Its label.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], recipe: TrainRecipe,
                 x: torch.Tensor, y: torch.Tensor, settings: FineTune, run_key: str,
                 progress: bool = False, desc: str = "FAP+T") -> None:
        self.model = copy.deepcopy(model)
        self.masks = masks
        apply_masks(self.model, masks)
        self.lr, self.batch_size = settings.resolved(recipe)
        self.opt = make_optimizer(self.model, recipe, self.lr)
        self.x, self.y = x, y
        self.n = int(y.shape[0])
        if self.n == 0:
            raise HaschedError("FAP+T needs at least one training image")
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)
        self.min_batch = min_batch_size(self.model)
        if min(self.batch_size, self.n) < self.min_batch:  # every batch skipped: no step ends
            raise HaschedError(f"FAP+T of a model with BatchNorm needs mini-batches of at "
                               f"least {self.min_batch} images (batch size "
                               f"{self.batch_size}, {self.n} training images)")
        self.shuffle = torch.Generator().manual_seed(
            derive_seed("fapt-shuffle", settings.seed, run_key))
        self.dropout_seed = derive_seed("fapt-dropout", settings.seed, run_key)
        self.rng_state: tuple | None = None  # the dropout stream between pieces
        self.step = 0
        self.order: torch.Tensor | None = None
        self.pos = 0
        self.train_seconds = 0.0  # wall time
        self.train_cpu_seconds = 0.0  # CPU time of this process (all its threads)
        self.last_loss = float("nan")
        self.progress, self.desc = progress, desc
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                          for m in self.model.modules())

    def _next_batch(self) -> torch.Tensor | None:
        """Indices of the next mini-batch (None: a skipped too-small last batch)."""
        if self.order is None or self.pos >= self.n:
            self.order = torch.randperm(self.n, generator=self.shuffle).to(self.x.device)
            self.pos = 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx if len(idx) >= self.min_batch else None

    def advance_to(self, steps: int) -> None:
        """Trains until ``steps`` optimiser steps are done in total (never backwards)."""
        if steps <= self.step:
            return
        from tqdm.auto import tqdm

        dev = self.x.device
        fork = [dev.index or 0] if dev.type == "cuda" else []
        started, cpu_started = time.perf_counter(), time.process_time()
        loss_fn = nn.CrossEntropyLoss()
        with torch.random.fork_rng(devices=fork), tqdm(
                total=steps, initial=self.step, desc=self.desc, unit="step", file=sys.stderr,
                disable=not self.progress, leave=False) as bar:
            self._restore_rng(dev)
            self.model.train()
            while self.step < steps:
                idx = self._next_batch()
                if idx is None:
                    continue
                self.opt.zero_grad(set_to_none=True)
                loss = loss_fn(self.model(self.x[idx]), self.y[idx])
                loss.backward()
                self.opt.step()
                apply_masks(self.model, self.masks)  # FAP holds after every step
                self.step += 1
                self.last_loss = float(loss.detach())
                bar.update(1)
            self._save_rng(dev)
        self.model.eval()
        self.train_seconds += time.perf_counter() - started
        self.train_cpu_seconds += time.process_time() - cpu_started

    def _restore_rng(self, dev: torch.device) -> None:
        if self.rng_state is None:
            torch.manual_seed(self.dropout_seed)  # the forked global RNG: dropout's stream
            return
        torch.set_rng_state(self.rng_state[0])
        if dev.type == "cuda":
            torch.cuda.set_rng_state(self.rng_state[1], dev)

    def _save_rng(self, dev: torch.device) -> None:
        cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        self.rng_state = (torch.get_rng_state(), cuda)

    def advance_epochs(self, epochs: float) -> int:
        """Trains to ``epochs`` epochs in total; returns the step count reached."""
        self.advance_to(steps_for(epochs, self.steps_per_epoch))
        return self.step

    def ready(self) -> nn.Module:
        """The model as evaluated now (BatchNorm statistics re-estimated if it has any)."""
        if self.has_bn and self.step > 0:
            recalibrate_batchnorm(self.model, self.x, _as_is, self.batch_size)
        self.model.eval()
        return self.model
