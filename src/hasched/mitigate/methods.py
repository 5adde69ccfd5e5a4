"""The mitigations side by side: each turns (model, chip) into what then runs on the chip.

Registered in :data:`MITIGATIONS` (``create_mitigation``-style lookup by name):

* ``none``: the chip as it is (the unmitigated baseline);
* ``retune``: Fal-reTune's weight mapping function (:mod:`~hasched.mitigate.retune`), then
  optionally ``retune_steps`` straight-through fine-tune steps with the retuned weights
  frozen;
* ``prune``: bypass the faulty PEs (fault-aware pruning): the weights they hold become 0
  and the chip's faulty PEs are *dead at the product site*, which is the same computation
  (:mod:`hasched.sim.fap`);
* ``remap``: a row permutation per layer found by a registered searcher
  (:func:`hasched.search.create_searcher`, default ``ga``) on the fault map, maximising
  accuracy on training images;
* ``finetune``: the straight-through fine-tune alone (:mod:`~hasched.mitigate.ste`).

Every method gets a fresh copy of the model with pinned int8 scales and returns an
:class:`Outcome`; nothing here reads test images.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.registry import Registry
from hasched.sim.arithmetic import Arithmetic, pin_int8_scales
from hasched.sim.evaluator import EvalConfig, FaultyEvaluator
from hasched.sim.fap import apply_masks, faulty_weight_masks
from hasched.sim.mapping import Mapping
from hasched.sim.probe import activation_probe
from hasched.sim.profile import PERMANENT_KINDS, ChipMap

__all__ = ["MITIGATIONS", "MitigationSettings", "Context", "Outcome", "run_mitigation",
           "bypass_chip", "pinned_copy"]

MITIGATIONS: Registry[Callable] = Registry("mitigation")


@dataclass(frozen=True)
class MitigationSettings:
    """Knobs of the mitigations (defaults sized for two CPU cores).

    Attributes:
        retune_steps: Straight-through steps after the mapping function (0: mapping only).
        finetune_steps: Steps of the ``finetune`` method.
        batch_size, lr: Fine-tune batch and Adam learning rate.
        searcher: Registered searcher for ``remap``.
        search_config: Its settings (``None``: a small GA, population 10, 10 generations).
        seed: Seed of every random choice (shuffling, search).
    """

    retune_steps: int = 0
    finetune_steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    searcher: str = "ga"
    search_config: dict | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # checked here, before a grid folder exists, not when the first cell fine-tunes
        from hasched.mitigate.ste import FinetuneConfig

        for steps in (self.retune_steps, self.finetune_steps):
            FinetuneConfig(steps=steps, batch_size=self.batch_size, lr=self.lr)

    def search_settings(self) -> dict | None:
        if self.search_config is not None:
            return dict(self.search_config)
        return {"population": 10, "generations": 10} if self.searcher == "ga" else None


@dataclass
class Context:
    """What a mitigation works with (all tensors on one device)."""

    model: nn.Module
    layers: list[str]
    mapping: Mapping
    chip: ChipMap
    arith: Arithmetic
    calibration: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    settings: MitigationSettings
    log: Callable[[str], None] | None = None


@dataclass
class Outcome:
    """An edited model, the schedule it runs with, the chip it runs on, and notes."""

    model: nn.Module
    chip: ChipMap
    perms: dict[str, torch.Tensor] | None = None
    info: dict = field(default_factory=dict)


def bypass_chip(chip: ChipMap) -> ChipMap:
    """The chip with its faulty PEs bypassed: dead at the product site (they add 0)."""
    dead = np.where(chip.faulty, PERMANENT_KINDS["dead"], 0)
    zeros = np.zeros_like(chip.kind)
    return ChipMap(dead, zeros, zeros, site="product", mapping=chip.mapping,
                   faulty_fraction=chip.faulty_fraction, seed=chip.seed)


def _finetune(ctx: Context, model: nn.Module, steps: int, frozen=None) -> list[float]:
    from hasched.mitigate.ste import FinetuneConfig, ste_finetune

    s = ctx.settings
    cfg = FinetuneConfig(steps=steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed)
    return ste_finetune(model, ctx.layers, ctx.mapping, ctx.chip, ctx.arith, ctx.train_x,
                        ctx.train_y, ctx.calibration, cfg, frozen=frozen, log=ctx.log)


@MITIGATIONS.register("none", "no mitigation: the faulty chip as it is")
def _none(ctx: Context) -> Outcome:
    return Outcome(ctx.model, ctx.chip)


def _retune_with(ctx: Context, bias: bool) -> Outcome:
    from hasched.mitigate.retune import retune_model

    model = ctx.model
    stats = retune_model(model, ctx.layers, ctx.mapping, ctx.chip, ctx.arith, ctx.calibration,
                         bias=bias)
    info = {"layers": {k: v.to_dict() for k, v in stats.items()}}
    if ctx.settings.retune_steps:
        probe = activation_probe(model, ctx.layers, ctx.calibration, ctx.calibration,
                                 ctx.arith, ctx.mapping)
        frozen = faulty_weight_masks(model, ctx.layers, ctx.mapping, ctx.chip,
                                     spatial=probe.spatial)
        losses = _finetune(ctx, model, ctx.settings.retune_steps, frozen)
        info["finetune_loss"] = [losses[0], losses[-1]]
    return Outcome(model, ctx.chip, info=info)


@MITIGATIONS.register("retune", "Fal-reTune weight mapping (+ optional STE fine-tune)")
def _retune(ctx: Context) -> Outcome:
    return _retune_with(ctx, bias=False)


@MITIGATIONS.register("retune+bias", "retune, and each row's mean residual fault error "
                      "folded into its bias")
def _retune_bias(ctx: Context) -> Outcome:
    return _retune_with(ctx, bias=True)


@MITIGATIONS.register("prune", "bypass the faulty PEs: their weights become 0 (FAP)")
def _prune(ctx: Context) -> Outcome:
    model = ctx.model
    probe = activation_probe(model, ctx.layers, ctx.calibration, ctx.calibration, ctx.arith,
                             ctx.mapping)
    masks = faulty_weight_masks(model, ctx.layers, ctx.mapping, ctx.chip,
                                spatial=probe.spatial)
    apply_masks(model, masks)
    return Outcome(model, bypass_chip(ctx.chip),
                   info={"pruned_weights": {k: int(v.sum()) for k, v in masks.items()}})


@MITIGATIONS.register("remap", "row permutations from a registered searcher on the fault map")
def _remap(ctx: Context) -> Outcome:
    from hasched.search import FunctionProblem, create_searcher

    s = ctx.settings
    ev = FaultyEvaluator(ctx.model, ctx.train_x, ctx.train_y, ctx.layers, chip=ctx.chip,
                         mapping=ctx.mapping, arithmetic=ctx.arith,
                         calibration=ctx.calibration, config=EvalConfig(incremental=False))
    problem = FunctionProblem(ev.rows, lambda perms: ev.accuracy(perms)[:, 0])
    res = create_searcher(s.searcher, s.search_settings()).run(problem, s.seed)
    perms = {k: v.reshape(1, -1) for k, v in res.best.items()}
    return Outcome(ctx.model, ctx.chip, perms, info={
        "searcher": s.searcher, "evaluations": res.evaluations,
        "fitness": res.best_fitness, "fitness_identity": float(ev.accuracy()[0, 0])})


@MITIGATIONS.register("finetune", "straight-through fine-tune on the faulty chip")
def _finetune_only(ctx: Context) -> Outcome:
    losses = _finetune(ctx, ctx.model, ctx.settings.finetune_steps)
    return Outcome(ctx.model, ctx.chip,
                   info={"finetune_loss": [losses[0], losses[-1]] if losses else []})


def run_mitigation(name: str, model: nn.Module, ctx: Context) -> Outcome:
    """Applies mitigation ``name`` to a pinned copy of ``model`` (the original is kept).

    Raises:
        HaschedError: an unknown mitigation.
    """
    fn = MITIGATIONS.get(name)
    ctx.model = pinned_copy(model, ctx.layers, ctx.mapping, ctx.arith, ctx.calibration)
    return fn(ctx)


def pinned_copy(model: nn.Module, layers: list[str], mapping: Mapping, arith: Arithmetic,
                calibration: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose accelerated layers keep the int8 quantisation of the
    original (weight scales and input ranges on ``calibration``), whatever is edited."""
    copy_ = copy.deepcopy(model).eval()
    mods = dict(copy_.named_modules())
    unknown = [n for n in layers if n not in mods]
    if unknown:
        raise HaschedError(f"unknown layer(s) {', '.join(unknown)}")
    if arith.needs_calibration:
        probe = activation_probe(copy_, layers, calibration, calibration, arith, mapping)
        for name in layers:
            pin_int8_scales(mods[name], probe.absmax[name])
    return copy_
