"""Permutation problems: what a searcher optimises.

A problem owns one permutation ("chromosome", paper §3.3.1) per layer: ``sizes`` maps a
layer name to ``n``, the number of rows of that layer's multiplier matrix. Evaluation is
population-first, like pymoo's ``Problem._evaluate(X, out)`` or evotorch's
``_evaluate_batch``: a whole population arrives at once, so an implementation can run one
batched forward pass instead of ``P`` small ones.

A :class:`ModelAwareProblem` also exposes what model-aware searchers (``criticality``,
``hybrid``) plan with: the fault rate every slot sees, the weights, and a cheap batched
evaluation of arbitrary per-row rate maps (probes).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping

import torch

from hasched.errors import HaschedError

Perms = dict[str, torch.Tensor]
"""One ``LongTensor[P, n]`` per layer name: row ``p`` is individual ``p``'s permutation."""


def check_sizes(sizes: Mapping[str, int]) -> dict[str, int]:
    """Validate a ``{layer: n}`` mapping and return it as a plain dict (order kept).

    Raises:
        HaschedError: if it is empty, a name is not a string or an ``n`` is not >= 1.
    """
    if not sizes:
        raise HaschedError("a permutation problem needs at least one layer")
    out: dict[str, int] = {}
    for name, n in sizes.items():
        if not isinstance(name, str) or not name:
            raise HaschedError(f"layer names must be non-empty strings, got {name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise HaschedError(f"layer {name!r} needs a row count >= 1, got {n!r}")
        out[name] = n
    return out


class PermutationProblem(abc.ABC):
    """Maximise a fitness over one permutation per layer.

    Subclasses call ``super().__init__(sizes)`` and implement :meth:`evaluate`.

    Attributes:
        sizes: ``{layer name: n}``; the dict order is the order operators visit layers in,
            so it is part of what makes a seeded run reproducible.
    """

    def __init__(self, sizes: Mapping[str, int]) -> None:
        self.sizes: dict[str, int] = check_sizes(sizes)

    @abc.abstractmethod
    def evaluate(self, perms: Perms) -> torch.Tensor:
        """Score a whole population.

        Args:
            perms: ``{layer: LongTensor[P, n]}``, the same ``P`` for every layer.

        Returns:
            ``Tensor[P]`` of fitness values, higher is better (e.g. top-1 accuracy).
        """


class FunctionProblem(PermutationProblem):
    """Wrap a plain function ``fn(perms) -> Tensor[P]`` as a problem (tests, notebooks).

    Args:
        sizes: ``{layer name: n}``.
        fn: batched fitness function with the contract of :meth:`PermutationProblem.evaluate`.
    """

    def __init__(self, sizes: Mapping[str, int], fn: Callable[[Perms], torch.Tensor]) -> None:
        super().__init__(sizes)
        self.fn = fn

    def evaluate(self, perms: Perms) -> torch.Tensor:
        return self.fn(perms)


def evaluate_population(problem: PermutationProblem, perms: Perms) -> torch.Tensor:
    """Call ``problem.evaluate`` once and check what comes back.

    The problem gets copies, so an implementation that permutes in place cannot corrupt
    the searcher's population.

    Returns:
        ``float64`` CPU ``Tensor[P]``.

    Raises:
        HaschedError: if the result is not ``P`` finite-or-infinite numbers (NaN is refused:
            it would make truncation selection order-dependent).
    """
    pop = next(iter(perms.values())).shape[0]
    out = problem.evaluate({k: v.clone() for k, v in perms.items()})
    out = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float64)
    if out.shape != (pop,):
        raise HaschedError(
            f"problem.evaluate must return a tensor of shape ({pop},), got {tuple(out.shape)}"
        )
    if torch.isnan(out).any():
        raise HaschedError("problem.evaluate returned NaN fitness")
    return out


class ModelAwareProblem(PermutationProblem):
    """A permutation problem that also shows the hardware and the model.

    Subclasses implement :meth:`slot_rates` and :meth:`evaluate_rates`; the fault
    simulator's :class:`hasched.study.schedule_search.ScheduleProblem` is one.
    """

    @abc.abstractmethod
    def slot_rates(self) -> dict[str, torch.Tensor]:
        """Fault rate of every partial-product site of every slot:
        ``{layer: float64 Tensor[rows, ...]}`` (``[rows, n_k]`` K-blocks for GPU tiles)."""

    def slot_exposure(self) -> dict[str, torch.Tensor]:
        """Summed rate a slot's row sees across its K-blocks: ``{layer: Tensor[rows]}``."""
        return {k: v.reshape(v.shape[0], -1).sum(1) for k, v in self.slot_rates().items()}

    def weights(self) -> dict[str, torch.Tensor]:
        """``{layer: Tensor[rows, K]}`` weight matrices; optional (default: refused)."""
        raise HaschedError(f"{type(self).__name__} does not expose its weights")

    @abc.abstractmethod
    def evaluate_rates(self, rates: dict[str, torch.Tensor]) -> torch.Tensor:
        """Score ``P`` rate maps at once (fresh error draws, like :meth:`evaluate`).

        Args:
            rates: ``{layer: Tensor[P, *slot_rates()[layer].shape]}``, the rate of every
                (weight row, site) per member; layers not named keep their identity-order
                rates.

        Returns:
            ``Tensor[P]`` fitness, higher is better.
        """


def evaluate_rate_maps(problem: ModelAwareProblem, rates: dict[str, torch.Tensor]) -> torch.Tensor:
    """Call ``problem.evaluate_rates`` once and check the result like
    :func:`evaluate_population` does (float64 CPU ``Tensor[P]``, no NaN)."""
    pop = int(next(iter(rates.values())).shape[0])
    out = problem.evaluate_rates({k: v.clone() for k, v in rates.items()})
    out = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float64)
    if out.shape != (pop,):
        raise HaschedError(
            f"problem.evaluate_rates must return a tensor of shape ({pop},), "
            f"got {tuple(out.shape)}")
    if torch.isnan(out).any():
        raise HaschedError("problem.evaluate_rates returned NaN fitness")
    return out
