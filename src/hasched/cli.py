"""The ``hasched`` command line: parses arguments and calls the library, nothing more.

Every user mistake surfaces as :class:`hasched.errors.HaschedError`, printed as one line
(``hasched: error: ...``) with exit status 2 and no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from hasched.errors import HaschedError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run DNNs on faulty, marginal or inexact accelerators (HAS fault-aware scheduling).",
)

# Options shared by several commands (defined once so their help stays consistent).
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registered model name.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Model seed (one trained instance).")]
ModelsDirOpt = Annotated[Path | None, typer.Option(
    "--models-dir", help="Checkpoint store [default: $HASCHED_MODELS_DIR or "
    "~/.cache/hasched/models].")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Dataset folder [default: $HASCHED_DATA_DIR, then caches].")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]
ErrorOpt = Annotated[str, typer.Option("--error", "-e", help="Error model (see `hasched list`).")]
FrMaxOpt = Annotated[float, typer.Option("--fr-max", help="Maximum per-PE fault rate.")]
ProfileSeedOpt = Annotated[int, typer.Option("--profile-seed", help="Fault-profile seed.")]
NSmsOpt = Annotated[int, typer.Option("--n-sms", help="Streaming multiprocessors.")]


AlgorithmOpt = Annotated[str, typer.Option(
    help="Searcher: ga (HAS), criticality, hybrid, cma, random (see `hasched list`).")]
OptionOpt = Annotated[list[str] | None, typer.Option(
    "--option", help="Searcher config field KEY=VALUE, repeatable (e.g. noise=mean, "
    "probe_scale=10); values are JSON, else strings.")]


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _options(pairs: list[str] | None) -> dict:
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


def _accel(n_sms: int):
    from hasched.sim.hardware import AcceleratorConfig

    return AcceleratorConfig(n_sms=n_sms)


@app.command("list")
def list_cmd() -> None:
    """List registered models (with their layers), error models and searchers."""
    from hasched.search import list_searchers
    from hasched.sim.faults import PAPER_FR_MAX, list_error_models
    from hasched.sim.layers import weight_layer_names
    from hasched.zoo.models import create_model, list_models

    typer.echo("models:")
    for name in list_models():
        typer.echo(f"  {name:14s} layers: {', '.join(weight_layer_names(create_model(name)))}")
    typer.echo("error models:")
    for name in list_error_models():
        rates = PAPER_FR_MAX.get(name)
        typer.echo(f"  {name:10s}" + (f" paper FR_max: {', '.join(map(str, rates))}"
                                       if rates else ""))
    typer.echo(f"searchers: {', '.join(list_searchers())}")


@app.command()
def train(
    model: ModelOpt = "mnist32-cnn",
    seed: SeedOpt = 1,
    epochs: Annotated[int | None, typer.Option(
        help="Override the recipe's (step-matched) epoch count.")] = None,
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    force: Annotated[bool, typer.Option(help="Retrain even if a checkpoint exists.")] = False,
) -> None:
    """Train a model with its recipe and store the checkpoint."""
    from hasched.zoo.train import (
        CheckpointNotFoundError,
        checkpoint_dir,
        load_checkpoint,
        save_checkpoint,
        train_model,
    )

    if not force:
        try:
            _, meta = load_checkpoint(model, seed, models_dir)
            typer.echo(f"{model} seed {seed}: checkpoint exists (test accuracy "
                       f"{meta.get('test_accuracy', float('nan')):.4f}); use --force to retrain")
            return
        except CheckpointNotFoundError:
            pass
    net, meta = train_model(model, seed, data_dir=data_dir, epochs=epochs)
    save_checkpoint(net, meta, models_dir)
    typer.echo(f"{model} seed {seed}: test accuracy {meta['test_accuracy']:.4f} "
               f"({meta['epochs']} epochs, {meta.get('steps', '?')} steps) -> "
               f"{checkpoint_dir(model, seed, models_dir)}")


@app.command()
def profile(
    fr_max: FrMaxOpt = 5e-3,
    seed: Annotated[int, typer.Option("--seed", help="Profile seed.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Write .npy or .json here.")] = None,
    show: Annotated[Path | None, typer.Option(help="Inspect an existing profile.")] = None,
    n_sms: NSmsOpt = 20,
) -> None:
    """Generate (or inspect) a fault profile: per-PE rates ~ Uniform(0, FR_max)."""
    from hasched.sim.hardware import FaultProfile

    if show is not None:
        prof = FaultProfile.load(show)
    else:
        prof = FaultProfile.generate(fr_max, seed, _accel(n_sms))
    r = prof.rates
    typer.echo(f"profile {r.shape[0]} SMs x {r.shape[1]} PEs: min {r.min():.3g} mean "
               f"{r.mean():.3g} max {r.max():.3g}; worst PE (sm, thread) = "
               f"{tuple(int(i) for i in divmod(int(r.argmax()), r.shape[1]))}")
    if out is not None:
        if out.exists():
            raise HaschedError(f"{out} exists; not overwriting it")
        prof.save(out)
        typer.echo(f"wrote {out}")


@app.command()
def evaluate(
    model: ModelOpt = "mnist32-cnn",
    seed: SeedOpt = 1,
    layers: Annotated[str, typer.Option(help="Faulty layers: c0 | c0,h2 | all.")] = "c0",
    error: ErrorOpt = "flip-to-1",
    fr_max: FrMaxOpt = 5e-3,
    profile_seed: ProfileSeedOpt = 1,
    profile: Annotated[Path | None, typer.Option(
        "--profile", help="Use this .npy/.json profile instead of generating one.")] = None,
    repeats: Annotated[int, typer.Option(help="Fresh error instances.")] = 3,
    images: Annotated[str | None, typer.Option(
        help="Test images: N (first N), A:B, A: or :B [default: all].")] = None,
    schedule: Annotated[Path | None, typer.Option(
        help="schedule.json (or a search output folder) to apply.")] = None,
    error_seed: Annotated[int, typer.Option(help="Seed of the error instances.")] = 0,
    device: DeviceOpt = "cpu",
    n_sms: NSmsOpt = 20,
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Accuracy of a model with some layers on the faulty accelerator."""
    from hasched.study.build import FaultScenario, build_evaluator, load_schedule
    from hasched.study.build import evaluate as run_eval

    if repeats < 1:
        raise HaschedError("--repeats must be >= 1")
    scn = FaultScenario(error=error, fr_max=fr_max, profile_seed=profile_seed,
                        profile_path=str(profile) if profile else None, accel=_accel(n_sms))
    scn.error_model()  # fail on an unknown error before any loading or training
    scn.profile()
    ev = build_evaluator(model, seed, layers, scn, images, device=device,
                         models_dir=models_dir, data_dir=data_dir, log=_log)
    perms = None
    if schedule is not None:
        perms, _ = load_schedule(schedule, ev.rows)
    res = run_eval(ev, repeats=repeats, error_seed=error_seed, perms=perms)
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(f"{model} seed {seed} | layers {','.join(res['layers'])} | {error} "
               f"FR_max {fr_max:g} | profile seed {profile_seed} | {res['images']} images")
    typer.echo(f"clean accuracy   {res['clean_accuracy']:.4f}")
    typer.echo(f"faulty accuracy  {res['accuracy_mean']:.4f} +- {res['accuracy_std']:.4f} "
               f"over {repeats} repeats" + (" (with schedule)" if perms else ""))


@app.command()
def sensitivity(
    out: Annotated[Path, typer.Option("--out", help="Campaign folder (resumed if it exists).")],
    model: ModelOpt = "mnist32-cnn",
    seeds: Annotated[str, typer.Option(help="Model seeds, e.g. 1,2,3.")] = "1,2,3",
    layers: Annotated[str, typer.Option(
        help="all | c0,h2 (one at a time) | c0+c1 (faulted together).")] = "all",
    errors: Annotated[str, typer.Option(
        help="all (the paper's five) | flip-to-1,bitflip.")] = "all",
    fr_max: Annotated[str, typer.Option(
        "--fr-max", help="paper (Table 1 per error) | sweep (Table 1 + 1e-4..0.5) | "
        "1e-3,2e-3,5e-3.")] = "paper",
    profile_seeds: Annotated[str, typer.Option(help="Fault-profile seeds.")] = "1,2",
    repeats: Annotated[int, typer.Option(help="Fresh error instances per cell.")] = 3,
    images: Annotated[str | None, typer.Option(
        help="Test images: N, A:B or all.")] = "1000",
    workers: Annotated[int, typer.Option(help="CPU worker processes.")] = 1,
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    report: Annotated[bool, typer.Option(help="Write figures and report.md at the end.")] = True,
) -> None:
    """Fault-sensitivity campaign (paper 5.1): accuracy over a grid of faulty scenarios."""
    from hasched.study.campaign import CampaignConfig, run_campaign

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = CampaignConfig.from_args(model, seeds, layers, errors, fr_max, profile_seeds,
                                   repeats, None if images == "all" else images, device)
    res = run_campaign(cfg, out, workers=workers, models_dir=models_dir, data_dir=data_dir,
                       log=_log)
    typer.echo(f"{res['computed']} cells computed, {res['done_before']} already done, "
               f"{res['cells']} in the grid; {res['rows']} rows in {out / 'results.csv'} "
               f"({res['seconds']:.0f} s)")
    if report:
        from hasched.report.sensitivity import write_report

        typer.echo(f"report: {write_report(out)['report']}")


@app.command("report")
def report_cmd(
    dirs: Annotated[list[Path], typer.Argument(
        help="Campaign folder(s); several are compared (e.g. mnist32-cnn and fashion-cnn).")],
    out: Annotated[Path | None, typer.Option(
        help="Where report.md and figures go [default: the first folder].")] = None,
) -> None:
    """(Re)draw tables, figures and report.md from saved sensitivity results."""
    from hasched.report.sensitivity import write_report

    res = write_report(list(dirs), out)
    for p in res["figures"]:
        typer.echo(f"figure: {p}")
    typer.echo(f"report: {res['report']}")


@app.command()
def search(
    out: Annotated[Path, typer.Option(help="Output folder (resumed if it holds this run).")],
    model: ModelOpt = "mnist32-cnn",
    seed: SeedOpt = 1,
    layers: Annotated[str, typer.Option(help="Searched faulty layers: c0 | h2,op (joint).")] = "c0",
    error: ErrorOpt = "flip-to-1",
    fr_max: FrMaxOpt = 5e-3,
    profile_seed: ProfileSeedOpt = 1,
    profile: Annotated[Path | None, typer.Option(
        "--profile", help="The chip's .npy/.json profile instead of --fr-max/--profile-seed.")
    ] = None,
    plan_profile: Annotated[Path | None, typer.Option(
        help="Profile model-aware searchers plan with (e.g. from `hasched diagnose`); "
        "fitness and held-out accuracy still run on the chip's profile.")] = None,
    algorithm: AlgorithmOpt = "ga",
    option: OptionOpt = None,
    population: Annotated[int, typer.Option(
        help="Budget: GA/CMA population (random search: batch).")] = 20,
    generations: Annotated[int, typer.Option(
        help="Budget: generations (random search and CMA-ES get population x "
        "(generations + 1) evaluations; criticality ignores the budget).")] = 100,
    runs: Annotated[int, typer.Option(help="Independent runs; the best is kept.")] = 3,
    repeats: Annotated[int, typer.Option(help="Error instances per fitness evaluation.")] = 3,
    search_images: Annotated[str, typer.Option(help="Fitness images (A:B).")] = "5120:",
    holdout_images: Annotated[str, typer.Option(help="Held-out images (disjoint).")] = ":5120",
    holdout_repeats: Annotated[int, typer.Option(help="Held-out error instances.")] = 10,
    search_seed: Annotated[int, typer.Option(help="Run i is seeded search_seed + i.")] = 0,
    random_baseline: Annotated[bool, typer.Option(
        help="Also run random search at the same budget.")] = True,
    device: DeviceOpt = "cpu",
    n_sms: NSmsOpt = 20,
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Search a fault-aware schedule (HAS) and evaluate it on held-out images."""
    from hasched.study.schedule_search import SearchSettings, run_has_search

    s = SearchSettings(model=model, seed=seed, layers=layers, error=error, fr_max=fr_max,
                       profile_seed=profile_seed, profile=str(profile) if profile else None,
                       plan_profile=str(plan_profile) if plan_profile else None,
                       algorithm=algorithm, options=_options(option), population=population,
                       generations=generations, runs=runs, repeats=repeats,
                       search_images=search_images, holdout_images=holdout_images,
                       holdout_repeats=holdout_repeats, search_seed=search_seed,
                       n_sms=n_sms, device=device, random_baseline=random_baseline)
    res = run_has_search(out, s, models_dir=models_dir, data_dir=data_dir, log=_log)
    r = res["results"]
    rnd = f" | random {r['random']['mean']:.4f}" if r["random"] else ""
    typer.echo(f"held-out accuracy ({r['has']['images']} images, {r['has']['repeats']} "
               f"repeats): clean {r['clean']['mean']:.4f} | degraded (identity) "
               f"{r['identity']['mean']:.4f} | {algorithm} {r['has']['mean']:.4f}{rnd}; "
               f"{sum(res['search']['evaluations'])} evaluations")
    typer.echo(f"report: {Path(out) / 'summary.md'}")


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Output folder (finished cases are skipped).")],
    quick: Annotated[bool, typer.Option(
        help="Reduced plan: the 12 mnist32-cnn cases, small GA (~15 min on 2 cores).")] = False,
    algorithm: AlgorithmOpt = "ga",
    option: OptionOpt = None,
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run the paper's §5.2 recovery cases and write REPORT.md."""
    from hasched.study.reproduce import run_reproduce

    run_reproduce(out, quick, device=device, models_dir=models_dir, data_dir=data_dir, log=_log,
                  algorithm=algorithm, options=_options(option))
    typer.echo(f"report: {Path(out) / 'REPORT.md'}")


@app.command()
def bench(
    device: DeviceOpt = "cpu",
    filter: Annotated[str, typer.Option(help="Only entries whose name contains this.")] = "",
    model: ModelOpt = "mnist32-cnn",
    images: Annotated[str, typer.Option(help="Test-image range timed.")] = "5120:",
    trials: Annotated[int, typer.Option(help="Timed runs per entry (median).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    markdown: Annotated[Path | None, typer.Option(help="Also write a markdown table.")] = None,
) -> None:
    """Time clean vs faulty inference, GA fitness and generations (ratios to clean)."""
    from hasched.study.bench import BenchConfig, run_bench, to_markdown

    cfg = BenchConfig(model=model, images=images, device=device, filter=filter, trials=trials)
    rows = run_bench(cfg, log=None if as_json else _log)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(to_markdown(rows))
    typer.echo(json.dumps(rows, indent=1) if as_json else to_markdown(rows))


# The searcher `make demo` shows (the best in this project's measurements; README).
DEMO_SEARCHER = "hybrid"
DEMO_OPTIONS: dict = {}


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    generations: Annotated[int, typer.Option(help="Generations of the GA stage.")] = 20,
    search_images: Annotated[str, typer.Option(help="Fitness images.")] = "5120:6120",
    holdout_images: Annotated[str, typer.Option(help="Held-out images.")] = ":5120",
    train_epochs: Annotated[int, typer.Option(
        help="Epochs if the model must be trained (the full recipe, `hasched train`, is "
        "150 epochs: ~30 min on 2 cores).")] = 20,
    device: DeviceOpt = "cpu",
    models_dir: Annotated[Path | None, typer.Option(
        "--models-dir", help="Checkpoint store [default: OUT/models, so a demo-length "
        "model never stands in for a recipe-trained one].")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """The main job in minutes: train mnist32-cnn, fault c0, search a schedule."""
    from hasched.study.build import FaultScenario, build_evaluator
    from hasched.study.build import evaluate as run_eval
    from hasched.study.compare import run_comparison
    from hasched.study.schedule_search import SearchSettings
    from hasched.zoo.train import load_or_train

    models_dir = models_dir or out / "models"
    typer.echo(f"1/3 model: mnist32-cnn seed 1 (store {models_dir}; trained for "
               f"{train_epochs} epochs on first use, then cached)")
    _, meta = load_or_train("mnist32-cnn", 1, models_dir=models_dir, data_dir=data_dir,
                            log=_log, epochs=train_epochs)
    typer.echo(f"    test accuracy {meta['test_accuracy']:.4f} ({meta['epochs']} epochs)")
    scn = FaultScenario("flip-to-1", 5e-3, 1)
    ev = build_evaluator("mnist32-cnn", 1, ["c0"], scn, holdout_images, device=device,
                         models_dir=models_dir, data_dir=data_dir, log=_log)
    res = run_eval(ev, repeats=3, error_seed=0)
    typer.echo(f"2/3 c0 on a faulty accelerator (flip-to-1, FR_max 5e-3, 20 SMs x 32 PEs): "
               f"accuracy {res['clean_accuracy']:.4f} clean -> {res['accuracy_mean']:.4f} "
               f"+- {res['accuracy_std']:.4f}")
    typer.echo(f"3/3 schedule search: criticality (probe each row, sort), then "
               f"{DEMO_SEARCHER} (population 20, {generations} generations); fitness on "
               f"images {search_images}, held-out {holdout_images}")
    s = SearchSettings(layers="c0", error="flip-to-1", fr_max=5e-3, profile_seed=1,
                       generations=generations, runs=1, search_images=search_images,
                       holdout_images=holdout_images, device=device)
    rep = run_comparison(out / "search", s, ["criticality", DEMO_SEARCHER],
                         {DEMO_SEARCHER: DEMO_OPTIONS}, models_dir=models_dir,
                         data_dir=data_dir, log=_log)
    crit, best = rep["searchers"]
    typer.echo(f"held-out accuracy ({rep['clean']['images']} images, "
               f"{best['holdout']['repeats']} repeats):")
    for st, label in ((rep["clean"], "clean"), (rep["identity"], "degraded (no schedule)"),
                      (crit["holdout"], f"criticality, {crit['evaluations']} evaluations"),
                      (best["holdout"], f"{DEMO_SEARCHER}, {best['evaluations']} evaluations"),
                      (best["random_same_budget"], "random search, same budget")):
        lo, hi = st["ci95"]
        typer.echo(f"  {label:32s} {st['mean']:.4f}  [95% CI {lo:.4f}, {hi:.4f}]")
    sdir = out / "search"
    typer.echo(f"report: {sdir / 'comparison.md'}  figures: {sdir / 'convergence-all.png'}, "
               f"{sdir / DEMO_SEARCHER / 'recovery.png'}")


@app.command()
def compare(
    out: Annotated[Path, typer.Option(help="Output folder: one search folder per searcher.")],
    algorithms: Annotated[str, typer.Option(
        help="Comma-separated searchers.")] = "criticality,ga,hybrid,random,cma",
    option: Annotated[list[str] | None, typer.Option(
        "--option", help="ALGORITHM.KEY=VALUE, repeatable (e.g. hybrid.generations=38, "
        "ga.noise=mean).")] = None,
    model: ModelOpt = "mnist32-cnn",
    seed: SeedOpt = 1,
    layers: Annotated[str, typer.Option(help="Searched faulty layers.")] = "c0",
    error: ErrorOpt = "flip-to-1",
    fr_max: FrMaxOpt = 5e-3,
    profile_seed: ProfileSeedOpt = 1,
    population: Annotated[int, typer.Option(help="Budget: population.")] = 20,
    generations: Annotated[int, typer.Option(help="Budget: generations.")] = 30,
    runs: Annotated[int, typer.Option(help="Independent runs per searcher.")] = 1,
    repeats: Annotated[int, typer.Option(help="Error instances per fitness evaluation.")] = 3,
    search_images: Annotated[str, typer.Option(help="Fitness images.")] = "5120:7120",
    holdout_images: Annotated[str, typer.Option(help="Held-out images.")] = ":5120",
    holdout_repeats: Annotated[int, typer.Option(help="Held-out error instances.")] = 10,
    random_baseline: Annotated[bool, typer.Option(
        help="Also run random search at every searcher's own budget.")] = False,
    device: DeviceOpt = "cpu",
    n_sms: NSmsOpt = 20,
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run several searchers on one scenario and budget; table + one convergence figure."""
    from hasched.study.compare import run_comparison
    from hasched.study.schedule_search import SearchSettings

    per: dict[str, dict] = {}
    for key, value in _options(option).items():
        alg, dot, field_name = key.partition(".")
        if not dot:
            raise HaschedError(f"compare --option needs ALGORITHM.KEY=VALUE, got {key!r}")
        per.setdefault(alg, {})[field_name] = value
    s = SearchSettings(model=model, seed=seed, layers=layers, error=error, fr_max=fr_max,
                       profile_seed=profile_seed, population=population,
                       generations=generations, runs=runs, repeats=repeats,
                       search_images=search_images, holdout_images=holdout_images,
                       holdout_repeats=holdout_repeats, n_sms=n_sms, device=device,
                       random_baseline=random_baseline)
    names = [a.strip() for a in algorithms.split(",") if a.strip()]
    rep = run_comparison(out, s, names, per, models_dir=models_dir, data_dir=data_dir, log=_log)
    for r in rep["searchers"]:
        lo, hi = r["holdout"]["ci95"]
        typer.echo(f"{r['algorithm']:12s} held-out {r['holdout']['mean']:.4f} [{lo:.4f}, "
                   f"{hi:.4f}]  {r['evaluations']:5d} evaluations  {r['search_seconds']:6.0f} s")
    typer.echo(f"report: {Path(out) / 'comparison.md'}")


@app.command()
def export(
    schedule: Annotated[Path, typer.Option(help="schedule.json (or a search folder).")],
    out: Annotated[Path, typer.Option(help="Exported .safetensors (never overwritten).")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model [default: the schedule's].")] = None,
    seed: Annotated[int | None, typer.Option(help="Model seed [default: the schedule's].")
                    ] = None,
    models_dir: ModelsDirOpt = None,
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


@app.command()
def diagnose(
    out: Annotated[Path, typer.Option(help="Estimated profile (.json; never overwritten).")],
    error: ErrorOpt = "flip-to-1",
    fr_max: FrMaxOpt = 5e-3,
    profile_seed: ProfileSeedOpt = 1,
    profile: Annotated[Path | None, typer.Option(
        "--profile", help="The simulated chip's true profile file instead of a seed.")] = None,
    runs: Annotated[int, typer.Option(help="Probe GEMMs.")] = 16,
    columns: Annotated[int, typer.Option(help="Output columns (trials per PE) per probe.")
                       ] = 4096,
    confidence: Annotated[float, typer.Option(help="Confidence level of the intervals.")
                          ] = 0.95,
    method: Annotated[str, typer.Option(help="clopper-pearson or wilson.")] = "clopper-pearson",
    chip_seed: Annotated[int, typer.Option(help="Seed of the chip's fault draws.")] = 0,
    n_sms: NSmsOpt = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Estimate a (simulated) chip's per-PE fault rates from probe GEMMs, with CIs."""
    from hasched.sim.faults import create_error_model
    from hasched.sim.hardware import FaultProfile
    from hasched.study.diagnose import SimulatedChip, compare_to_truth
    from hasched.study.diagnose import diagnose as run_diagnosis

    if out.exists():
        raise HaschedError(f"{out} exists; not overwriting it")
    if out.suffix != ".json":
        raise HaschedError(f"--out must be a .json file, got {out.name}")
    accel = _accel(n_sms)
    em = create_error_model(error)
    truth = FaultProfile.load(profile) if profile else FaultProfile.generate(
        fr_max, profile_seed, accel)
    diag = run_diagnosis(SimulatedChip(truth, em, accel, chip_seed), runs, columns, confidence,
                         method)
    diag.save(out)
    check = compare_to_truth(diag, truth)
    res = {"out": str(out), "runs": runs, "trials_per_pe": diag.trials,
           "test_value": diag.value, "detection": diag.detection, **check}
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(f"{runs} probe GEMMs x {columns} columns = {diag.trials} trials per PE "
               f"(test value {diag.value:g}, detection {diag.detection:.3f})")
    typer.echo(f"simulation check: mean |error| {check['mean_abs_error']:.2e}, "
               f"{100 * check['ci_coverage']:.1f}% of true rates inside their "
               f"{100 * confidence:g}% intervals, rank correlation {check['spearman']}")
    typer.echo(f"estimated profile -> {out} (use with --profile or --plan-profile)")


# New commands go above this line.


def main() -> None:
    """Console entry point: one-line errors, exit status 2, never a traceback.

    Typer's standalone mode handles ``--help``, usage errors (exit 2) and Ctrl-C (exit 1);
    what a command raises as :class:`HaschedError` is printed here as one line.
    """
    try:
        app()
    except HaschedError as err:
        typer.echo(f"hasched: error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("hasched: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
