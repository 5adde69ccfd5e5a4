"""Tests for the model-aware searchers (criticality, hybrid), CMA-ES through random keys and
the GA's noise handling, on synthetic problems with closed-form fitness."""

from __future__ import annotations

import itertools

import pytest
import torch

from hasched.errors import HaschedError
from hasched.search import (
    CMAConfig,
    CriticalityConfig,
    FunctionProblem,
    GAConfig,
    HybridConfig,
    create_searcher,
)
from hasched.search.algorithms.cma_es import decode_keys, identity_keys
from hasched.search.algorithms.criticality import (
    assign_lsa,
    assign_sorted,
    build_probes,
    probe_rate,
)
from hasched.search.algorithms.hybrid import neighbours
from hasched.sim.layers import row_rates
from search_problems import RateProblem, random_rate_problem


def _brute_force_best(problem: RateProblem, layer: str) -> tuple[torch.Tensor, float]:
    n = problem.sizes[layer]
    perms = torch.tensor(list(itertools.permutations(range(n))))  # (n!, n)
    r = row_rates(problem.rate[layer], perms)  # (n!, n, n_k)
    score = -(r * problem.harm[layer]).sum((1, 2))
    i = int(torch.argmax(score))
    return perms[i], float(score[i])


# --------------------------------------------------------------------------- criticality


def test_assign_sorted_worked_example():
    # Most harmful row (1) -> least exposed slot (0); row 2 -> slot 2; row 0 -> slot 1.
    perm = assign_sorted(torch.tensor([0.1, 0.5, 0.3]), torch.tensor([1.0, 3.0, 2.0]))
    assert perm.tolist() == [1, 0, 2]
    # Equal exposure and equal harm keep index order: the identity.
    assert assign_sorted(torch.zeros(4), torch.zeros(4)).tolist() == [0, 1, 2, 3]


def test_lsa_agrees_with_sorting_on_a_separable_cost():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(9, generator=g, dtype=torch.float64)
    rate = torch.rand(9, 3, generator=g, dtype=torch.float64)
    sorted_perm = assign_sorted(h, rate.sum(1))
    lsa_perm = assign_lsa(h[:, None].expand(9, 3) / 3, rate)
    assert torch.equal(sorted_perm, lsa_perm)


def test_criticality_recovers_the_optimum_of_a_separable_problem_exactly():
    problem = random_rate_problem({"a": 6, "b": 5}, n_k=3, separable=True, seed=1)
    res = create_searcher("criticality").run(problem, 0)
    for layer in ("a", "b"):
        best, _ = _brute_force_best(problem, layer)
        assert torch.equal(res.best[layer], best)
    assert res.best_fitness == pytest.approx(problem.optimum(), abs=1e-12)
    # One probe per row, in one batched call, then the schedule: O(rows) evaluations.
    assert problem.calls == [("rates", 11), ("perms", 1)] and res.evaluations == 12
    assert [h["best_fitness"] is None for h in res.history] == [True, False]


def test_criticality_on_a_larger_separable_problem_matches_linear_assignment():
    problem = random_rate_problem({"c0": 32, "h2": 64, "op": 10}, n_k=4, seed=2)
    res = create_searcher("criticality", {"probe_rounds": 2}).run(problem, 0)
    assert res.best_fitness == pytest.approx(problem.optimum(), abs=1e-12)
    assert res.evaluations == 2 * 106 + 1


def test_block_probes_and_linear_assignment_solve_a_non_separable_problem():
    problem = random_rate_problem({"a": 6}, n_k=3, separable=False, seed=3)
    row = create_searcher("criticality").run(problem, 0)
    block = create_searcher("criticality", {"probe": "block"}).run(
        random_rate_problem({"a": 6}, n_k=3, separable=False, seed=3), 0)
    best, best_fit = _brute_force_best(problem, "a")
    assert torch.equal(block.best["a"], best) and block.best_fitness == pytest.approx(best_fit)
    assert row.best_fitness < best_fit - 1e-9  # the row model is wrong here, so it loses
    assert block.evaluations == 6 * 3 + 1


def test_slot_rates_of_any_trailing_shape():
    # Sites need not be a flat K-block axis (another mapping may give (chains, positions)).
    g = torch.Generator().manual_seed(12)
    harm = {"a": torch.rand(6, 2, 3, generator=g, dtype=torch.float64)}
    rate = {"a": 0.01 * torch.rand(6, 2, 3, generator=g, dtype=torch.float64)}
    problem = RateProblem(harm, rate)
    res = create_searcher("criticality", {"probe": "block"}).run(problem, 0)
    assert res.best_fitness == pytest.approx(problem.optimum(), abs=1e-12)
    assert res.evaluations == 6 * 6 + 1


def test_probe_layout_and_rate():
    problem = random_rate_problem({"a": 4, "b": 3}, n_k=2, seed=5)
    cfg = CriticalityConfig(probe_scale=10.0, probe_rounds=2)
    probe, layout = build_probes(problem, cfg)
    assert probe.size == 2 * 7 and probe.rates["a"].shape == (14, 4, 2)
    for layer in ("a", "b"):
        q = min(1.0, 10 * float(problem.rate[layer].mean(1).max()))
        assert layout["rates"][layer] == pytest.approx(q) == probe_rate(problem.rate[layer], 10)
    for m in range(14):
        layer, i, _ = layout["members"][m % 7]
        nz = {k: v[m].nonzero().tolist() for k, v in probe.rates.items()}
        # Exactly one row of one layer is faulty, on all its K-blocks, at the probe rate.
        assert nz[layer] == [[i, 0], [i, 1]] and all(nz[k] == [] for k in nz if k != layer)
        assert float(probe.rates[layer][m, i, 0]) == pytest.approx(layout["rates"][layer])
    assert probe_rate(torch.full((3, 2), 0.4), 10.0) == 1.0  # capped


def test_model_aware_searchers_refuse_a_plain_problem():
    plain = FunctionProblem({"a": 4}, lambda p: torch.zeros(p["a"].shape[0]))
    for name in ("criticality", "hybrid"):
        with pytest.raises(HaschedError, match="model-aware"):
            create_searcher(name).run(plain, 0)
    with pytest.raises(HaschedError):
        CriticalityConfig(probe="column")
    with pytest.raises(HaschedError):
        HybridConfig(seed_swaps=0)


# --------------------------------------------------------------------------- hybrid


def test_neighbours_are_within_the_swap_budget():
    perm = {"a": torch.randperm(10, generator=torch.Generator().manual_seed(0))}
    near = neighbours(perm, 12, 2, torch.Generator().manual_seed(1))["a"]  # (12, 10)
    assert (near.sort(1).values == torch.arange(10)).all()
    moved = (near != perm["a"]).sum(1)
    assert moved.max() <= 4 and moved[::2].max() <= 2  # even copies: 1 swap, odd: 2
    assert (moved > 0).any()


def test_hybrid_seeds_the_ga_with_the_criticality_schedule():
    problem = random_rate_problem({"a": 8, "b": 5}, n_k=2, separable=False, seed=6)
    crit = create_searcher("criticality").run(problem, 0)
    problem2 = random_rate_problem({"a": 8, "b": 5}, n_k=2, separable=False, seed=6)
    seen = []
    orig = problem2.evaluate
    problem2.evaluate = lambda perms: seen.append(perms) or orig(perms)
    res = create_searcher("hybrid", HybridConfig(population=6, generations=8)).run(problem2, 0)
    first = seen[0]
    assert first["a"].shape[0] == 6
    assert all(torch.equal(first[k][0], crit.best[k]) for k in crit.best)
    assert res.best_fitness >= crit.best_fitness  # elitist GA started from it
    assert problem2.calls[0] == ("rates", 13)
    assert res.evaluations == 13 + sum(n for kind, n in problem2.calls[1:])


# --------------------------------------------------------------------------- CMA-ES


def test_random_keys_decode_to_valid_permutations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 17, generator=g, dtype=torch.float64)
    perms = decode_keys(x, {"a": 10, "b": 7})
    for k, n in (("a", 10), ("b", 7)):
        assert perms[k].shape == (50, n) and (perms[k].sort(1).values == torch.arange(n)).all()
    # perm[slot] = the row with the slot-th smallest key.
    assert decode_keys(torch.tensor([[0.3, 0.1, 0.2]]), {"a": 3})["a"].tolist() == [[1, 2, 0]]
    ties = decode_keys(torch.zeros(1, 4, dtype=torch.float64), {"a": 4})["a"]
    assert ties.tolist() == [[0, 1, 2, 3]]
    keys = torch.as_tensor(identity_keys({"a": 5, "b": 3}))[None]
    assert decode_keys(keys, {"a": 5, "b": 3})["a"].tolist() == [[0, 1, 2, 3, 4]]


def test_cma_improves_on_a_toy_problem_and_counts_its_budget():
    problem = random_rate_problem({"a": 10}, n_k=1, seed=7)
    res = create_searcher("cma", CMAConfig(population=10, evaluations=305)).run(problem, 0)
    assert res.evaluations == 300 and len(res.history) == 30  # whole generations only
    assert res.best_fitness > res.history[0]["best_fitness"]
    first = problem.calls[0]
    assert first == ("perms", 10)
    with pytest.raises(HaschedError):
        CMAConfig(population=10, evaluations=5)


def test_cma_runs_on_a_single_row_layer():
    problem = random_rate_problem({"a": 1}, n_k=1, seed=8)
    res = create_searcher("cma", CMAConfig(population=4, evaluations=8)).run(problem, 0)
    assert res.best["a"].tolist() == [0]


# --------------------------------------------------------------------------- GA noise


class LuckyDraw(FunctionProblem):
    """Identity has true fitness 0.5, anything else 0.6; the very first evaluation of the
    identity is a lucky draw of +1.0 (noise the GA must not trust forever)."""

    def __init__(self) -> None:
        super().__init__({"a": 4}, self._fit)
        self.calls = 0

    def _fit(self, perms):
        ident = (perms["a"] == torch.arange(4)).all(1)  # (P,)
        out = torch.where(ident, 0.5, 0.6).double()
        if self.calls == 0:
            out = out + ident.double()
        self.calls += 1
        return out


@pytest.mark.parametrize("noise,generations,best_is_identity,fitness", [
    ("none", 3, True, 1.5),           # the lucky draw stays on top for good
    ("reevaluate", 3, False, 0.6),    # one fresh draw exposes it
    ("mean", 3, True, (1.5 + 3 * 0.5) / 4),  # running mean of 4 draws, still ahead
])
def test_ga_noise_handling_worked_example(noise, generations, best_is_identity, fitness):
    # No crossover and no mutation: children are copies, so only re-evaluations happen.
    cfg = GAConfig(population=2, generations=generations, crossover_rate=0.0,
                   mutation_rate=0.0, noise=noise)
    problem = LuckyDraw()
    res = create_searcher("ga", cfg).run(problem, 0)
    assert bool((res.best["a"] == torch.arange(4)).all()) == best_is_identity
    assert res.best_fitness == pytest.approx(fitness)
    per_gen = 0 if noise == "none" else 2
    assert res.evaluations == 2 + generations * per_gen


def test_ga_reevaluate_top_limits_the_extra_evaluations():
    problem = random_rate_problem({"a": 9}, n_k=1, noise=0.01, seed=9)
    res = create_searcher("ga", GAConfig(population=8, generations=3, noise="mean",
                                         reevaluate_top=2)).run(problem, 0)
    sizes = [n for _, n in problem.calls]
    assert sizes[0] == 8 and all(n >= 2 for n in sizes[1:])
    assert res.evaluations == sum(sizes)
    with pytest.raises(HaschedError):
        GAConfig(noise="median")
