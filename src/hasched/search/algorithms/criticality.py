"""Criticality-guided scheduling: probe how much each weight row hurts, then sort.

A schedule decides which slot (and so which PEs) computes each weight row. If the harm of
row ``i`` on slot ``s`` is ``h_i * e_s`` (row criticality times slot exposure, the summed
fault rate of the slot's partial-product sites, e.g. its K-blocks), the best schedule
gives the most critical rows the least exposed slots: by the rearrangement inequality,
sorting is exactly optimal for such a separable (rank-one) cost. Otherwise, with a cost
``C[i, s] = sum_k c[i, k] r[s, k]`` per site ``k``, the optimum is a linear assignment
(:func:`scipy.optimize.linear_sum_assignment`). A slot's rates may have any trailing shape
(``[rows, n_k]`` for GPU tiles); sites are its flattened trailing entries.

The searcher (``"criticality"``) needs a
:class:`~hasched.search.core.problem.ModelAwareProblem` and takes two steps:

1. **probe** (one batched population): for every row of every searched layer, one probe
   that puts just that row at the probe rate ``q`` on all its sites (``probe="row"``) or
   on one site (``probe="block"``), every other row of every layer clean; repeated
   ``probe_rounds`` times. ``q = min(1, probe_scale * max_s mean_k r[s, k])`` per layer: a
   multiple of the profile's worst mean per-site rate, high enough for a probe to show
   an effect on a few thousand images, low enough not to saturate. A probe's fitness drop
   measures the row's criticality; a constant offset (the clean accuracy) changes no
   assignment, so none is needed.
2. **assign** per layer (sorting or linear assignment, ``assign``) and evaluate the
   schedule once, so its search fitness is reported like every other searcher's.

Cost: ``probe_rounds * sum(rows)`` probe evaluations (``* sites`` with ``probe="block"``)
plus one: O(rows), against thousands for the GA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hasched.errors import HaschedError
from hasched.search.core.loop import RateProbe, SearchLoop
from hasched.search.core.problem import ModelAwareProblem, PermutationProblem
from hasched.search.core.registry import register_searcher

PROBE_MODES = ("row", "block")
ASSIGN_MODES = ("auto", "sort", "lsa")


@dataclass(frozen=True)
class CriticalityConfig:
    """Criticality probe settings.

    Attributes:
        probe_scale: probe rate = ``probe_scale`` x the profile's worst mean per-block rate
            of the layer, capped at 1.
        probe_rounds: independent probe populations (averaged), each ``sum(rows)`` probes.
        probe: ``"row"`` (one probe per row, all its sites) or ``"block"`` (one probe per
            row and site, e.g. K-block: finer, ``sites`` times the cost).
        assign: ``"sort"``, ``"lsa"`` (linear assignment) or ``"auto"`` (sort for row
            probes, whose cost is separable; linear assignment for block probes).
    """

    probe_scale: float = 10.0
    probe_rounds: int = 1
    probe: str = "row"
    assign: str = "auto"

    def __post_init__(self) -> None:
        if not self.probe_scale > 0:
            raise HaschedError(f"criticality probe_scale must be > 0, got {self.probe_scale!r}")
        r = self.probe_rounds
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise HaschedError(f"criticality probe_rounds must be an integer >= 1, got {r!r}")
        if self.probe not in PROBE_MODES:
            raise HaschedError(f"criticality probe must be row or block, got {self.probe!r}")
        if self.assign not in ASSIGN_MODES:
            raise HaschedError(f"criticality assign must be auto, sort or lsa, "
                               f"got {self.assign!r}")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``(rows, ...)`` -> ``(rows, sites)``."""
    return t.reshape(t.shape[0], -1)


def probe_rate(slot_rate: torch.Tensor, scale: float) -> float:
    """``min(1, scale * max over slots of the mean per-site rate)`` of one layer."""
    return min(1.0, scale * float(_flat(slot_rate).double().mean(1).max()))


def build_probes(problem: ModelAwareProblem, cfg: CriticalityConfig) -> tuple[RateProbe, dict]:
    """The probe population and its layout.

    Returns:
        ``(probe, layout)``; ``layout = {"rates": {layer: q}, "members": [(layer, row,
        block or -1)] per probe of one round}``.
    """
    slot = problem.slot_rates()
    q = {k: probe_rate(v, cfg.probe_scale) for k, v in slot.items()}
    members = []
    for layer, rates in slot.items():
        rows, sites = _flat(rates).shape
        for i in range(rows):
            members += [(layer, i, -1)] if cfg.probe == "row" else [(layer, i, k)
                                                                   for k in range(sites)]
    p = len(members)
    maps = {k: torch.zeros(p, *v.shape, dtype=torch.float64) for k, v in slot.items()}
    for m, (layer, i, k) in enumerate(members):
        if k < 0:
            maps[layer][m, i] = q[layer]
        else:
            maps[layer][m, i].view(-1)[k] = q[layer]
    maps = {k: v.repeat(cfg.probe_rounds, *[1] * (v.dim() - 1)) for k, v in maps.items()}
    return RateProbe(maps), {"rates": q, "members": members}


def criticality_from_probes(fitness: torch.Tensor, layout: dict,
                            slot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Harm per (row, site) from probe fitness (mean over rounds; higher = worse).

    Args:
        slot: the problem's slot rates (for the shapes).

    Returns:
        ``{layer: float64 Tensor[rows, sites]}``; row probes spread a row's harm evenly
        over its sites.
    """
    members = layout["members"]
    per_round = fitness.reshape(-1, len(members)).mean(0)  # (members,)
    harm = {k: torch.zeros(_flat(v).shape, dtype=torch.float64) for k, v in slot.items()}
    for m, (layer, i, k) in enumerate(members):
        if k < 0:
            harm[layer][i, :] = -per_round[m] / harm[layer].shape[1]
        else:
            harm[layer][i, k] = -per_round[m]
    return harm


def assign_sorted(harm: torch.Tensor, exposure: torch.Tensor) -> torch.Tensor:
    """Most harmful row to least exposed slot (ties: lower index first).

    Args:
        harm: ``Tensor[rows]`` row criticality (higher = worse).
        exposure: ``Tensor[rows]`` slot exposure.

    Returns:
        ``LongTensor[rows]`` schedule, ``perm[slot] = row``.
    """
    rows = torch.sort(harm, descending=True, stable=True).indices
    slots = torch.sort(exposure, stable=True).indices
    perm = torch.empty_like(rows)
    perm[slots] = rows
    return perm


def assign_lsa(harm: torch.Tensor, slot_rate: torch.Tensor) -> torch.Tensor:
    """Minimum-cost assignment for ``C[i, s] = sum_k harm[i, k] * slot_rate[s, k]``.

    Args:
        harm: ``Tensor[rows, sites]``; slot_rate: ``Tensor[rows, ...]`` (sites flattened).

    Returns:
        ``LongTensor[rows]`` schedule, ``perm[slot] = row``.
    """
    from scipy.optimize import linear_sum_assignment

    cost = (harm.double() @ _flat(slot_rate).double().T).numpy()  # (rows, slots)
    row_ind, col_ind = linear_sum_assignment(cost)
    perm = torch.empty(len(row_ind), dtype=torch.long)
    perm[torch.as_tensor(col_ind)] = torch.as_tensor(row_ind)
    return perm


def assign(problem: ModelAwareProblem, harm: dict[str, torch.Tensor],
           cfg: CriticalityConfig) -> dict[str, torch.Tensor]:
    """One schedule per layer from the harm estimates (see :class:`CriticalityConfig`)."""
    slot, exposure = problem.slot_rates(), problem.slot_exposure()
    mode = cfg.assign if cfg.assign != "auto" else ("sort" if cfg.probe == "row" else "lsa")
    out = {}
    for layer, h in harm.items():
        if mode == "sort":
            out[layer] = assign_sorted(h.sum(1), exposure[layer].double())
        else:
            out[layer] = assign_lsa(h, slot[layer])
    return out


def require_model_aware(problem: PermutationProblem, name: str) -> ModelAwareProblem:
    if not isinstance(problem, ModelAwareProblem):
        raise HaschedError(
            f"searcher {name!r} needs a model-aware problem (slot rates and rate "
            f"evaluation, e.g. ScheduleProblem); got {type(problem).__name__}")
    return problem


@register_searcher("criticality")
class CriticalitySearch(SearchLoop):
    """Probe every row once, assign rows to slots, evaluate that one schedule.

    State: ``stage`` (0 probe, 1 evaluate, 2 done), ``perm`` (the schedule), ``harm``
    (per layer ``[rows, sites]``), ``probe_rates`` (q per layer), ``fitness``.

    Args:
        config: probe settings; ``None`` uses the defaults.
    """

    config_cls = CriticalityConfig

    def _setup(self, problem, g):
        require_model_aware(problem, self.name)
        return {"stage": 0, "perm": None, "harm": None, "probe_rates": None, "fitness": None}

    def _ask(self, problem, state, g):
        if state["stage"] == 0:
            probe, layout = build_probes(problem, self.config)
            state["_layout"] = layout
            return probe
        return {k: v[None] for k, v in state["perm"].items()}

    def _tell(self, problem, state, asked, fitness, g):
        if state["stage"] == 0:
            layout = state.pop("_layout")
            harm = criticality_from_probes(fitness, layout, problem.slot_rates())
            state.update(stage=1, harm=harm, probe_rates=layout["rates"],
                         perm=assign(problem, harm, self.config))
            return {"best_fitness": None, "mean_fitness": None}
        state.update(stage=2, fitness=float(fitness[0]))
        return {"best_fitness": state["fitness"], "mean_fitness": state["fitness"]}

    def _done(self, state, step):
        return state["stage"] >= 2

    def _incumbent(self, state, tracked):
        # Stopped right after the probe (stop_after=0): the schedule exists, unscored.
        fit = state["fitness"]
        return state["perm"], float("nan") if fit is None else fit

    def _info(self, state):
        return {"probe_rates": state["probe_rates"]}
