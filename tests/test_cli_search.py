"""In-process CLI tests (Typer's CliRunner) for search, compare, export, diagnose and
reproduce with any registered searcher, on a synthetic store."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hasched.cli import app
from hasched.errors import HaschedError
from tiny_store import make_store

SMALL = ["--search-images", "96:", "--holdout-images", ":32", "--holdout-repeats", "3",
         "--repeats", "2", "--population", "4", "--generations", "2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    d, m = make_store(tmp_path_factory.mktemp("cli"), mp)
    yield ["--data-dir", str(d), "--models-dir", str(m)]
    mp.undo()


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_search_with_any_searcher_and_options(store, tmp_path):
    res = cli("search", "--out", tmp_path / "crit", "--algorithm", "criticality",
              "--runs", "1", *SMALL, *store)
    assert res.exit_code == 0, res.output
    assert "criticality" in res.output and "33 evaluations" in res.output
    summ = json.loads((tmp_path / "crit" / "summary.json").read_text())
    assert summ["search"]["evaluations"] == [33]
    res = cli("search", "--out", tmp_path / "ga", "--option", "noise=mean", "--option",
              "reevaluate_top=2", "--runs", "1", *SMALL, *store)
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "ga" / "config.json").read_text())
    assert cfg["options"] == {"noise": "mean", "reevaluate_top": 2}
    bad = cli("search", "--out", tmp_path / "x", "--option", "noise", *SMALL, *store)
    assert isinstance(bad.exception, HaschedError) and "KEY=VALUE" in str(bad.exception)
    bad = cli("search", "--out", tmp_path / "y", "--algorithm", "annealing", *SMALL, *store)
    assert isinstance(bad.exception, HaschedError) and not (tmp_path / "y").exists()


def test_compare_writes_one_table_and_one_figure(store, tmp_path):
    res = cli("compare", "--out", tmp_path, "--algorithms", "criticality,cma", "--option",
              "cma.sigma0=0.2", *SMALL, *store)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["algorithm"] for r in rep["searchers"]] == ["criticality", "cma"]
    assert rep["searchers"][0]["evaluations"] == 33 and rep["searchers"][1]["evaluations"] == 12
    assert rep["searchers"][1]["options"] == {"sigma0": 0.2}
    assert (tmp_path / "convergence-all.png").stat().st_size > 0
    assert "| criticality |" in (tmp_path / "comparison.md").read_text()
    bad = cli("compare", "--out", tmp_path / "z", "--algorithms", "ga", "--option",
              "hybrid.generations=3", *SMALL, *store)
    assert isinstance(bad.exception, HaschedError)


def test_export_and_diagnose_feed_back_into_search(store, tmp_path):
    assert cli("search", "--out", tmp_path / "s", "--algorithm", "criticality", "--runs", "1",
               *SMALL, *store).exit_code == 0
    res = cli("export", "--schedule", tmp_path / "s", "--out", tmp_path / "m.safetensors",
              "--models-dir", store[3])
    assert res.exit_code == 0, res.output
    assert "folded c0" in res.output and (tmp_path / "m.safetensors").is_file()
    again = cli("export", "--schedule", tmp_path / "s", "--out", tmp_path / "m.safetensors",
                "--models-dir", store[3])
    assert isinstance(again.exception, HaschedError)

    res = cli("diagnose", "--out", tmp_path / "est.json", "--runs", "2", "--columns", "256",
              "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["trials_per_pe"] == 512 and 0 <= out["ci_coverage"] <= 1
    res = cli("search", "--out", tmp_path / "planned", "--algorithm", "criticality",
              "--plan-profile", tmp_path / "est.json", "--runs", "1", *SMALL, *store)
    assert res.exit_code == 0, res.output
    bad = cli("diagnose", "--out", tmp_path / "est.json")
    assert isinstance(bad.exception, HaschedError) and "exists" in str(bad.exception)


def test_reproduce_runs_another_searcher_into_its_own_folders(store, tmp_path, monkeypatch):
    import hasched.study.reproduce as rp

    tiny = rp.Plan([rp.Case("mnist32-cnn", "c0", "flip-to-1", 5e-3, "paper text")], (1,),
                   (1,), rp.SearchSettings(population=4, generations=2, runs=1,
                                           scenario=rp.Scenario(repeats=2),
                                           search_images="96:", holdout_images=":32",
                                           holdout_repeats=3), "tiny")
    monkeypatch.setattr(rp, "QUICK", tiny)
    res = cli("reproduce", "--quick", "--out", tmp_path, "--algorithm", "criticality", *store)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "REPORT-criticality.md").is_file() and not (tmp_path / "REPORT.md").exists()
    summ = json.loads(next((tmp_path / "cases-criticality").rglob("summary.json")).read_text())
    assert summ["settings"]["algorithm"] == "criticality"
    assert "| criticality |" in (tmp_path / "REPORT-criticality.md").read_text()


def test_demo_runs_the_demo_searcher_against_random_search(store, tmp_path):
    from hasched.cli import DEMO_SEARCHER

    res = cli("demo", "--out", tmp_path, "--generations", "1", "--search-images", "96:",
              "--holdout-images", ":32", *store)
    assert res.exit_code == 0, res.output
    # criticality: one probe per c0 row (32) plus the sorted schedule's own evaluation.
    assert DEMO_SEARCHER == "criticality" and "(criticality, 33 evaluations)" in res.output
    assert "random search, same budget" in res.output
    sdir = tmp_path / "search-criticality"
    summ = json.loads((sdir / "summary.json").read_text())
    assert summ["settings"]["algorithm"] == "criticality"
    assert sum(summ["search"]["evaluations"]) == 33 and (sdir / "recovery.png").is_file()


def test_reproduce_on_worker_processes_gives_the_same_results(store, tmp_path, monkeypatch):
    import hasched.study.reproduce as rp

    settings = rp.SearchSettings(population=4, generations=2, runs=1,
                                 scenario=rp.Scenario(repeats=2), search_images="96:",
                                 holdout_images=":32", holdout_repeats=3)
    cases = [rp.Case("mnist32-cnn", "c0", "flip-to-1", 5e-3, "a"),
             rp.Case("mnist32-cnn", "h0", "bitflip", 2e-3, "b")]
    monkeypatch.setattr(rp, "QUICK", rp.Plan(cases, (1,), (1, 2), settings, "tiny"))
    results = []
    for workers, out in ((1, tmp_path / "seq"), (2, tmp_path / "pool")):
        res = cli("reproduce", "--quick", "--out", out, "--algorithm", "random",
                  "--workers", workers, *store)
        assert res.exit_code == 0, res.output
        summaries = sorted((out / "cases-random").rglob("summary.json"))
        assert len(summaries) == 4  # 2 cases x 2 profile seeds
        results.append([(p.relative_to(out), json.loads(p.read_text())["results"])
                        for p in summaries])
    assert results[0] == results[1]
