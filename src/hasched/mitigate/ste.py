"""A short fine-tune with the faulty approximate GEMM in the loop (straight-through).

Every accelerated layer computes its forward value on the simulated chip (int8, the
multiplier's table, the stuck bits), while its gradient is that of the float layer at the
same input:

    ``y = y_chip + (y_float - y_float.detach())``

(a straight-through estimator: the chip's output is not differentiable, the float layer's
is, and their difference is treated as a constant). Downstream layers therefore see the
chip's activations, and the loss is the chip's loss. After every step the layers re-read
their weights, quantised with the pinned scales.

Modules run in eval mode (dropout off, BatchNorm statistics frozen): a short fine-tune on a
few hundred images should not re-estimate them, and eval mode draws no random numbers, so a
seed (the shuffling generator's) decides everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.sim.arithmetic import Arithmetic, pin_int8_scales
from hasched.sim.faults import ChipFault
from hasched.sim.layers import FaultyLayer, inject_faults
from hasched.sim.mapping import Mapping
from hasched.sim.probe import activation_probe
from hasched.sim.profile import ChipMap

__all__ = ["FinetuneConfig", "SteLayer", "ste_finetune"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of the straight-through fine-tune.

    Attributes:
        steps: Optimiser steps (0: nothing happens).
        batch_size: Images per step.
        lr: Adam learning rate.
        seed: Seed of the shuffling generator (the only randomness).
    """

    steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise HaschedError(f"fine-tune steps must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise HaschedError(f"fine-tune batch size must be >= 1, got {self.batch_size!r}")
        if not (isinstance(self.lr, int | float) and 0.0 < self.lr < 1.0):
            raise HaschedError(f"fine-tune learning rate must lie in (0, 1), got {self.lr!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class SteLayer(nn.Module):
    """A faulty layer whose forward value comes from the chip and gradient from the float
    layer (see the module docstring)."""

    def __init__(self, layer: FaultyLayer, arith: Arithmetic, in_absmax: float | None) -> None:
        super().__init__()
        self.layer, self.arith, self.in_absmax = layer, arith, in_absmax
        self.scale = pin_int8_scales(layer.orig) if arith.needs_calibration else None

    def refresh(self) -> None:
        """Re-reads the (updated) weights into the chip's arithmetic."""
        layer = self.layer
        la = self.arith.layer(layer.weight.detach().reshape(layer.rows, -1), self.in_absmax,
                              self.scale)
        la.map_weights(layer.plan.k_perm, layer.plan.k_padded)
        la.to(layer.weight.device)
        layer.arith = la
        layer.faults.arith = la

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y_float = self.layer.orig(x)
        with torch.no_grad():
            self.layer.state.expanded = False  # one member: the batch is the batch
            y_chip = self.layer(x)
        return y_chip + (y_float - y_float.detach())  # the chip's value exactly (x - x = 0)


def _wrap(faulty: nn.Module, layers: dict[str, FaultyLayer], arith: Arithmetic,
          absmax: dict[str, float]) -> list[SteLayer]:
    out = []
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = faulty.get_submodule(parent_name) if parent_name else faulty
        ste = SteLayer(layer, arith, absmax.get(name))
        setattr(parent, child, ste)
        out.append(ste)
    return out


def ste_finetune(model: nn.Module, layers: list[str], mapping: Mapping, chip: ChipMap,
                 arith: Arithmetic, images: torch.Tensor, labels: torch.Tensor,
                 calibration: torch.Tensor, config: FinetuneConfig,
                 frozen: dict[str, torch.Tensor] | None = None,
                 perms: dict[str, torch.Tensor] | None = None,
                 log: Callable[[str], None] | None = None) -> list[float]:
    """Fine-tunes ``model`` in place on the faulty chip; returns the loss of every step.

    Args:
        model: The model (its accelerated layers get pinned int8 scales first).
        layers: Accelerated layers. mapping, chip, arith: The chip it runs on.
        images, labels: Training data (a subset of the training split).
        calibration: Images for the activation scales (as the evaluator uses them).
        config: Steps, batch, learning rate, seed.
        frozen: ``{layer: weight-shaped BoolTensor}`` of weights that must not move (e.g.
            the retuned weights on faulty PEs).
        perms: Schedules ``{layer: LongTensor[1, rows]}`` the chip runs.
        log: One-line progress messages.
    """
    if config.steps == 0:
        return []
    if images.shape[0] == 0:
        raise HaschedError("fine-tune needs training images")
    mods = dict(model.named_modules())
    if arith.needs_calibration:
        for name in layers:
            pin_int8_scales(mods[name])
    model.eval()
    probe = activation_probe(model, layers, images, calibration, arith, mapping)
    rates = torch.from_numpy(chip.faulty.reshape(-1).astype(np.float64))
    faulty, state = inject_faults(model, layers, mapping, rates, ChipFault(chip), arith,
                                  in_absmax=probe.absmax, spatial=probe.spatial)
    state.configure(perms)
    stes = _wrap(faulty, dict(state.layers), arith, probe.absmax)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    n, losses, step = images.shape[0], [], 0
    while step < config.steps:
        order = torch.randperm(n, generator=gen).to(images.device)
        for i in range(0, n, config.batch_size):
            if step >= config.steps:
                break
            idx = order[i:i + config.batch_size]
            for s in stes:
                s.refresh()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(faulty(images[idx]), labels[idx])
            loss.backward()
            for name, mask in (frozen or {}).items():
                grad = mods[name].weight.grad
                if grad is not None:
                    grad.masked_fill_(mask.to(grad.device), 0.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if log is not None and step % 50 == 0:
                log(f"fine-tune step {step}/{config.steps}: loss {losses[-1]:.4f}")
    return losses
