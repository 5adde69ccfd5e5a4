"""The one search loop every searcher shares: ask, evaluate, tell, record, checkpoint, hooks.

A searcher subclasses :class:`SearchLoop` and implements four small methods, like pymoo's
``Algorithm._infill / _advance`` or evotorch's ``SearchAlgorithm._step``:

* ``_setup(problem, g) -> state``: the initial state, before anything is evaluated;
* ``_ask(problem, state, g) -> Perms | RateProbe``: what to evaluate next (may be empty);
* ``_tell(problem, state, asked, fitness, g) -> stats``: update the state, return the
  history statistics of this step (``best_fitness``, ``mean_fitness``);
* ``_done(state, step) -> bool``: whether the budget is spent.

:meth:`SearchLoop.run` owns everything else: seeding, one batched
``problem.evaluate`` call per step, the evaluation count, the history, the best schedule
ever evaluated, the wall time (summed over resumed pieces), crash-safe checkpoints after
every step (a resumed run is bit-for-bit the uninterrupted one), ``stop_after`` and the
hooks called after each step (progress bars, logging, early stopping by raising).

``state`` is a plain dict of tensors and Python scalars, so it checkpoints with
``torch.save`` and loads with ``weights_only=True``. Keys starting with ``_`` are scratch
space (between an ask and its tell, or rebuilt objects such as an optimiser) and are never
written; :meth:`SearchLoop._restore` rebuilds them on resume.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hasched.errors import HaschedError
from hasched.search.core.problem import (
    ModelAwareProblem,
    Perms,
    PermutationProblem,
    evaluate_population,
    evaluate_rate_maps,
)
from hasched.search.core.result import SearchResult
from hasched.search.core.state import load_checkpoint, make_generator, save_checkpoint, seed_tag

__all__ = ["RateProbe", "SearchLoop", "StepInfo"]


@dataclass(frozen=True)
class RateProbe:
    """A batch of per-row rate maps to evaluate instead of schedules (model-aware searchers).

    Attributes:
        rates: ``{layer: Tensor[P, rows, n_k]}``: the fault rate of every (weight row,
            K-block) for each of ``P`` probes (see
            :meth:`~hasched.search.core.problem.ModelAwareProblem.evaluate_rates`).
    """

    rates: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return int(next(iter(self.rates.values())).shape[0])


@dataclass(frozen=True)
class StepInfo:
    """What a hook receives after every step.

    Attributes:
        searcher: the running searcher.
        entry: the step's history entry (``generation``, ``best_fitness``,
            ``mean_fitness``, ``evaluations``).
        seconds: wall time of the run so far, summed over resumed pieces.
        state: the searcher's state (read it, do not modify it).
    """

    searcher: SearchLoop
    entry: dict
    seconds: float
    state: dict


Hook = Callable[[StepInfo], None]


def _size(asked: Perms | RateProbe) -> int:
    if isinstance(asked, RateProbe):
        return asked.size
    return int(next(iter(asked.values())).shape[0])


class SearchLoop(abc.ABC):
    """Base class of every registered searcher (see the module docstring).

    Subclasses set ``config_cls`` (a frozen dataclass with defaults) and are registered
    with :func:`~hasched.search.core.registry.register_searcher`, which sets ``name``.

    Args:
        config: an instance of ``config_cls``; ``None`` uses its defaults.
    """

    name: str = "?"
    config_cls: type = object

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_cls()

    # ------------------------------------------------------------------ subclass API

    @abc.abstractmethod
    def _setup(self, problem: PermutationProblem, g: torch.Generator) -> dict:
        """The initial state; nothing is evaluated yet."""

    @abc.abstractmethod
    def _ask(self, problem: PermutationProblem, state: dict,
             g: torch.Generator) -> Perms | RateProbe:
        """What to evaluate in this step (``P = 0`` is allowed: nothing is evaluated)."""

    @abc.abstractmethod
    def _tell(self, problem: PermutationProblem, state: dict, asked: Perms | RateProbe,
              fitness: torch.Tensor, g: torch.Generator) -> dict:
        """Take the fitness of ``asked`` (float64 ``Tensor[P]``); return history stats.

        Returns:
            ``{"best_fitness": float | None, "mean_fitness": float | None}``; ``None``
            while no schedule has been evaluated (e.g. after a probe step).
        """

    @abc.abstractmethod
    def _done(self, state: dict, step: int) -> bool:
        """Whether the run is complete after ``step`` steps."""

    def _incumbent(self, state: dict, tracked: dict) -> tuple[dict[str, torch.Tensor], float]:
        """The schedule the run returns; default: the fittest single evaluation.

        ``tracked`` holds ``best`` (``{layer: LongTensor[n]}`` or ``None``) and
        ``best_fitness``, maintained by the loop over every evaluated schedule (strict
        ``>``, so the earliest of equal fitness wins). Searchers that average noisy draws
        return their own choice instead.
        """
        if tracked["best"] is None:
            raise HaschedError(f"{self.name} stopped before evaluating any schedule")
        return tracked["best"], tracked["best_fitness"]

    def _restore(self, problem: PermutationProblem, state: dict) -> dict:
        """Rebuild scratch (``_``-prefixed) state after loading a checkpoint."""
        return state

    def _info(self, state: dict) -> dict:
        """Extras for :attr:`SearchResult.info`; default none."""
        return {}

    def _meta_config(self) -> dict:
        return dataclasses.asdict(self.config)

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        problem: PermutationProblem,
        seed: int | torch.Generator,
        progress: Callable[[dict], None] | None = None,
        checkpoint: Path | None = None,
        *,
        stop_after: int | None = None,
        hooks: Sequence[Hook] = (),
    ) -> SearchResult:
        """Run the search.

        Args:
            problem: what to maximise.
            seed: an int (a fresh generator is made from it) or a generator to draw from.
            progress: called with each history entry (step 0 first) after that step is
                checkpointed; an exception it raises aborts the run, leaving a checkpoint
                to resume from.
            checkpoint: file holding the full state, rewritten atomically after every
                step; if it exists the run resumes from it, giving bit-for-bit the result
                of an uninterrupted run.
            stop_after: return after the step with index ``stop_after`` (step 0 always
                runs), counting steps done before a resume; the result is the best so far.
            hooks: called with a :class:`StepInfo` after every step, after ``progress``.

        Returns:
            The run's :class:`SearchResult`.

        Raises:
            HaschedError: bad seed, a checkpoint from a different run, a problem that
                returns malformed fitness, or a searcher that needs a model-aware problem.
        """
        g = make_generator(seed)
        t0 = time.perf_counter()
        meta = {"algorithm": self.name, "config": self._meta_config(),
                "sizes": [list(kv) for kv in problem.sizes.items()], "seed": seed_tag(seed)}
        saved = load_checkpoint(checkpoint, meta) if checkpoint is not None else None
        if saved is not None:
            g.set_state(saved["rng_state"])
            state = self._restore(problem, saved["state"])
            history, evaluations = saved["history"], saved["evaluations"]
            tracked, seconds_before = saved["tracked"], saved["seconds"]
        else:
            state = self._setup(problem, g)
            history, evaluations, seconds_before = [], 0, 0.0
            tracked = {"best": None, "best_fitness": float("-inf")}
        callbacks = ([lambda info: progress(dict(info.entry))] if progress else []) + list(hooks)

        while not self._done(state, len(history)) and (
                stop_after is None or len(history) <= stop_after):
            asked = self._ask(problem, state, g)
            fitness = self._evaluate(problem, asked)
            if not isinstance(asked, RateProbe):
                _track(tracked, asked, fitness)
            stats = self._tell(problem, state, asked, fitness, g)
            evaluations += _size(asked)
            history.append({"generation": len(history), "best_fitness": stats["best_fitness"],
                            "mean_fitness": stats["mean_fitness"], "evaluations": evaluations})
            seconds = seconds_before + time.perf_counter() - t0
            if checkpoint is not None:
                # Checkpoint first: a hook that raises (or a kill right after it) must
                # find the step it was told about already on disk.
                save_checkpoint(checkpoint, {
                    "meta": meta, "state": {k: v for k, v in state.items() if k[0] != "_"},
                    "rng_state": g.get_state(), "history": history, "tracked": tracked,
                    "evaluations": evaluations, "seconds": seconds})
            info = StepInfo(self, dict(history[-1]), seconds, state)
            for cb in callbacks:
                cb(info)

        best, best_fitness = self._incumbent(state, tracked)
        return SearchResult(
            best={k: v.clone() for k, v in best.items()},
            best_fitness=float(best_fitness),
            history=[dict(h) for h in history],
            evaluations=evaluations,
            seconds=seconds_before + time.perf_counter() - t0,
            info=self._info(state),
        )

    def _evaluate(self, problem: PermutationProblem, asked: Perms | RateProbe) -> torch.Tensor:
        if _size(asked) == 0:
            return torch.zeros(0, dtype=torch.float64)
        if isinstance(asked, RateProbe):
            if not isinstance(problem, ModelAwareProblem):
                raise HaschedError(
                    f"searcher {self.name!r} probes rows at chosen fault rates, so it needs a "
                    "model-aware problem (slot exposure and rate evaluation, e.g. "
                    f"ScheduleProblem); got {type(problem).__name__}")
            return evaluate_rate_maps(problem, asked.rates)
        return evaluate_population(problem, asked)


def _track(tracked: dict, perms: Perms, fitness: torch.Tensor) -> None:
    """Keep the fittest schedule ever evaluated (strict ``>``: the earliest wins ties)."""
    if fitness.numel() == 0:
        return
    i = int(torch.argmax(fitness))  # first maximum
    if tracked["best"] is None or float(fitness[i]) > tracked["best_fitness"]:
        tracked["best"] = {k: v[i].clone() for k, v in perms.items()}
        tracked["best_fitness"] = float(fitness[i])
