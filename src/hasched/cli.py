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

from hasched.cli_options import ExecutorOpt, executor_from, scenario_from, scenario_options
from hasched.cli_search import (
    AlgorithmOpt,
    OptionOpt,
    compare,
    diagnose,
    export,
    parse_options,
)
from hasched.errors import HaschedError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run DNNs on faulty, marginal or inexact accelerators (HAS fault-aware scheduling).",
)

# Options shared by several commands (defined once so their help stays consistent); the
# scenario options (model, layers, mapping, arithmetic, faults, ...) live in cli_options.
ModelsDirOpt = Annotated[Path | None, typer.Option(
    "--models-dir", help="Checkpoint store [default: $HASCHED_MODELS_DIR or "
    "~/.cache/hasched/models].")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Dataset folder [default: $HASCHED_DATA_DIR, then caches].")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registered model name.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Model seed (one trained instance).")]
MappingOpt = Annotated[str, typer.Option(
    "--mapping", help="gpu-tiles | gpu-tiles:sms=10 | systolic:RxC.")]
TrainOpt = Annotated[bool, typer.Option(
    "--train", help="Train a missing checkpoint (~20-30 min on 2 cores) instead of stopping "
    "with an error.")]


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _mapping(spec: str, n_sms: int = 20):
    from hasched.study.scenario import Scenario

    return Scenario(mapping=spec, n_sms=n_sms).mapping_obj()


@app.command("list")
def list_cmd() -> None:
    """List models (with their layers), mappings, arithmetics, multipliers, fault models,
    metrics and searchers."""
    from hasched.search import list_searchers
    from hasched.sim.faults import FAULTS, PAPER_FR_MAX
    from hasched.sim.layers import weight_layer_names
    from hasched.sim.mapping import MAPPINGS
    from hasched.sim.metrics import METRICS
    from hasched.sim.multipliers import MULTIPLIERS, create_multiplier
    from hasched.zoo.models import create_model, list_models

    typer.echo("models:")
    for name in list_models():
        typer.echo(f"  {name:14s} layers: {', '.join(weight_layer_names(create_model(name)))}")
    typer.echo("mappings: " + ", ".join(f"{n} ({MAPPINGS.doc(n)})" for n in MAPPINGS.names()))
    typer.echo("arithmetics: fp32, int8 (symmetric PTQ, int32 accumulation)")
    typer.echo("multipliers (int8; exhaustive error metrics over 8x8 unsigned operands):")
    for name in MULTIPLIERS.names():
        m = create_multiplier(name).metrics()
        typer.echo(f"  {name:9s} MAE {m['mae']:9.2f}  WCE {m['wce']:6d}  MRE {m['mre']:.4f}  "
                   f"EP {m['error_probability']:.3f}  {MULTIPLIERS.doc(name)}")
    typer.echo("fault models:")
    for name in FAULTS.names():
        rates = PAPER_FR_MAX.get(name)
        typer.echo(f"  {name:10s} {FAULTS.doc(name)}" + (
            f"; paper FR_max: {', '.join(map(str, rates))}" if rates else ""))
    typer.echo(f"metrics: {', '.join(METRICS.names())}")
    typer.echo(f"searchers: {', '.join(list_searchers())}")


@app.command()
def train(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Registered model name (default: mnist32-cnn).")] = None,
    torchvision: Annotated[str | None, typer.Option(
        help="A torchvision model (bundled equivalents here: resnet18, mobilenet_v3_small).")
    ] = None,
    module: Annotated[str | None, typer.Option(
        help="PKG.MODULE:FUNCTION returning an nn.Module (must be importable).")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="mnist, mnist32 or fashion-mnist (default: the model's own).")] = None,
    num_classes: Annotated[int | None, typer.Option(
        help="Outputs of the model (default: the dataset's classes).")] = None,
    seed: SeedOpt = 1,
    epochs: Annotated[int | None, typer.Option(
        help="Override the recipe's (step-matched) epoch count.")] = None,
    train_subset: Annotated[int | None, typer.Option(
        help="Train on the first N training images only.")] = None,
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    force: Annotated[bool, typer.Option(help="Retrain even if a checkpoint exists.")] = False,
) -> None:
    """Train a model with its recipe and store the checkpoint."""
    from hasched.io import make_dirs
    from hasched.zoo.ref import ModelRef, build_model
    from hasched.zoo.train import (
        CheckpointNotFoundError,
        check_store,
        checkpoint_dir,
        load_stored,
        save_checkpoint,
        train_ref,
    )

    ref = ModelRef.from_options(model, torchvision, module, None, num_classes, dataset,
                                default_model="mnist32-cnn")
    name = ref.store_name
    if not force:
        try:
            _, meta = load_stored(ref, seed, models_dir)
            typer.echo(f"{name} seed {seed}: checkpoint exists (test accuracy "
                       f"{meta.get('test_accuracy', float('nan')):.4f}); use --force to retrain")
            return
        except CheckpointNotFoundError:
            pass
    if epochs is not None and epochs < 1:
        raise HaschedError(f"--epochs must be >= 1, got {epochs}")
    folder = check_store(name, seed, models_dir)  # a bad store fails now, not after training
    build_model(ref, seed)  # so does a bad model reference, before anything is created
    make_dirs(folder)
    # A run killed part-way resumes from the state kept in its checkpoint folder.
    net, meta = train_ref(ref, seed, data_dir=data_dir, epochs=epochs, train_subset=train_subset,
                          state_dir=folder, log=_log)
    save_checkpoint(net, meta, models_dir)
    typer.echo(f"{name} seed {seed}: test accuracy {meta['test_accuracy']:.4f} "
               f"({meta['epochs']} epochs, {meta.get('steps', '?')} steps) -> "
               f"{checkpoint_dir(name, seed, models_dir)}")


@app.command()
def profile(
    fr_max: Annotated[float, typer.Option("--fr-max", help="Maximum per-PE rate.")] = 5e-3,
    seed: Annotated[int, typer.Option("--profile-seed", "--seed", help="Profile seed.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Write .npy or .json here.")] = None,
    show: Annotated[Path | None, typer.Option(help="Inspect an existing profile.")] = None,
    mapping: MappingOpt = "gpu-tiles",
    n_sms: Annotated[int, typer.Option("--n-sms", help="SMs of the gpu-tiles mapping.")] = 20,
) -> None:
    """Generate (or inspect) a transient fault profile: per-PE rates ~ Uniform(0, FR_max)."""
    from hasched.io import check_out_file, make_dirs
    from hasched.sim.profile import FaultProfile

    if out is not None:  # checked before anything is computed
        check_out_file(out, option="--out")
        if out.suffix not in (".npy", ".json"):
            raise HaschedError(f"--out: use a .npy or .json file name, got {out.name}")
    if show is not None:
        prof = FaultProfile.load(show)
    else:
        prof = FaultProfile.generate(fr_max, seed, _mapping(mapping, n_sms).pe_shape)
    r = prof.rates
    typer.echo(f"profile {r.shape[0]} x {r.shape[1]} PEs: min {r.min():.3g} mean "
               f"{r.mean():.3g} max {r.max():.3g}; worst PE (row, col) = "
               f"{tuple(int(i) for i in divmod(int(r.argmax()), r.shape[1]))}")
    if out is not None:
        make_dirs(out.parent)
        prof.save(out)  # atomic: a full or read-only disk is one line, no temporary file
        typer.echo(f"wrote {out}")


@app.command()
def chips(
    out: Annotated[Path, typer.Option(help="New folder for the chip maps (JSON).")],
    mapping: MappingOpt = "systolic:16x16",
    n_sms: Annotated[int, typer.Option("--n-sms", help="SMs of the gpu-tiles mapping.")] = 20,
    faulty_pes: Annotated[str, typer.Option(
        "--faulty-pes", help="Shares of faulty PEs, e.g. 0.02,0.05,0.1.")] = "0.05",
    count: Annotated[int, typer.Option(help="Chips per share.")] = 10,
    seed: Annotated[int, typer.Option("--chip-seed", "--seed", help="First chip seed.")] = 1,
    fault: Annotated[str, typer.Option(
        "--fault", help="stuck-at[:bit=14,value=1,site=product] or dead.")] = "stuck-at",
    plot: Annotated[bool, typer.Option(
        "--plot", help="Also draw the maps (OUT/chips.png).")] = False,
) -> None:
    """Sample chip fault maps (permanently faulty PEs) and save them, one JSON file each."""
    from hasched.sim.faults import PermanentFault, create_fault
    from hasched.study.scenario import parse_fault

    name, params = parse_fault(fault)
    spec = create_fault(name, **dict(params))
    if not isinstance(spec, PermanentFault):
        raise HaschedError(f"--fault {name} is transient; chips hold permanent faults "
                           "(stuck-at, dead)")
    try:
        fracs = [float(v) for v in faulty_pes.split(",") if v.strip()]
    except ValueError:
        raise HaschedError(f"--faulty-pes must be comma-separated shares, got "
                           f"{faulty_pes!r}") from None
    if count < 1 or not fracs:
        raise HaschedError("--count must be >= 1 and --faulty-pes non-empty")
    mp = _mapping(mapping, n_sms)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HaschedError(f"{out} exists and is not an empty folder; use another --out")
    maps = [(f, i, spec.sample_chip(mp.pe_shape, f, seed + i, mp.spec()))
            for f in fracs for i in range(count)]
    out.mkdir(parents=True, exist_ok=True)
    for f, i, chip in maps:
        chip.save(out / f"chip_f{f:g}_s{seed + i}.json")
    if plot:
        from hasched.report.reduce import plot_chips

        typer.echo(f"figure: {plot_chips([(str(i), c) for _, i, c in maps], out / 'chips.png')}")
    typer.echo(f"wrote {len(maps)} chip maps ({mp.spec()}, {int(maps[0][2].faulty.size)} PEs) "
               f"to {out}")


@app.command()
@scenario_options()
def evaluate(
    scn: dict,
    schedule: Annotated[Path | None, typer.Option(
        help="schedule.json (or a search output folder) to apply.")] = None,
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per layer "
                                          "group.")] = False,
    train: TrainOpt = False,
) -> None:
    """Accuracy of a model with some layers on a (faulty) simulated accelerator."""
    from hasched.study.build import (
        build_evaluator,
        load_schedule,
        model_layer_names,
        read_schedule,
    )
    from hasched.study.build import evaluate as run_eval
    from hasched.study.scenario import parse_layer_groups

    carrier = scenario_from(scn, layers=("?",))  # the model reference, before the groups
    groups = parse_layer_groups(scn["layers"], model_layer_names(carrier))
    scenarios = [scenario_from(scn, layers=g).validate() for g in groups]
    if schedule is not None:
        read_schedule(schedule)  # a malformed file fails before the model is loaded
    for s in scenarios:
        ev = build_evaluator(s, device=device, models_dir=models_dir, data_dir=data_dir,
                             log=_log, train=train)
        perms = load_schedule(schedule, ev.rows)[0] if schedule is not None else None
        res = run_eval(ev, repeats=s.repeats, error_seed=s.error_seed, perms=perms)
        if as_json:
            typer.echo(json.dumps(res))
            continue
        typer.echo(f"{s.describe()} | {res['images']} images | path {res['path']}")
        if res["arithmetic"] != "fp32":
            typer.echo(f"fp32 reference  {res['reference_accuracy']:.4f}")
        typer.echo(f"clean {res['metric']:9s} {res['clean_accuracy']:.4f}")
        typer.echo(f"faulty {res['metric']:8s} {res['accuracy_mean']:.4f} +- "
                   f"{res['accuracy_std']:.4f} over {res['repeats']} repeat(s)"
                   + (" (with schedule)" if perms else ""))


@app.command()
@scenario_options(sweep=True, exclude=("error_seed",))
def sensitivity(
    scn: dict,
    out: Annotated[Path, typer.Option("--out", help="Campaign folder (resumed if it exists).")],
    workers: Annotated[int, typer.Option(help="CPU worker processes.")] = 1,
    executor: ExecutorOpt = "local",
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    report: Annotated[bool, typer.Option(help="Write figures and report.md at the end.")] = True,
    train: TrainOpt = False,
) -> None:
    """Fault-sensitivity campaign (paper 5.1): a grid of seeds x layer groups x faults x
    FR_max x profile seeds; the other scenario options apply to every cell."""
    from hasched.study.campaign import CampaignConfig, run_campaign

    runner = None if executor == "local" else executor_from(executor, workers)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    swept = ("seed", "layers", "fault", "fr_max", "profile_seed", "images", "repeats")
    base = scenario_from({k: v for k, v in scn.items() if k not in swept})
    images = scn["images"]
    cfg = CampaignConfig.from_args(base.model, scn["seed"], scn["layers"], scn["fault"],
                                   scn["fr_max"], scn["profile_seed"], scn["repeats"],
                                   None if images == "all" else images, device, base=base)
    res = run_campaign(cfg, out, workers=workers, models_dir=models_dir, data_dir=data_dir,
                       log=_log, train=train, executor=runner)
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
@scenario_options(exclude=("images",))
def search(
    scn: dict,
    out: Annotated[Path, typer.Option(help="Output folder (resumed if it holds this run).")],
    algorithm: AlgorithmOpt = "ga",
    option: OptionOpt = None,
    population: Annotated[int, typer.Option(
        help="Budget: GA/CMA population (random search: batch).")] = 20,
    generations: Annotated[int, typer.Option(
        help="Budget: generations (random search and CMA-ES get population x "
        "(generations + 1) evaluations; criticality ignores the budget).")] = 100,
    runs: Annotated[int, typer.Option(help="Independent runs; the best is kept.")] = 3,
    search_images: Annotated[str, typer.Option(help="Fitness images (A:B).")] = "5120:",
    holdout_images: Annotated[str, typer.Option(help="Held-out images (disjoint).")] = ":5120",
    holdout_repeats: Annotated[int, typer.Option(help="Held-out error instances.")] = 10,
    search_seed: Annotated[int, typer.Option(help="Run i is seeded search_seed + i.")] = 0,
    plan_profile: Annotated[Path | None, typer.Option(
        help="Profile model-aware searchers plan with (e.g. from `hasched diagnose`); "
        "fitness and held-out accuracy still run on the scenario's faults.")] = None,
    random_baseline: Annotated[bool, typer.Option(
        help="Also run random search at the same budget.")] = True,
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    train: TrainOpt = False,
) -> None:
    """Search a fault-aware schedule for one layer group (c0, or h2+op jointly) with any
    searcher and evaluate it on held-out images. --repeats: error instances per fitness
    evaluation."""
    from hasched.study.schedule_search import SearchSettings, run_has_search

    if "," in scn["layers"]:
        raise HaschedError(f"search takes one layer group; join layers with + to search them "
                           f"jointly (got --layers {scn['layers']})")
    s = SearchSettings(scenario=scenario_from(scn).validate(), algorithm=algorithm,
                       options=parse_options(option), population=population,
                       generations=generations, runs=runs, search_images=search_images,
                       holdout_images=holdout_images, holdout_repeats=holdout_repeats,
                       search_seed=search_seed, device=device, random_baseline=random_baseline,
                       plan_profile=str(plan_profile) if plan_profile else None)
    res = run_has_search(out, s, models_dir=models_dir, data_dir=data_dir, log=_log,
                         train=train)
    r = res["results"]
    rnd = f" | random {r['random']['mean']:.4f}" if r["random"] else ""
    typer.echo(f"held-out accuracy ({r['has']['images']} images, {r['has']['repeats']} "
               f"repeats): clean {r['clean']['mean']:.4f} | degraded (identity) "
               f"{r['identity']['mean']:.4f} | {algorithm} {r['has']['mean']:.4f}{rnd}; "
               f"{sum(res['search']['evaluations'])} evaluations")
    typer.echo(f"report: {Path(out) / 'summary.md'}")


_CASE_FIELDS = ("model", "seed", "torchvision", "module", "checkpoint", "num_classes",
                "dataset", "layers", "fault", "fr_max", "profile_seed", "images", "error_seed")


@app.command()
@scenario_options(exclude=_CASE_FIELDS)
def reproduce(
    scn: dict,
    out: Annotated[Path, typer.Option(help="Output folder (finished cases are skipped).")],
    quick: Annotated[bool, typer.Option(
        help="Reduced plan: the 12 mnist32-cnn cases, small GA (~15 min on 2 cores).")] = False,
    algorithm: AlgorithmOpt = "ga",
    option: OptionOpt = None,
    workers: Annotated[int, typer.Option(help="Searches run at once (worker processes).")] = 1,
    executor: ExecutorOpt = "local",
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    train: TrainOpt = False,
) -> None:
    """Run the paper's §5.2 recovery cases and write REPORT.md. The cases set model, seeds,
    layers, fault and FR_max; the other scenario options apply to every case."""
    from hasched.study.reproduce import run_reproduce

    runner = executor_from(executor, workers)
    base = scenario_from(scn).validate()
    options = parse_options(option)
    run_reproduce(out, quick, device=device, models_dir=models_dir, data_dir=data_dir, log=_log,
                  train=train, base=base, algorithm=algorithm, options=options,
                  executor=runner)
    suffix = "" if algorithm == "ga" and not options else f"-{algorithm}"
    typer.echo(f"report: {Path(out) / f'REPORT{suffix}.md'}")


@app.command()
@scenario_options(exclude=("model", "seed", "torchvision", "module", "checkpoint",
                           "num_classes", "dataset", "images"))
def bench(
    scn: dict,
    device: DeviceOpt = "cpu",
    filter: Annotated[str, typer.Option(help="Only entries whose name contains this.")] = "",
    model: ModelOpt = "mnist32-cnn",
    images: Annotated[str, typer.Option(help="Test-image range timed.")] = "5120:",
    trials: Annotated[int, typer.Option(help="Timed runs per entry (median).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    markdown: Annotated[Path | None, typer.Option(help="Also write a markdown table.")] = None,
) -> None:
    """Time clean vs faulty inference, GA fitness and generations, int8/LUT arithmetic and
    chips (ratios to clean). Scenario options other than the defaults add an entry for
    that scenario."""
    from hasched.io import atomic_write, check_out_file, make_dirs
    from hasched.study.bench import BenchConfig, is_bench_markdown, run_bench, to_markdown
    from hasched.study.scenario import Scenario

    if markdown is not None:  # checked before the (minutes of) timing, rewritten if ours
        check_out_file(markdown, option="--markdown", ours=is_bench_markdown)
    custom = scenario_from({**scn, "model": model}).validate()
    default = Scenario(model=model)
    cfg = BenchConfig(model=model, images=images, device=device, filter=filter, trials=trials,
                      custom=None if custom == default else custom)
    rows = run_bench(cfg, log=None if as_json else _log)
    if markdown is not None:
        make_dirs(markdown.parent)
        atomic_write(markdown, to_markdown(rows))
    typer.echo(json.dumps(rows, indent=1) if as_json else to_markdown(rows))


# The searcher `make demo` runs: the best in this project's measurements (README).
DEMO_SEARCHER = "criticality"


@app.command()
@scenario_options(exclude=("model", "seed", "torchvision", "module", "checkpoint",
                           "num_classes", "dataset", "images"))
def demo(
    scn: dict,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    generations: Annotated[int, typer.Option(help="GA generations (GA-based searchers).")
                           ] = 20,
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
    from hasched.io import claim_out_dir
    from hasched.study.schedule_search import SearchSettings, check_demo_dir, prepare_search

    if "," in scn["layers"]:
        raise HaschedError("demo takes one layer group (join layers with +)")
    s0 = scenario_from({**scn, "model": "mnist32-cnn", "seed": 1}).validate()
    s = SearchSettings(scenario=s0, algorithm=DEMO_SEARCHER, generations=generations, runs=1,
                       search_images=search_images, holdout_images=holdout_images,
                       device=device)
    if train_epochs < 1:
        raise HaschedError(f"--train-epochs must be >= 1, got {train_epochs}")
    check_demo_dir(out, s)
    models_dir = models_dir or out / "models"
    prepare_search(s, models_dir, data_dir, train=True)  # every check before any training
    with claim_out_dir(out, {"hasched": "demo"}, lock=False):
        _demo(out, s, train_epochs, models_dir, data_dir)


def _demo(out: Path, s, train_epochs: int, models_dir: Path, data_dir: Path | None) -> None:
    from hasched.study.build import build_evaluator
    from hasched.study.build import evaluate as run_eval
    from hasched.study.schedule_search import demo_search_dir, run_has_search
    from hasched.zoo.train import load_or_train

    s0 = s.scenario
    typer.echo(f"1/3 model: mnist32-cnn seed 1 (store {models_dir}; trained for "
               f"{train_epochs} epochs on first use, then cached)")
    _, meta = load_or_train("mnist32-cnn", 1, models_dir=models_dir, data_dir=data_dir,
                            log=_log, epochs=train_epochs, train=True)
    typer.echo(f"    test accuracy {meta['test_accuracy']:.4f} ({meta['epochs']} epochs)")
    ev = build_evaluator(s0.replace(images=s.holdout_images), device=s.device,
                         models_dir=models_dir, data_dir=data_dir, log=_log)
    res = run_eval(ev, repeats=s0.repeats, error_seed=s0.error_seed)
    typer.echo(f"2/3 on a faulty accelerator ({s0.describe()}): accuracy "
               f"{res['clean_accuracy']:.4f} clean -> {res['accuracy_mean']:.4f} "
               f"+- {res['accuracy_std']:.4f}")
    typer.echo(f"3/3 schedule search: {s.algorithm} (probe every row alone, give the most "
               f"critical rows the most reliable PEs); fitness on images {s.search_images}, "
               f"held-out {s.holdout_images}")
    sdir = demo_search_dir(out, s)
    summ = run_has_search(sdir, s, models_dir=models_dir, data_dir=data_dir, log=_log)
    r = summ["results"]
    evals = sum(summ["search"]["evaluations"])
    typer.echo(f"held-out accuracy ({r['has']['images']} images, {r['has']['repeats']} repeats):")
    for key, label in (("clean", "clean"), ("identity", "degraded (no schedule)"),
                       ("has", f"recovered ({s.algorithm}, {evals} evaluations)"),
                       ("random", "random search, same budget")):
        lo, hi = r[key]["ci95"]
        typer.echo(f"  {label:36s} {r[key]['mean']:.4f}  [95% CI {lo:.4f}, {hi:.4f}]")
    typer.echo(f"report: {sdir / 'summary.md'}  figures: {sdir / 'recovery.png'}, "
               f"{sdir / 'convergence.png'}")


app.command()(compare)
app.command()(export)
app.command()(diagnose)
# Each study's commands live in their own module (they register on `app` when imported).
from hasched import cli_faltune, cli_reduce, cli_reuse  # noqa: E402,F401

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
