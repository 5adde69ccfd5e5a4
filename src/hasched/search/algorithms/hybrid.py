"""``hybrid``: the criticality schedule and its neighbours seed the GA.

Step 0 is the criticality probe population (:mod:`.criticality`); step 1 evaluates an
initial GA population made of the criticality schedule and ``population - 1`` neighbours
of it (each 1..``seed_swaps`` random swaps away, per layer); every later step is a GA
generation (:mod:`.ga`, including its noise handling). The GA starts where the probe
model says the optimum is and spends its budget on what that model misses (rows whose
harm is not separable, interactions between layers, probe noise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hasched.errors import HaschedError
from hasched.search.algorithms.criticality import (
    CriticalityConfig,
    assign,
    build_probes,
    criticality_from_probes,
    require_model_aware,
)
from hasched.search.algorithms.ga import GAConfig, GeneticAlgorithm
from hasched.search.core.problem import Perms
from hasched.search.core.registry import register_searcher
from hasched.search.operators.mutation import swap_mutation


@dataclass(frozen=True)
class HybridConfig(GAConfig):
    """GA settings (:class:`GAConfig`) plus the criticality probe and the seeding.

    Attributes:
        probe_scale, probe_rounds, probe, assign: as in :class:`CriticalityConfig`.
        seed_swaps: a seeded neighbour is 1..``seed_swaps`` random swaps away from the
            criticality schedule, per layer.
        include_identity: unlike the plain GA, off by default (the criticality schedule
            is the reference point).
    """

    include_identity: bool = False
    probe_scale: float = 10.0
    probe_rounds: int = 1
    probe: str = "row"
    assign: str = "auto"
    seed_swaps: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.criticality()  # validates the probe fields
        if isinstance(self.seed_swaps, bool) or not isinstance(self.seed_swaps, int) \
                or self.seed_swaps < 1:
            raise HaschedError(f"hybrid seed_swaps must be an integer >= 1, "
                               f"got {self.seed_swaps!r}")

    def criticality(self) -> CriticalityConfig:
        names = {f.name for f in dataclasses.fields(CriticalityConfig)}
        return CriticalityConfig(**{n: getattr(self, n) for n in names})


def neighbours(perm: dict[str, torch.Tensor], count: int, max_swaps: int,
               g: torch.Generator) -> Perms:
    """``count`` copies of ``perm``; copy ``j`` gets ``1 + j % max_swaps`` random swaps per
    layer (each a uniform pair of distinct positions, so a swap may undo an earlier one).

    Returns:
        ``{layer: LongTensor[count, n]}``.
    """
    swaps = 1 + torch.arange(count) % max_swaps  # (count,)
    out = {}
    for layer, p in perm.items():
        x = p.expand(count, -1).clone()  # (count, n)
        for t in range(max_swaps):
            x = swap_mutation(x, swaps > t, g)
        out[layer] = x
    return out


@register_searcher("hybrid")
class HybridSearch(GeneticAlgorithm):
    """Criticality probe, then a GA seeded around its schedule.

    Args:
        config: settings; ``None`` uses the defaults.
    """

    config_cls = HybridConfig

    def _setup(self, problem, g):
        require_model_aware(problem, self.name)
        return {**super()._setup(problem, g), "seed": None, "harm": None,
                "probe_rates": None}

    def _ask(self, problem, state, g):
        if state["seed"] is None:
            probe, layout = build_probes(problem, self.config.criticality())
            state["_layout"] = layout
            return probe
        return super()._ask(problem, state, g)

    def _tell(self, problem, state, asked, fitness, g):
        if state["seed"] is None:
            layout = state.pop("_layout")
            harm = criticality_from_probes(fitness, layout, problem.slot_rates())
            state.update(harm=harm, probe_rates=layout["rates"],
                         seed=assign(problem, harm, self.config.criticality()))
            return {"best_fitness": None, "mean_fitness": None}
        return super()._tell(problem, state, asked, fitness, g)

    def _initial_population(self, problem, state, g):
        cfg = self.config
        seed = state["seed"]
        p = cfg.population
        pop = {k: v[None] for k, v in seed.items()}
        others = p - 1 - int(cfg.include_identity and p > 1)
        if others > 0:
            near = neighbours(seed, others, cfg.seed_swaps, g)
            pop = {k: torch.cat([pop[k], near[k]]) for k in pop}
        if cfg.include_identity and p > 1:
            pop = {k: torch.cat([v, torch.arange(v.shape[1])[None]]) for k, v in pop.items()}
        return pop

    def _incumbent(self, state, tracked):
        if state["pop"] is None:  # stopped right after the probe: the seed, unscored
            return state["seed"], float("nan")
        return super()._incumbent(state, tracked)

    def _info(self, state):
        return {"probe_rates": state["probe_rates"]}
