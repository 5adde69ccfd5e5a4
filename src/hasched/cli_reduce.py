"""``hasched resilience``, ``hasched retrain`` and ``hasched reduce-report``: the Reduce
study (per-chip fault-aware retraining, the amount chosen from a resilience map).

Parsing only; the work is in :mod:`hasched.study.resilience`, :mod:`hasched.study.retrain`
and :mod:`hasched.report.reduce`.

(No ``from __future__ import annotations`` here: Typer reads these annotations as objects.)
"""

import typing
from pathlib import Path
from typing import Annotated

import typer

from hasched.cli import DataDirOpt, DeviceOpt, ModelsDirOpt, TrainOpt, _log, app
from hasched.cli_options import scenario_from, scenario_options
from hasched.errors import HaschedError

# The scenario options that do not apply: FAP bypasses the faulty PEs, so the pruned model
# runs fault-free in fp32 (no fault model, profile, arithmetic or repeats).
_NOT_FAP = ("n_sms", "arithmetic", "multiplier", "fault", "fr_max", "profile_seed", "profile",
            "faulty_pes", "chip_seed", "chip", "repeats", "metric", "error_seed")
_DEFAULTS = {"layers": "all", "mapping": "systolic:16x16", "images": ":2000"}

TrainImagesOpt = Annotated[str, typer.Option(
    "--train-images", help="Training images FAP+T fine-tunes on (a range).")]
ValImagesOpt = Annotated[str, typer.Option(
    "--val-images", help="Test images for decisions (the map, Reduce's verification); "
    "disjoint from --images, on which yield is reported, and as hard (see the README).")]
LrOpt = Annotated[typing.Optional[float], typer.Option(  # noqa: UP045 - Typer needs Optional
    "--lr", help="Fine-tuning learning rate (default: the model's training recipe's).")]
BatchOpt = Annotated[typing.Optional[int], typer.Option(  # noqa: UP045
    "--batch-size", help="Fine-tuning mini-batch (default: the recipe's).")]
TrainSeedOpt = Annotated[int, typer.Option(
    "--train-seed", help="Seed of FAP+T (mini-batch order, dropout; per chip derived).")]


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise HaschedError(f"{option} must be comma-separated numbers, got {text!r}") from None


def _study(scn: dict, train_images: str, val_images: str, lr, batch_size, train_seed: int):
    from hasched.study.fap_study import FapStudy
    from hasched.study.fapt import FineTune

    text = scn["layers"].strip()
    if "," in text or text == "each":
        raise HaschedError(f"--layers is one group of layers on the array (all, or c0+h0), "
                           f"got {text!r}")
    s = scenario_from(scn, layers=("?",))
    study = FapStudy(model=s.model, seed=s.seed, checkpoint=s.checkpoint,
                     num_classes=s.num_classes, dataset=s.dataset,
                     layers="all" if text == "all" else tuple(text.split("+")),
                     mapping=s.mapping, k_order=s.k_order,
                     fine_tune=FineTune(train_images, lr, batch_size, train_seed),
                     val_images=val_images, images=scn["images"] or ":2000")
    return study.validate()


def _loader(study, device, models_dir, data_dir, train):
    from hasched.study.fap_study import load_context

    return lambda: load_context(study, device=device, models_dir=models_dir,
                                data_dir=data_dir, train=train, log=_log)


@app.command()
@scenario_options(exclude=_NOT_FAP, defaults=_DEFAULTS)
def resilience(
    scn: dict,
    out: Annotated[Path, typer.Option(help="Output folder (resumed if it holds this map).")],
    fault_rates: Annotated[str, typer.Option(
        "--fault-rates", help="Faulty-PE rates f, ascending.")] = "0,0.02,0.05,0.1,0.2,0.3",
    epochs: Annotated[str, typer.Option(
        help="Amounts e of FAP+T, ascending from 0 (fractions: a share of an epoch's "
        "mini-batches).")] = "0,0.1,0.25,0.5,1,2",
    maps: Annotated[int, typer.Option(help="Chips sampled per rate (K).")] = 4,
    map_seed: Annotated[int, typer.Option(
        "--map-seed", help="Base seed of the sampled chips.")] = 1000,
    train_images: TrainImagesOpt = ":10000",
    val_images: ValImagesOpt = "8000:10000",
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    train_seed: TrainSeedOpt = 0,
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    train: TrainOpt = False,
) -> None:
    """Resilience map R[f, e]: accuracy after e epochs of fault-aware retraining (FAP+T) on
    chips with a share f of faulty PEs (mean, worst, 95 % CI over --maps chips)."""
    from hasched.report.reduce import plot_resilience
    from hasched.study.resilience import TABLE_NAME, ResilienceConfig, run_resilience

    study = _study(scn, train_images, val_images, lr, batch_size, train_seed)
    cfg = ResilienceConfig(study, _floats(fault_rates, "--fault-rates"),
                           _floats(epochs, "--epochs"), maps, map_seed).validate()
    summary = run_resilience(cfg, out, _loader(study, device, models_dir, data_dir, train),
                             log=_log)
    figs = plot_resilience(summary, out, f"{study.model} on {cfg.identity()['study']['mapping']}")
    clean = summary["clean"]["val"]
    typer.echo(f"clean validation accuracy {100 * clean:.2f} %; worst-chip drop (points):")
    typer.echo("  f \\ e " + "".join(f"{e:>8g}" for e in cfg.epochs))
    for f, row in zip(cfg.rates, summary["val_worst"], strict=True):
        typer.echo(f"  {100 * f:5g} %" + "".join(f"{100 * (clean - v):8.2f}" for v in row))
    typer.echo(f"table: {Path(out) / TABLE_NAME}  figures: {', '.join(map(str, figs))}")


def _policies(text: str):
    from hasched.study.retrain import Policy

    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        kind, _, amount = item.partition(":")
        try:
            out.append(Policy(kind, float(amount) if amount else None))
        except ValueError:
            raise HaschedError(f"--policy {item!r}: fixed:E takes a number of epochs") from None
    return tuple(out)


def _options(items: list[str]) -> dict | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise HaschedError(f"--remap-option takes KEY=VALUE, got {item!r}")
        val = val.strip()
        out[key.strip()] = {"true": True, "false": False}.get(val.lower(), _number(val))
    return out


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@app.command()
@scenario_options(exclude=_NOT_FAP, defaults=_DEFAULTS)
def retrain(
    scn: dict,
    chips: Annotated[Path, typer.Option(help="Folder of chip maps (hasched chips).")],
    out: Annotated[Path, typer.Option(help="Output folder (resumed if it holds this run).")],
    policy: Annotated[str, typer.Option(
        help="Comma-separated: none (FAP only) | fixed:E (every chip E epochs) | fixed (one "
        "per amount of the map) | reduce (amount from the chip's faulty-PE rate) | "
        "reduce-crit (from its FAP-only accuracy) | remap (rows moved, no retraining).")
    ] = "none,fixed,reduce,reduce-crit,remap",
    max_drop: Annotated[float, typer.Option(
        "--max-drop", help="Allowed accuracy drop from clean, in points.")] = 1.0,
    verify_margin: Annotated[float, typer.Option(
        "--verify-margin", help="Points reduce/reduce-crit keep in hand on the validation "
        "images (they aim at --max-drop minus this); yield is judged at --max-drop.")] = 0.0,
    resilience: Annotated[typing.Optional[Path], typer.Option(  # noqa: UP045
        help="Resilience map folder (hasched resilience); needed by reduce and fixed.")
    ] = None,
    remap_searcher: Annotated[str, typer.Option(
        "--remap-searcher", help="Registered searcher for remap (hasched list).")] = "ga",
    remap_option: Annotated[typing.Optional[list[str]], typer.Option(  # noqa: UP045
        "--remap-option", help="Searcher setting KEY=VALUE (repeat; default for ga: "
        "population=8, generations=5).")] = None,
    remap_images: Annotated[int, typer.Option(
        "--remap-images", help="Validation images that score a remap schedule.")] = 256,
    train_images: TrainImagesOpt = ":10000",
    val_images: ValImagesOpt = "8000:10000",
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    train_seed: TrainSeedOpt = 0,
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    train: TrainOpt = False,
) -> None:
    """Per-chip fault-aware pruning (FAP) and retraining (FAP+T) under each policy; costs
    (epochs, wall time) and yield (share of chips within --max-drop of clean)."""
    from hasched.study.fap_study import load_chip_dir
    from hasched.study.resilience import ResilienceMap
    from hasched.study.retrain import RetrainConfig, run_retrain

    study = _study(scn, train_images, val_images, lr, batch_size, train_seed)
    mp = study.scenario().mapping_obj()
    rmap = ResilienceMap.load(resilience) if resilience is not None else None
    cfg = RetrainConfig(study, _policies(policy), tuple(load_chip_dir(chips, mp.pe_shape,
                                                                      mp.spec())),
                        max_drop, rmap, remap_searcher, _options(remap_option or []),
                        remap_images, verify_margin=verify_margin).validate()
    if any(p.kind == "remap" for p in cfg.policies):
        from hasched.search import create_searcher

        create_searcher(remap_searcher, cfg.remap_config)  # a bad searcher fails now
    s = run_retrain(cfg, out, _loader(study, device, models_dir, data_dir, train), log=_log)
    typer.echo(f"{len(cfg.chips)} chips, clean test accuracy {100 * s['clean']['test']:.2f} %,"
               f" constraint: drop <= {max_drop:g} pt")
    for name, p in s["policies"].items():
        typer.echo(f"  {name:10s} yield {100 * p['yield']:5.1f} %  epochs "
                   f"{p['total_epochs']:8.2f}  wall {p['total_seconds'] / 60:7.2f} min  "
                   f"worst drop {p['worst_drop']:.2f} pt")
    typer.echo(f"table: {Path(out) / 'retrain.csv'}")


@app.command("reduce-report")
def reduce_report(
    resilience_dir: Annotated[Path, typer.Argument(help="Resilience map folder.")],
    retrain_dir: Annotated[Path, typer.Argument(help="Retrain folder.")],
    out: Annotated[typing.Optional[Path], typer.Option(  # noqa: UP045
        help="Where cost_vs_yield.png and reduce.md go (default: the retrain folder).")
    ] = None,
) -> None:
    """The cost-vs-yield plot of none / fixed / reduce / remap and a markdown table."""
    from hasched.io import make_dirs
    from hasched.report.reduce import write_reduce_report

    if out is not None:
        make_dirs(out)
    res = write_reduce_report(resilience_dir, retrain_dir, out)
    verdict = res["acceptance"]
    for variant in ("reduce", "reduce-crit"):
        if variant in verdict:
            v = verdict[variant]
            same = v.get("fixed_same_yield")
            typer.echo(f"{variant}: yield {100 * v['yield']:.1f} %, {v['epochs']:.2f} epochs"
                       + (f" = {100 * v['epoch_ratio']:.0f} % of {same['policy']} (same "
                          "yield)" if same else "")
                       + f"; acceptance {'met' if v['passed'] else 'NOT met'}")
    typer.echo(f"figure: {res['figure']}  report: {res['report']}")
