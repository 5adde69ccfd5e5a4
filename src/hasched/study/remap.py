"""HAS-style remapping for a FAP chip: move weight rows across the array, no retraining.

A schedule ``perm[slot] = row`` puts weight row ``row`` on array row ``slot mod R``, so it
decides which weights land on the chip's faulty PEs and are pruned
(:func:`hasched.sim.fap.faulty_weight_masks` with ``perms``). A registered searcher
(``create_searcher(name)``, the GA by default, with a small budget) looks for the schedule
whose pruned model is most accurate on the first ``images`` validation images; the result is
then measured on the validation and test images like every other policy.
"""

from __future__ import annotations

import copy
import time

import torch

from hasched.search import PermutationProblem, create_searcher
from hasched.sim.fap import apply_masks, faulty_weight_masks
from hasched.sim.layers import gemm_shape_of
from hasched.sim.profile import ChipMap
from hasched.study.fap_study import FapContext
from hasched.study.fapt import top1

__all__ = ["FapRemapProblem", "remap_chip", "DEFAULT_REMAP_CONFIG"]

# A small budget: 8 + 5 x ~8 schedules per chip (the paper's GA runs 20 x 100, 3 times).
DEFAULT_REMAP_CONFIG = {"ga": {"population": 8, "generations": 5}}


class FapRemapProblem(PermutationProblem):
    """Fitness of a schedule: top-1 of the FAP model it implies on fitness images.

    Args:
        ctx: The loaded study. chip: The chip. images: How many validation images score a
            schedule (the first ones).
    """

    def __init__(self, ctx: FapContext, chip: ChipMap, images: int) -> None:
        mods = dict(ctx.model.named_modules())
        sizes = {n: gemm_shape_of(mods[n], ctx.spatial.get(n)).rows for n in ctx.layers}
        super().__init__(sizes)
        self.ctx, self.chip = ctx, chip
        self.work = copy.deepcopy(ctx.model).eval()
        self.orig = {n: mods[n].weight.detach().clone() for n in ctx.layers}
        self.x, self.y = ctx.val[0][:images], ctx.val[1][:images]
        # A schedule only moves rows: row perm[s] gets slot s's pattern of faulty PEs, so the
        # identity schedule's masks, re-indexed, give every schedule's (a test checks this
        # against faulty_weight_masks(perms=...)).
        self.slot_masks = faulty_weight_masks(ctx.model, ctx.layers, ctx.mapping, chip,
                                              spatial=ctx.spatial)

    def masks_for(self, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FAP masks under one schedule ``{layer: LongTensor[rows]}`` (identity if absent)."""
        out = {}
        for n, m in self.slot_masks.items():
            perm = perms.get(n)
            if perm is None:
                out[n] = m
                continue
            moved = torch.empty_like(m)
            moved[perm.reshape(-1).to(m.device)] = m  # (rows, ...) weight-shaped
            out[n] = moved
        return out

    def model_for(self, perms: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The working model pruned for one schedule ``{layer: LongTensor[rows]}``."""
        mods = dict(self.work.named_modules())
        with torch.no_grad():
            for n, w in self.orig.items():
                mods[n].weight.copy_(w)
        apply_masks(self.work, self.masks_for(perms))
        return self.work

    def evaluate(self, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        pop = next(iter(perms.values())).shape[0]
        out = torch.empty(pop, dtype=torch.float64)
        for p in range(pop):
            model = self.model_for({k: v[p] for k, v in perms.items()})
            out[p] = top1(model, self.x, self.y)
        return out


def remap_chip(ctx: FapContext, chip: ChipMap, searcher: str, config: dict | None,
               seed: int, images: int = 256) -> dict:
    """Searches a schedule for one chip and measures it.

    Returns:
        ``val_acc``, ``test_acc``, ``search_fitness``, ``evaluations``, ``seconds`` (wall),
        ``cpu_seconds`` and the ``schedule`` (``{layer: [row per slot]}``).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    problem = FapRemapProblem(ctx, chip, images)
    cfg = config if config is not None else DEFAULT_REMAP_CONFIG.get(searcher)
    result = create_searcher(searcher, cfg).run(problem, seed)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    model = problem.model_for({k: v.reshape(-1) for k, v in result.best.items()})
    val, test = ctx.accuracies(model)
    return {"val_acc": val, "test_acc": test, "search_fitness": float(result.best_fitness),
            "evaluations": int(result.evaluations), "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "schedule": {k: [int(i) for i in v.reshape(-1).tolist()]
                         for k, v in result.best.items()}}
