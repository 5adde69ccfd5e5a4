"""Several searchers on one fault scenario: one search folder each, one table, one figure.

:func:`run_comparison` runs :func:`hasched.study.schedule_search.run_has_search` once per
searcher (into ``out/<algorithm>/``, so each resumes and is skipped when finished), then
writes ``comparison.md``, ``comparison.json`` and ``convergence-all.png`` (search fitness
of every searcher against evaluations on one log-scale axis, with its held-out accuracy).

The folder follows :func:`hasched.io.check_out_dir`: its ``config.json`` records the
scenario and budget (not the searchers, so another searcher can be added later); every
searcher's folder is checked before anything is created.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from hasched.errors import HaschedError
from hasched.io import atomic_write, check_out_dir, claim_out_dir
from hasched.study.schedule_search import (
    SearchSettings,
    check_search_dir,
    prepare_search,
    run_has_search,
)

__all__ = ["check_comparison_dir", "run_comparison"]


def _base_key(s: SearchSettings) -> dict:
    """What every searcher of a comparison shares (the scenario and budget)."""
    return {k: v for k, v in s.key().items() if k not in ("algorithm", "options")}


def check_comparison_dir(out: str | Path, per: dict[str, SearchSettings]) -> bool:
    """The output-folder policy of a comparison and of each searcher's folder (reads only).

    Raises:
        HaschedError: ``out`` is foreign or holds another scenario/budget, or a searcher's
            folder holds other settings.
    """
    want = json.loads(json.dumps({"hasched": "compare",
                                  "settings": _base_key(next(iter(per.values())))}))

    def compatible(cfg: dict, path: Path) -> None:
        if cfg.get("hasched") != "compare":
            raise HaschedError(f"{path} is not a hasched comparison config (another command's "
                               "folder?); use another --out")
        if cfg != want:
            raise HaschedError(f"{out} holds a comparison of another scenario or budget; use "
                               "another --out or delete it")

    resumed = check_out_dir(out, what="comparison", compatible=compatible)
    for a, s in per.items():
        check_search_dir(Path(out) / a, s)
    return resumed


def _best_run_history(folder: Path, algorithm: str, summary: dict) -> list[dict]:
    """History rows of the run whose search fitness was best (the one that was kept)."""
    fits = summary["search"]["run_best_fitness"]
    run = max(range(len(fits)), key=lambda i: fits[i])
    with open(folder / "history.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if r["algorithm"] == algorithm and int(r["run"]) == run]
    return [{"evaluations": int(r["evaluations"]),
             "best_fitness": float(r["best_fitness"]) if r["best_fitness"] else None}
            for r in rows]


def run_comparison(
    out: str | Path,
    settings: SearchSettings,
    algorithms: Sequence[str],
    options: dict[str, dict] | None = None,
    *,
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> dict:
    """Run every searcher on the same scenario and budget and compare them.

    Args:
        out: output folder; searcher ``a`` writes ``out/a/``.
        settings: the scenario and budget (its ``algorithm`` and ``options`` are replaced;
            with ``random_baseline=False`` each searcher runs alone, and the ``random``
            searcher, if listed, is the equal-budget baseline).
        algorithms: registered searcher names, each at most once.
        options: per searcher, config overrides, e.g. ``{"hybrid": {"generations": 38}}``.

    Returns:
        ``comparison.json``'s dict: one row per searcher with its held-out accuracy (mean,
        95% CI), evaluations, search seconds and search fitness.
    """
    options = dict(options or {})
    if not algorithms or len(set(algorithms)) != len(algorithms):
        raise HaschedError(f"compare needs distinct searchers, got {list(algorithms)}")
    unknown = sorted(set(options) - set(algorithms))
    if unknown:
        raise HaschedError(f"options for searchers not compared: {', '.join(unknown)}")
    per = {a: dataclasses.replace(settings, algorithm=a, options=options.get(a, {}))
           for a in algorithms}  # validates every name and option before anything runs
    out = Path(out)
    check_comparison_dir(out, per)
    prepare_search(settings, models_dir, data_dir)  # images, layers, model: before creating
    with claim_out_dir(out, {"hasched": "compare", "settings": _base_key(settings)}, log=log):
        return _compare(out, settings, algorithms, per, models_dir, data_dir, log, progress)


def _compare(out: Path, settings: SearchSettings, algorithms: Sequence[str],
             per: dict[str, SearchSettings], models_dir, data_dir, log, progress) -> dict:
    rows, curves, summaries = [], [], []
    for a in algorithms:
        if log:
            log(f"compare: {a}")
        summ = run_has_search(out / a, per[a], models_dir=models_dir, data_dir=data_dir,
                              log=log, progress=progress)
        summaries.append(summ)
        res, se = summ["results"], summ["search"]
        rows.append({"algorithm": a, "options": per[a].options,
                     "holdout": res["has"], "random_same_budget": res["random"],
                     "evaluations": sum(se["evaluations"]),
                     "search_seconds": sum(se.get("run_seconds", [se["search_seconds"]])),
                     "search_fitness": se["best_fitness"]})
        curves.append({"algorithm": a, "history": _best_run_history(out / a, a, summ),
                       "holdout": res["has"], "evaluations": sum(se["evaluations"]) /
                       len(se["evaluations"])})
    first = summaries[0]
    report = {"settings": {k: v for k, v in first["settings"].items()
                           if k not in ("algorithm", "options")},
              "clean": first["results"]["clean"], "identity": first["results"]["identity"],
              "searchers": rows}
    from hasched.report.search import plot_searchers

    plot_searchers(curves, out / "convergence-all.png", title=settings.scenario.describe())
    atomic_write(out / "comparison.md", _markdown(report, settings))
    atomic_write(out / "comparison.json", json.dumps(report, indent=1))
    return report


def _pct(st: dict) -> str:
    return f"{100 * st['mean']:.2f} [{100 * st['ci95'][0]:.2f}, {100 * st['ci95'][1]:.2f}]"


def _markdown(report: dict, s: SearchSettings) -> str:
    lines = [
        f"# Searchers compared: {s.scenario.describe()}",
        "",
        f"Budget population {s.population} x {s.generations} generations, {s.runs} "
        f"run(s), fitness = mean of {s.repeats} error instances on images "
        f"{s.search_images}; held-out images {s.holdout_images} x "
        f"{s.holdout_repeats} fresh error instances (95% t-intervals).",
        "",
        f"Clean {_pct(report['clean'])}; identity (unscheduled) {_pct(report['identity'])}.",
        "",
        "| searcher | options | held-out % [95% CI] | evaluations | search s | "
        "random at same budget % |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in report["searchers"]:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        rnd = _pct(r["random_same_budget"]) if r["random_same_budget"] else "not run"
        lines.append(f"| {r['algorithm']} | {opts} | {_pct(r['holdout'])} | {r['evaluations']} "
                     f"| {r['search_seconds']:.0f} | {rnd} |")
    lines += ["", "![all searchers](convergence-all.png)", ""]
    return "\n".join(lines)
