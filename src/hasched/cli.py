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
TrainOpt = Annotated[bool, typer.Option(
    "--train", help="Train a missing checkpoint (~20-30 min on 2 cores) instead of stopping "
    "with an error.")]


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


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
    from hasched.io import make_dirs
    from hasched.zoo.train import (
        CheckpointNotFoundError,
        check_store,
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
    if epochs is not None and epochs < 1:
        raise HaschedError(f"--epochs must be >= 1, got {epochs}")
    make_dirs(check_store(model, seed, models_dir))  # a bad store fails now, not after training
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
    from hasched.io import atomic_write, check_out_file, make_dirs
    from hasched.sim.hardware import FaultProfile

    if out is not None:  # checked before anything is computed
        check_out_file(out, option="--out")
        if out.suffix not in (".npy", ".json"):
            raise HaschedError(f"--out: use a .npy or .json file name, got {out.name}")
    if show is not None:
        prof = FaultProfile.load(show)
    else:
        prof = FaultProfile.generate(fr_max, seed, _accel(n_sms))
    r = prof.rates
    typer.echo(f"profile {r.shape[0]} SMs x {r.shape[1]} PEs: min {r.min():.3g} mean "
               f"{r.mean():.3g} max {r.max():.3g}; worst PE (sm, thread) = "
               f"{tuple(int(i) for i in divmod(int(r.argmax()), r.shape[1]))}")
    if out is not None:
        import numpy as np

        # FaultProfile.save's formats, written through atomic_write (a full or read-only
        # disk is one line, no temporary file is left).
        make_dirs(out.parent)
        atomic_write(out, (lambda fh: np.save(fh, r)) if out.suffix == ".npy"
                     else json.dumps(prof.to_dict(), indent=1))
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
    train: TrainOpt = False,
) -> None:
    """Accuracy of a model with some layers on the faulty accelerator."""
    from hasched.study.build import FaultScenario, build_evaluator, load_schedule, read_schedule
    from hasched.study.build import evaluate as run_eval

    if repeats < 1:
        raise HaschedError("--repeats must be >= 1")
    if schedule is not None:
        read_schedule(schedule)  # a malformed file fails before the model is loaded
    scn = FaultScenario(error=error, fr_max=fr_max, profile_seed=profile_seed,
                        profile_path=str(profile) if profile else None, accel=_accel(n_sms))
    scn.error_model()  # fail on an unknown error before any loading or training
    scn.profile()
    ev = build_evaluator(model, seed, layers, scn, images, device=device,
                         models_dir=models_dir, data_dir=data_dir, log=_log, train=train)
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
    train: TrainOpt = False,
) -> None:
    """Fault-sensitivity campaign (paper 5.1): accuracy over a grid of faulty scenarios."""
    from hasched.study.campaign import CampaignConfig, run_campaign

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = CampaignConfig.from_args(model, seeds, layers, errors, fr_max, profile_seeds,
                                   repeats, None if images == "all" else images, device)
    res = run_campaign(cfg, out, workers=workers, models_dir=models_dir, data_dir=data_dir,
                       log=_log, train=train)
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
    algorithm: Annotated[str, typer.Option(help="ga (HAS) or random.")] = "ga",
    population: Annotated[int, typer.Option(help="GA population.")] = 20,
    generations: Annotated[int, typer.Option(help="GA generations.")] = 100,
    runs: Annotated[int, typer.Option(help="Independent runs; the best is kept.")] = 3,
    repeats: Annotated[int, typer.Option(help="Error instances per fitness evaluation.")] = 3,
    search_images: Annotated[str, typer.Option(help="Fitness images (A:B).")] = "5120:",
    holdout_images: Annotated[str, typer.Option(help="Held-out images (disjoint).")] = ":5120",
    holdout_repeats: Annotated[int, typer.Option(help="Held-out error instances.")] = 10,
    search_seed: Annotated[int, typer.Option(help="Run i is seeded search_seed + i.")] = 0,
    device: DeviceOpt = "cpu",
    n_sms: NSmsOpt = 20,
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    train: TrainOpt = False,
) -> None:
    """Search a fault-aware schedule (HAS) and evaluate it on held-out images."""
    from hasched.study.schedule_search import SearchSettings, run_has_search

    s = SearchSettings(model=model, seed=seed, layers=layers, error=error, fr_max=fr_max,
                       profile_seed=profile_seed, algorithm=algorithm, population=population,
                       generations=generations, runs=runs, repeats=repeats,
                       search_images=search_images, holdout_images=holdout_images,
                       holdout_repeats=holdout_repeats, search_seed=search_seed,
                       n_sms=n_sms, device=device)
    res = run_has_search(out, s, models_dir=models_dir, data_dir=data_dir, log=_log,
                         train=train)
    r = res["results"]
    typer.echo(f"held-out accuracy ({r['has']['images']} images, {r['has']['repeats']} "
               f"repeats): clean {r['clean']['mean']:.4f} | degraded (identity) "
               f"{r['identity']['mean']:.4f} | HAS {r['has']['mean']:.4f} | random "
               f"{r['random']['mean']:.4f}")
    typer.echo(f"report: {Path(out) / 'summary.md'}")


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Output folder (finished cases are skipped).")],
    quick: Annotated[bool, typer.Option(
        help="Reduced plan: the 12 mnist32-cnn cases, small GA (~15 min on 2 cores).")] = False,
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    train: TrainOpt = False,
) -> None:
    """Run the paper's §5.2 recovery cases and write REPORT.md."""
    from hasched.study.reproduce import run_reproduce

    run_reproduce(out, quick, device=device, models_dir=models_dir, data_dir=data_dir, log=_log,
                  train=train)
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
    from hasched.io import atomic_write, check_out_file, make_dirs
    from hasched.study.bench import BenchConfig, is_bench_markdown, run_bench, to_markdown

    if markdown is not None:  # checked before the (minutes of) timing, rewritten if ours
        check_out_file(markdown, option="--markdown", ours=is_bench_markdown)
    cfg = BenchConfig(model=model, images=images, device=device, filter=filter, trials=trials)
    rows = run_bench(cfg, log=None if as_json else _log)
    if markdown is not None:
        make_dirs(markdown.parent)
        atomic_write(markdown, to_markdown(rows))
    typer.echo(json.dumps(rows, indent=1) if as_json else to_markdown(rows))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    generations: Annotated[int, typer.Option(help="GA generations.")] = 20,
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
    """The main job in minutes: train mnist32-cnn, fault c0, search a HAS schedule."""
    from hasched.io import claim_out_dir
    from hasched.study.schedule_search import SearchSettings, check_demo_dir, prepare_search

    s = SearchSettings(layers="c0", error="flip-to-1", fr_max=5e-3, profile_seed=1,
                       generations=generations, runs=1, search_images=search_images,
                       holdout_images=holdout_images, device=device)
    if train_epochs < 1:
        raise HaschedError(f"--train-epochs must be >= 1, got {train_epochs}")
    check_demo_dir(out, s)
    models_dir = models_dir or out / "models"
    prepare_search(s, models_dir, data_dir, train=True)  # every check before any training
    with claim_out_dir(out, {"hasched": "demo"}, lock=False):
        _demo(out, s, train_epochs, models_dir, data_dir)


def _demo(out: Path, s, train_epochs: int, models_dir: Path, data_dir: Path | None) -> None:
    from hasched.study.build import FaultScenario, build_evaluator
    from hasched.study.build import evaluate as run_eval
    from hasched.study.schedule_search import run_has_search
    from hasched.zoo.train import load_or_train

    device, generations = s.device, s.generations
    search_images, holdout_images = s.search_images, s.holdout_images
    typer.echo(f"1/3 model: mnist32-cnn seed 1 (store {models_dir}; trained for "
               f"{train_epochs} epochs on first use, then cached)")
    _, meta = load_or_train("mnist32-cnn", 1, models_dir=models_dir, data_dir=data_dir,
                            log=_log, epochs=train_epochs, train=True)
    typer.echo(f"    test accuracy {meta['test_accuracy']:.4f} ({meta['epochs']} epochs)")
    scn = FaultScenario("flip-to-1", 5e-3, 1)
    ev = build_evaluator("mnist32-cnn", 1, ["c0"], scn, holdout_images, device=device,
                         models_dir=models_dir, data_dir=data_dir, log=_log)
    res = run_eval(ev, repeats=3, error_seed=0)
    typer.echo(f"2/3 c0 on a faulty accelerator (flip-to-1, FR_max 5e-3, 20 SMs x 32 PEs): "
               f"accuracy {res['clean_accuracy']:.4f} clean -> {res['accuracy_mean']:.4f} "
               f"+- {res['accuracy_std']:.4f}")
    typer.echo(f"3/3 HAS search: population 20, {generations} generations, fitness on "
               f"images {search_images}, held-out {holdout_images}")
    summ = run_has_search(out / "search", s, models_dir=models_dir, data_dir=data_dir, log=_log)
    r = summ["results"]
    typer.echo(f"held-out accuracy ({r['has']['images']} images, {r['has']['repeats']} repeats):")
    for key, label in (("clean", "clean"), ("identity", "degraded (no schedule)"),
                       ("has", "recovered (HAS)"), ("random", "random search, same budget")):
        lo, hi = r[key]["ci95"]
        typer.echo(f"  {label:28s} {r[key]['mean']:.4f}  [95% CI {lo:.4f}, {hi:.4f}]")
    sdir = out / "search"
    typer.echo(f"report: {sdir / 'summary.md'}  figures: {sdir / 'recovery.png'}, "
               f"{sdir / 'convergence.png'}")


# New commands go above this line.


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit status 2, never a traceback.

    Typer's standalone mode handles ``--help``, usage errors (exit 2) and Ctrl-C (exit 1);
    what a command raises as :class:`HaschedError` is printed here as one line.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``); tests pass them to run in-process.
    """
    try:
        app(args=argv, prog_name="hasched")
    except HaschedError as err:
        typer.echo(f"hasched: error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("hasched: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
