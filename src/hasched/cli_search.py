"""CLI commands of the schedule-search tools: ``compare``, ``export``, ``diagnose``.

They are plain Typer-annotated functions that :mod:`hasched.cli` registers on its app (this
module never imports the app, so ``python -m hasched.cli`` sees them too), plus the
``--option KEY=VALUE`` parser that ``search``, ``reproduce`` and ``compare`` share.

(No ``from __future__ import annotations`` here: Typer reads these annotations as objects.)
"""

import json
import typing
from pathlib import Path
from typing import Annotated

import typer

from hasched.cli_options import scenario_from, scenario_options
from hasched.errors import HaschedError

__all__ = ["AlgorithmOpt", "OptionOpt", "compare", "diagnose", "export", "parse_options"]

AlgorithmOpt = Annotated[str, typer.Option(
    help="Searcher: ga (HAS), criticality, hybrid, cma, random (see `hasched list`).")]
OptionOpt = Annotated[typing.Optional[list[str]], typer.Option(  # noqa: UP045
    "--option", help="Searcher config field KEY=VALUE, repeatable (e.g. noise=mean, "
    "probe_scale=10); values are JSON, else strings.")]
_ModelsDir = Annotated[typing.Optional[Path], typer.Option(  # noqa: UP045
    "--models-dir", help="Checkpoint store [default: $HASCHED_MODELS_DIR or "
    "~/.cache/hasched/models].")]
_DataDir = Annotated[typing.Optional[Path], typer.Option(  # noqa: UP045
    "--data-dir", help="Dataset folder [default: $HASCHED_DATA_DIR, then caches].")]


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def parse_options(pairs: typing.Optional[list[str]]) -> dict:  # noqa: UP045
    """``["noise=mean", "probe_scale=10"]`` -> ``{"noise": "mean", "probe_scale": 10}``."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HaschedError(f"--option needs KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@scenario_options(exclude=("images",))
def compare(
    scn: dict,
    out: Annotated[Path, typer.Option(help="Output folder: one search folder per searcher.")],
    algorithms: Annotated[str, typer.Option(
        help="Comma-separated searchers.")] = "criticality,ga,hybrid,random,cma",
    option: Annotated[typing.Optional[list[str]], typer.Option(  # noqa: UP045
        "--option", help="ALGORITHM.KEY=VALUE, repeatable (e.g. hybrid.generations=38, "
        "ga.noise=mean).")] = None,
    population: Annotated[int, typer.Option(help="Budget: population.")] = 20,
    generations: Annotated[int, typer.Option(help="Budget: generations.")] = 30,
    runs: Annotated[int, typer.Option(help="Independent runs per searcher.")] = 1,
    search_images: Annotated[str, typer.Option(help="Fitness images.")] = "5120:7120",
    holdout_images: Annotated[str, typer.Option(help="Held-out images.")] = ":5120",
    holdout_repeats: Annotated[int, typer.Option(help="Held-out error instances.")] = 10,
    random_baseline: Annotated[bool, typer.Option(
        help="Also run random search at every searcher's own budget.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
    models_dir: _ModelsDir = None,
    data_dir: _DataDir = None,
) -> None:
    """Several searchers on one scenario and budget: a table and one convergence figure."""
    from hasched.study.compare import run_comparison
    from hasched.study.schedule_search import SearchSettings

    per: dict[str, dict] = {}
    for key, value in parse_options(option).items():
        alg, dot, field_name = key.partition(".")
        if not dot:
            raise HaschedError(f"compare --option needs ALGORITHM.KEY=VALUE, got {key!r}")
        per.setdefault(alg, {})[field_name] = value
    s = SearchSettings(scenario=scenario_from(scn).validate(), population=population,
                       generations=generations, runs=runs, search_images=search_images,
                       holdout_images=holdout_images, holdout_repeats=holdout_repeats,
                       device=device, random_baseline=random_baseline)
    names = [a.strip() for a in algorithms.split(",") if a.strip()]
    rep = run_comparison(out, s, names, per, models_dir=models_dir, data_dir=data_dir, log=_log)
    for r in rep["searchers"]:
        lo, hi = r["holdout"]["ci95"]
        typer.echo(f"{r['algorithm']:12s} held-out {r['holdout']['mean']:.4f} [{lo:.4f}, "
                   f"{hi:.4f}]  {r['evaluations']:5d} evaluations  {r['search_seconds']:6.0f} s")
    typer.echo(f"report: {Path(out) / 'comparison.md'}")


def export(
    schedule: Annotated[Path, typer.Option(help="schedule.json (or a search folder).")],
    out: Annotated[Path, typer.Option(help="Exported .safetensors (never overwritten).")],
    model: Annotated[typing.Optional[str], typer.Option(  # noqa: UP045
        "--model", "-m", help="Registered model [default: the schedule's].")] = None,
    seed: Annotated[typing.Optional[int], typer.Option(  # noqa: UP045
        help="Model seed [default: the schedule's].")] = None,
    models_dir: _ModelsDir = None,
) -> None:
    """Fold a schedule into the weights: a plain model that needs no gather at run time."""
    from hasched.study.export import export_schedule

    rep = export_schedule(schedule, out, model_name=model, seed=seed, models_dir=models_dir)
    for layer, consumer in rep["folded"].items():
        typer.echo(f"folded {layer}: rows permuted, {consumer}'s input columns to match")
    if rep["faulty_consumers"]:
        typer.echo(f"note: {', '.join(rep['faulty_consumers'])} also run on the faulty "
                   "accelerator; their K-blocks now group permuted inputs")
    typer.echo(f"max |output difference| vs the original on 16 random inputs: "
               f"{rep['max_output_difference']:.2e} -> {out}")


def diagnose(
    out: Annotated[Path, typer.Option(help="Estimated profile (.json; never overwritten).")],
    fault: Annotated[str, typer.Option(
        "--fault", "--error", "-e", help="The chip's transient fault model.")] = "flip-to-1",
    fr_max: Annotated[float, typer.Option("--fr-max", help="Maximum per-PE rate.")] = 5e-3,
    profile_seed: Annotated[int, typer.Option(help="Seed of the chip's true profile.")] = 1,
    profile: Annotated[typing.Optional[Path], typer.Option(  # noqa: UP045
        "--profile", help="The simulated chip's true profile file instead of a seed.")] = None,
    mapping: Annotated[str, typer.Option(
        "--mapping", help="gpu-tiles | gpu-tiles:sms=10 (one PE per partial product).")
    ] = "gpu-tiles",
    runs: Annotated[int, typer.Option(help="Probe GEMMs.")] = 16,
    columns: Annotated[int, typer.Option(help="Output columns (trials per PE) per probe.")
                       ] = 4096,
    confidence: Annotated[float, typer.Option(help="Confidence level of the intervals.")
                          ] = 0.95,
    method: Annotated[str, typer.Option(help="clopper-pearson or wilson.")] = "clopper-pearson",
    chip_seed: Annotated[int, typer.Option(help="Seed of the chip's fault draws.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Estimate a (simulated) chip's per-PE fault rates from probe GEMMs, with CIs."""
    from hasched.study.diagnose import SimulatedChip, compare_to_truth, run_diagnosis
    from hasched.study.scenario import Scenario, parse_fault

    name, params = parse_fault(fault)
    scn = Scenario(mapping=mapping, fault=name, fault_params=params, fr_max=fr_max,
                   profile_seed=profile_seed, profile=str(profile) if profile else None)
    fault_model, truth, _ = scn.fault_data()
    chip = SimulatedChip(truth, fault_model, scn.mapping_obj(), chip_seed)
    diag = run_diagnosis(chip, out, runs, columns, confidence, method)
    check = compare_to_truth(diag, truth)
    trials = int(diag.trials.max())
    res = {"out": str(out), "runs": runs, "trials_per_pe": trials,
           "test_value": diag.value, "detection": diag.detection, **check}
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(f"{runs} probe GEMMs x {columns} columns = {trials} trials per PE "
               f"(test value {diag.value:g}, detection {diag.detection:.3f})")
    typer.echo(f"simulation check: mean |error| {check['mean_abs_error']:.2e}, "
               f"{100 * check['ci_coverage']:.1f}% of true rates inside their "
               f"{100 * confidence:g}% intervals, rank correlation {check['spearman']}")
    typer.echo(f"estimated profile -> {out} (use with --profile or --plan-profile)")
