"""Synthetic problems for searcher tests: closed-form fitness, optional seeded noise."""

from __future__ import annotations

import torch

from hasched.search import FunctionProblem, ModelAwareProblem


class RateProblem(ModelAwareProblem):
    """fitness = -sum over layers, rows i, K-blocks k of ``harm[i, k] * rate[i, k]``.

    A schedule puts row ``perm[s]`` on slot ``s``, so it sees ``slot_rate[s]``; a rate map
    (probe) gives every row its rates directly. With ``harm[i, k] = h[i]`` for all ``k`` the
    cost is separable and sorting is the exact optimum. ``noise`` adds N(0, noise^2) per
    member, drawn from a generator seeded by ``(seed, members evaluated so far)``.
    """

    def __init__(self, harm: dict[str, torch.Tensor], slot_rate: dict[str, torch.Tensor],
                 noise: float = 0.0, seed: int = 0) -> None:
        super().__init__({k: int(v.shape[0]) for k, v in slot_rate.items()})
        self.harm = {k: v.double() for k, v in harm.items()}
        self.rate = {k: v.double() for k, v in slot_rate.items()}
        self.noise, self.seed, self.evaluated = noise, seed, 0
        self.calls: list[tuple[str, int]] = []  # ("perms" | "rates", P) per call

    def slot_rates(self):
        return {k: v.clone() for k, v in self.rate.items()}

    def _score(self, rates: dict[str, torch.Tensor]) -> torch.Tensor:
        p = next(iter(rates.values())).shape[0]
        out = torch.zeros(p, dtype=torch.float64)
        for k, h in self.harm.items():
            r = rates.get(k, self.rate[k].expand(p, *self.rate[k].shape))
            out -= (r.double() * h).reshape(p, -1).sum(1)
        if self.noise:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.evaluated)
            out += self.noise * torch.randn(p, generator=g, dtype=torch.float64)
        self.evaluated += p
        return out

    def evaluate(self, perms):
        self.calls.append(("perms", next(iter(perms.values())).shape[0]))
        # Row perm[s] runs on slot s: row r gets the rates of the slot that holds it.
        return self._score({k: self.rate[k][torch.argsort(v, dim=1)] for k, v in perms.items()})

    def evaluate_rates(self, rates):
        self.calls.append(("rates", next(iter(rates.values())).shape[0]))
        return self._score(rates)

    def optimum(self) -> float:
        """Exact optimum by linear assignment per layer (layers are independent)."""
        from scipy.optimize import linear_sum_assignment

        total = 0.0
        for k, h in self.harm.items():
            n = h.shape[0]
            cost = (h.reshape(n, -1) @ self.rate[k].reshape(n, -1).T).numpy()
            r, c = linear_sum_assignment(cost)
            total -= float(cost[r, c].sum())
        return total


def random_rate_problem(sizes: dict[str, int], n_k: int = 1, separable: bool = True,
                        noise: float = 0.0, seed: int = 0) -> RateProblem:
    """Random harms and slot rates (distinct values, so the optimum is unique)."""
    g = torch.Generator().manual_seed(seed)
    harm, rate = {}, {}
    for k, n in sizes.items():
        h = torch.rand(n, 1 if separable else n_k, generator=g, dtype=torch.float64)
        harm[k] = h.expand(n, n_k).clone()
        rate[k] = 0.01 * torch.rand(n, n_k, generator=g, dtype=torch.float64)
    return RateProblem(harm, rate, noise, seed)


def mismatch_problem(sizes: dict[str, int], seed: int = 123) -> tuple[FunctionProblem, dict]:
    """fitness = -(positions where perm != a fixed target), summed over layers; optimum 0."""
    g = torch.Generator().manual_seed(seed)
    target = {k: torch.randperm(n, generator=g) for k, n in sizes.items()}

    def fn(perms: dict[str, torch.Tensor]) -> torch.Tensor:
        return -sum((perms[k] != target[k]).sum(dim=1) for k in perms).to(torch.float64)

    return FunctionProblem(sizes, fn), target
