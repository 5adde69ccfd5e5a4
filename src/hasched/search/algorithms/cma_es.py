"""``cma``: CMA-ES (Hansen's ``cma`` package) on permutations through random keys.

**Random keys** (Bean 1994): an individual is a real vector with one key per row of every
layer; the layer's schedule is the argsort of its keys (``perm[slot]`` = the row with the
``slot``-th smallest key), so every vector decodes to a valid permutation and any
continuous optimiser can search schedules. The initial mean has evenly spaced keys, so it
decodes to the identity schedule, and it is injected into the first generation (so, as
with the GA, the result is never worse than the unshuffled schedule on the search images).

**Why CMA-ES from ``cma``.** It is the reference implementation by the method's author,
pure Python + NumPy (one small wheel, no other dependency, never a second torch), with an
ask/tell interface that maps one-to-one onto the shared loop and handles noisy fitness
reasonably (rank-based updates). evotorch's SNES would pull ``ray`` and more; pymoo's
CMA-ES wraps this same package behind a heavier dependency tree. Its randomness comes from
a NumPy generator we own (its ``randn`` option), never from NumPy's global state.

**Checkpoints.** CMA-ES is a deterministic function of its seed and of the fitness values
it was told, so a checkpoint stores just those; resuming replays the ask/tell sequence
without evaluating anything, which is bit-for-bit the uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hasched.errors import HaschedError
from hasched.search.core.loop import SearchLoop
from hasched.search.core.problem import Perms
from hasched.search.core.registry import register_searcher


@dataclass(frozen=True)
class CMAConfig:
    """CMA-ES settings.

    Attributes:
        population: samples per generation (CMA's lambda).
        evaluations: budget; ``evaluations // population`` generations are run.
        sigma0: initial step size; the keys of a layer span [0, 1).
        include_identity: inject the identity-decoding mean into the first generation.
    """

    population: int = 20
    evaluations: int = 2020
    sigma0: float = 0.3
    include_identity: bool = True

    def __post_init__(self) -> None:
        for name, low in (("population", 2), ("evaluations", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise HaschedError(f"cma {name} must be an integer >= {low}, got {v!r}")
        if self.evaluations < self.population:
            raise HaschedError(f"cma evaluations ({self.evaluations}) must be at least one "
                               f"generation ({self.population})")
        if not self.sigma0 > 0:
            raise HaschedError(f"cma sigma0 must be > 0, got {self.sigma0!r}")


def decode_keys(x: torch.Tensor, sizes: dict[str, int]) -> Perms:
    """Random keys -> schedules: per layer, ``perm = argsort(keys)`` (stable).

    Args:
        x: ``Tensor[P, sum(sizes)]``; the layers' keys are consecutive, in ``sizes`` order.

    Returns:
        ``{layer: LongTensor[P, n]}``, each row a permutation.
    """
    out, start = {}, 0
    for layer, n in sizes.items():
        out[layer] = torch.argsort(x[:, start:start + n], dim=1, stable=True)
        start += n
    return out


def identity_keys(sizes: dict[str, int]) -> np.ndarray:
    """Evenly spaced keys in [0, 1) per layer: they decode to the identity schedule."""
    return np.concatenate([(np.arange(n) + 0.5) / n for n in sizes.values()])


def _make_es(sizes: dict[str, int], cfg: CMAConfig, cma_seed: int):
    import cma

    rng = np.random.default_rng(cma_seed)
    opts = {
        "popsize": cfg.population, "randn": lambda *shape: rng.standard_normal(shape),
        "seed": np.nan, "verbose": -9, "verb_log": 0, "verb_disp": 0,
        # The loop owns the budget: switch off CMA's own termination criteria.
        "maxfevals": np.inf, "tolfun": 0, "tolfunhist": 0, "tolx": 0, "tolstagnation": 10**9,
        "tolflatfitness": 10**9, "tolconditioncov": np.inf,
    }
    x0 = identity_keys(sizes)
    if len(x0) == 1:  # CMA needs >= 2 dimensions; a pad key decodes to nothing
        x0 = np.append(x0, 0.5)
    es = cma.CMAEvolutionStrategy(x0, cfg.sigma0, opts)
    if cfg.include_identity:
        es.inject([x0], force=True)
    return es


@register_searcher("cma")
class CMAES(SearchLoop):
    """CMA-ES over random keys; one generation per step.

    State: ``cma_seed``, ``told`` (fitness of every generation so far, ``[G, lambda]``)
    and ``best_fitness``; the ``cma`` object itself is rebuilt from them on resume.

    Args:
        config: settings; ``None`` uses the defaults.
    """

    config_cls = CMAConfig

    def _setup(self, problem, g):
        cma_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        state = {"cma_seed": cma_seed, "told": torch.zeros(0, self.config.population,
                                                           dtype=torch.float64),
                 "best_fitness": float("-inf")}
        return self._restore(problem, state)

    def _restore(self, problem, state):
        es = _make_es(problem.sizes, self.config, state["cma_seed"])
        for row in state["told"]:  # replay: no evaluation, same arithmetic
            es.tell(es.ask(), (-row).tolist())
        state["_es"] = es
        return state

    def _ask(self, problem, state, g):
        xs = state["_es"].ask()
        state["_xs"] = xs
        x = torch.as_tensor(np.asarray(xs), dtype=torch.float64)  # (lambda, D)
        return decode_keys(x, problem.sizes)

    def _tell(self, problem, state, asked, fitness, g):
        state["_es"].tell(state.pop("_xs"), (-fitness).tolist())  # CMA minimises
        state["told"] = torch.cat([state["told"], fitness[None]])
        state["best_fitness"] = max(state["best_fitness"], float(fitness.max()))
        return {"best_fitness": state["best_fitness"], "mean_fitness": float(fitness.mean())}

    def _done(self, state, step):
        return step >= self.config.evaluations // self.config.population
