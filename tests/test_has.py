"""Tests for hasched.study.schedule_search: schedule files, disjoint image sets, determinism,
outputs, resume.

Tiny synthetic MNIST-like data (128 test images) and a 2-step model; no downloads.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hasched.errors import HaschedError
from hasched.search import create_searcher
from hasched.study.build import build_evaluator, load_schedule, save_schedule
from hasched.study.scenario import Scenario
from hasched.study.schedule_search import (
    ScheduleProblem,
    SearchSettings,
    check_disjoint,
    run_has_search,
)
from tiny_store import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(data_dir, models_dir) with synthetic mnist and a tiny mnist32-cnn seed 1."""
    mp = pytest.MonkeyPatch()
    yield make_store(tmp_path_factory.mktemp("has"), mp)
    mp.undo()


def _ev(store, fr_max=5e-3, images="96:"):
    d, m = store
    scn = Scenario(layers=("c0",), fault="flip-to-1", fr_max=fr_max, images=images)
    return build_evaluator(scn, data_dir=d, models_dir=m, progress=False)


def _kw(store, **over):
    d, m = store
    s = SearchSettings(scenario=Scenario(repeats=2), population=4, generations=2, runs=2,
                       search_images="96:", holdout_images=":32", holdout_repeats=3)
    return dict(settings=s, data_dir=d, models_dir=m, progress=False, **over)


def test_schedule_round_trip_and_zero_faults_keep_clean_accuracy(store, tmp_path):
    ev = _ev(store, fr_max=0.0)
    perm = torch.randperm(ev.rows["c0"], generator=torch.Generator().manual_seed(3))
    save_schedule(tmp_path / "schedule.json", {"c0": perm}, model="mnist32-cnn", fr_max=0.0)
    loaded, meta = load_schedule(tmp_path, ev.rows)
    assert torch.equal(loaded["c0"][0], perm) and meta["model"] == "mnist32-cnn"
    acc = ev.accuracy(loaded, repeats=2, generator=torch.Generator().manual_seed(0))
    assert acc.shape == (1, 2)
    assert torch.all(acc == ev.clean_accuracy)
    # With faults the schedule matters, so the check above is not vacuous.
    ev5 = _ev(store, fr_max=0.5)
    assert ev5.accuracy(loaded, 2, torch.Generator().manual_seed(0)).max() < ev5.clean_accuracy


def test_disjoint_image_sets(store, tmp_path):
    check_disjoint({"start": 64, "stop": 128}, {"start": 0, "stop": 64})
    with pytest.raises(HaschedError, match="overlap"):
        check_disjoint({"start": 60, "stop": 128}, {"start": 0, "stop": 64})
    with pytest.raises(HaschedError, match="overlap"):
        run_has_search(tmp_path / "o", **_kw(store, search_images="16:", holdout_images=":32"))


@pytest.mark.parametrize("alg", ["ga", "random"])
def test_same_seed_same_search(store, alg):
    ev = _ev(store, fr_max=0.05)
    cfg = {"population": 4, "generations": 2} if alg == "ga" else {"evaluations": 8, "batch": 4}
    res = [create_searcher(alg, cfg).run(ScheduleProblem(ev, 2, seed), seed)
           for seed in (7, 7, 8)]
    assert torch.equal(res[0].best["c0"], res[1].best["c0"])
    assert res[0].history == res[1].history
    assert res[0].history != res[2].history or not torch.equal(res[0].best["c0"],
                                                               res[2].best["c0"])


def test_fitness_draws_fresh_errors_per_call_but_reproducibly(store):
    ev = _ev(store, fr_max=0.2)
    p = ScheduleProblem(ev, 2, seed=1)
    pop = {"c0": torch.arange(ev.rows["c0"]).repeat(4, 1)}
    a, b = p.evaluate(pop), p.evaluate(pop)
    assert p.evaluated == 8 and not torch.equal(a, b)
    q = ScheduleProblem(ev, 2, seed=1, evaluated=4)
    assert torch.equal(q.evaluate(pop), b)


@pytest.fixture(scope="module")
def ref_run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, run_has_search(out, **_kw(store))


def test_end_to_end_outputs_and_config_mismatch(store, ref_run):
    out, s = ref_run
    for f in ("summary.json", "schedule.json", "schedule-random.json", "history.csv",
              "convergence.png", "recovery.png", "summary.md", "config.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    summ = json.loads((out / "summary.json").read_text())
    for k in ("clean", "identity", "has", "random"):
        r = summ["results"][k]
        assert set(r) >= {"mean", "std", "ci95", "repeats", "images"} and r["images"] == 32
        assert r["ci95"][0] <= r["mean"] <= r["ci95"][1]
    assert summ["results"]["has"]["repeats"] == 3
    # Random search got exactly the GA's evaluation count, run by run.
    assert summ["search"]["random_evaluations"] == summ["search"]["evaluations"]
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert {r["algorithm"] for r in rows} == {"ga", "random"}
    assert len([r for r in rows if r["algorithm"] == "ga"]) == 2 * 3
    assert summ["search_images"]["start"] >= summ["holdout_images"]["stop"]
    ev = _ev(store)
    perms, meta = load_schedule(out / "schedule.json", ev.rows)
    assert meta["error"] == "flip-to-1" and meta["fr_max"] == 5e-3 and meta["layers"] == ["c0"]
    assert s == summ
    # Finished: returned from disk; other settings: refused.
    assert run_has_search(out, **_kw(store)) == summ
    with pytest.raises(HaschedError, match="other settings"):
        run_has_search(out, **_kw(store, fr_max=1e-3))


def test_resume_after_kill_is_identical(store, ref_run, tmp_path, monkeypatch):
    ref_dir, ref = ref_run
    import hasched.study.schedule_search as has

    calls = {"n": 0}
    orig = ScheduleProblem.evaluate

    def dying(self, perms):
        calls["n"] += 1
        if calls["n"] == 5:  # mid second GA run
            raise KeyboardInterrupt
        return orig(self, perms)

    monkeypatch.setattr(has.ScheduleProblem, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_has_search(tmp_path / "res", **_kw(store))
    assert not (tmp_path / "res" / "summary.json").exists()
    assert (tmp_path / "res" / "ckpt" / "run0.pt").exists()
    monkeypatch.setattr(has.ScheduleProblem, "evaluate", orig)
    res = run_has_search(tmp_path / "res", **_kw(store))
    assert res["results"] == ref["results"]
    assert res["search"]["best_fitness"] == ref["search"]["best_fitness"]
    a = json.loads((ref_dir / "schedule.json").read_text())["permutations"]
    b = json.loads((tmp_path / "res" / "schedule.json").read_text())["permutations"]
    assert a == b
    assert (ref_dir / "history.csv").read_text() == \
        (tmp_path / "res" / "history.csv").read_text()


def test_reproduce_plan_covers_the_papers_cases():
    from hasched.study.reproduce import FULL, QUICK, paper_cases

    cases = paper_cases()
    assert len(cases) == 6 + 18 + 6 == len({c.slug for c in cases})
    assert {c.layers for c in cases if c.model == "fashion-cnn"} == {"c0", "c1", "c0+c1"}
    assert FULL.profile_seeds == (1, 2) and set(QUICK.cases) <= set(cases)
    hs, ho = QUICK.settings.search_images, QUICK.settings.holdout_images
    check_disjoint({"start": int(hs.split(":")[0]), "stop": int(hs.split(":")[1])},
                   {"start": 0, "stop": int(ho.strip(":"))})


# --------------------------------------------------------------------------- model-aware


def test_slot_exposure_and_rate_maps_match_the_profile_and_schedules(store):
    from hasched.sim.layers import row_rates
    from hasched.sim.profile import FaultProfile

    ev = _ev(store, fr_max=0.05)
    prof = FaultProfile.generate(0.05, 1)
    # c0 (32 rows, K = 16 = one K-block) is one tile on SM 0: slot s runs on PE (0, s).
    exp = ev.slot_exposure()["c0"]
    assert exp.dtype == torch.float64 and exp.shape == (32,)
    assert torch.allclose(exp, torch.tensor(prof.rates[0], dtype=torch.float64), atol=1e-8)
    # A rate map equal to a schedule's is that schedule, draw for draw.
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))[None]
    rates = {"c0": row_rates(ev.state.layers["c0"].slot_rate, perm)}
    a = ev.correct({"c0": perm}, 3, torch.Generator().manual_seed(5))
    b = ev.correct(repeats=3, generator=torch.Generator().manual_seed(5), rates=rates)
    assert torch.equal(a, b)
    # All-zero rates: exactly the clean accuracy, every repeat.
    zero = ev.accuracy(repeats=2, generator=torch.Generator().manual_seed(0),
                       rates={"c0": torch.zeros(3, 32, 1, 1)})
    assert zero.shape == (3, 2) and torch.all(zero == ev.clean_accuracy)
    with pytest.raises(HaschedError, match="rates must be"):
        ev.correct(rates={"c0": torch.zeros(1, 31, 1, 1)})
    with pytest.raises(HaschedError, match="not both"):
        ev.correct({"c0": perm}, rates=rates)


def test_schedule_problem_is_model_aware_and_resumable(store):
    ev = _ev(store, fr_max=0.2)
    p = ScheduleProblem(ev, 2, seed=3)
    assert torch.equal(p.slot_exposure()["c0"], ev.slot_exposure()["c0"])
    assert p.slot_rates()["c0"].shape == (32, 1, 1) and p.weights()["c0"].shape == (32, 16)
    probe = {"c0": torch.zeros(4, 32, 1, 1)}
    probe["c0"][:, 0] = 1.0
    a, b = p.evaluate_rates(probe), p.evaluate_rates(probe)
    assert p.evaluated == 8 and a.shape == (4,) and not torch.equal(a, b)
    assert torch.equal(ScheduleProblem(ev, 2, seed=3, evaluated=4).evaluate_rates(probe), b)


@pytest.mark.parametrize("alg", ["criticality", "hybrid", "cma"])
def test_every_searcher_runs_through_the_pipeline(store, tmp_path, alg):
    res = run_has_search(tmp_path / alg, **_kw(store, algorithm=alg, runs=1))
    se = res["search"]
    assert res["settings"]["algorithm"] == se["algorithm"] == alg
    assert se["random_evaluations"] == se["evaluations"]
    if alg == "criticality":  # 32 row probes + the schedule itself
        assert se["evaluations"] == [33] and se["info"]["probe_rates"]["c0"] > 0
    if alg == "cma":  # population 4 x (2 + 1) generations
        assert se["evaluations"] == [12]
    assert se["error_instances"] == [2 * e for e in se["evaluations"]]
    rows = list(csv.DictReader(open(tmp_path / alg / "history.csv")))
    assert {r["algorithm"] for r in rows} == {alg, "random"}


def test_plan_profile_drives_planning_only(store, tmp_path):
    from hasched.sim.profile import FaultProfile

    FaultProfile.generate(5e-3, 1).save(tmp_path / "same.json")
    flipped = FaultProfile.generate(5e-3, 1).rates[:, ::-1]
    FaultProfile(rates=flipped.copy()).save(tmp_path / "flipped.json")
    kw = dict(algorithm="criticality", runs=1)
    base = run_has_search(tmp_path / "a", **_kw(store, **kw))
    same = run_has_search(tmp_path / "b", **_kw(store, plan_profile=str(tmp_path / "same.json"),
                                               **kw))
    other = run_has_search(tmp_path / "c", **_kw(
        store, plan_profile=str(tmp_path / "flipped.json"), **kw))

    def perm(d, f="schedule.json"):
        return json.loads((tmp_path / d / f).read_text())["permutations"]["c0"]

    assert perm("a") == perm("b") and perm("a") != perm("c")
    # The fitness runs on the chip: planning with its own profile changes nothing at all,
    # and random search (which plans nothing) finds the same schedule either way.
    assert same["results"] == base["results"] and same["search"]["best_fitness"] == \
        base["search"]["best_fitness"]
    assert perm("a", "schedule-random.json") == perm("c", "schedule-random.json")
    assert other["results"]["clean"] == base["results"]["clean"]


def test_unknown_algorithm_or_option_is_refused_before_loading(store, tmp_path):
    with pytest.raises(HaschedError, match="algorithm"):
        SearchSettings(algorithm="annealing")
    with pytest.raises(HaschedError, match="unknown ga option"):
        SearchSettings(options={"noise_level": 2})
    with pytest.raises(HaschedError, match="noise"):
        SearchSettings(options={"noise": "median"})


def test_random_baseline_can_be_left_out(store, tmp_path):
    res = run_has_search(tmp_path / "o", **_kw(store, algorithm="criticality", runs=1,
                                               random_baseline=False))
    assert res["results"]["random"] is None and res["has_minus_random"] is None
    assert res["search"]["random_evaluations"] == []
    assert not (tmp_path / "o" / "schedule-random.json").exists()
    assert "not run" in (tmp_path / "o" / "summary.md").read_text()
    assert json.loads((tmp_path / "o" / "config.json").read_text())["random_baseline"] is False
