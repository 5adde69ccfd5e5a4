"""CLI of the Fal-reTune study: ``multipliers``, ``resilience-ax`` and ``retune``.

Parses options and calls :mod:`hasched.study.axres`, :mod:`hasched.study.retune` and
:mod:`hasched.report.faltune`; nothing else.

(No ``from __future__ import annotations`` here: Typer reads these annotations as objects.)
"""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hasched.cli import DataDirOpt, DeviceOpt, ModelsDirOpt, _log, app
from hasched.cli_options import parse_int_list, scenario_from, scenario_options
from hasched.errors import HaschedError

_NOT_SWEPT = ("fr_max", "profile_seed", "profile", "repeats", "error_seed")
_DEFAULTS = {"mapping": "systolic:16x16", "layers": "all", "images": "1000",
             "arithmetic": "int8"}


def _floats(text: str, what: str) -> tuple:
    try:
        out = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise HaschedError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not out:
        raise HaschedError(f"--{what} is empty")
    return out


def _names(text: str) -> tuple:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _one_group(scn: dict) -> tuple:
    """The layer group (one; ``all`` by default) as a tuple of names."""
    from hasched.study.build import model_layer_names
    from hasched.study.scenario import parse_layer_groups

    carrier = scenario_from(scn, layers=("?",))
    groups = parse_layer_groups(scn["layers"], model_layer_names(carrier))
    if len(groups) != 1:
        raise HaschedError("give one layer group (join layers with +, or all)")
    return groups[0]


@app.command("multipliers")
def multipliers_cmd(
    lut: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045 - Typer needs Optional
        "--lut", help="Also load FILE[,signed|unsigned] (256x256 .npy, or raw .bin of "
        "65,536 uint16/int32 entries); repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """The bundled 8x8 multipliers and any LUT you load, with exhaustive MAE, WCE, MRE and
    error probability over all 65,536 operand pairs."""
    from hasched.sim.multipliers import MULTIPLIERS, create_multiplier

    mults = [(create_multiplier(n), MULTIPLIERS.doc(n)) for n in MULTIPLIERS.names()]
    mults += [(create_multiplier(f"lut:{spec}"), f"from {spec}") for spec in lut or []]
    rows = [{**m.describe(), "description": doc} for m, doc in mults]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"{'multiplier':22s} {'MAE':>9s} {'WCE':>6s} {'MRE':>7s} {'EP':>6s}  description")
    for r in rows:
        typer.echo(f"{r['name']:22s} {r['mae']:9.2f} {r['wce']:6d} {r['mre']:7.4f} "
                   f"{r['error_probability']:6.3f}  {r['description']}")
    typer.echo("(over all unsigned 8x8 operand pairs, signed tables over two's-complement "
               "bytes; energy figures are not given: no cited table covers these designs)")


@app.command("resilience-ax")
@scenario_options(exclude=(*_NOT_SWEPT, "multiplier", "chip"), defaults={
    **_DEFAULTS, "fault": "stuck-at"}, override=("chip_seed", "faulty_pes"))
def resilience_ax(
    scn: dict,
    out: Annotated[Path, typer.Option(help="Grid folder (resumed if it holds this grid).")],
    multipliers: Annotated[str, typer.Option(
        help="Multipliers; exact (the AccDNN) is always added.")] = "exact,trunc4,drum4,mitchell",
    sites: Annotated[str, typer.Option(help="product and/or accumulator.")] =
        "product,accumulator",
    bits: Annotated[str, typer.Option(help="Stuck bits 0-15, or all.")] = "2,6,10,14",
    values: Annotated[str, typer.Option(help="Stuck values: 0, 1 or 0,1.")] = "0,1",
    faulty_pes: Annotated[str, typer.Option(
        "--faulty-pes", help="Fractions of faulty PEs, e.g. 0.01,0.1,0.5.")] = "0.1",
    chips: Annotated[int, typer.Option(help="Chips per fraction (CIs are over chips).")] = 3,
    chip_seed: Annotated[int, typer.Option("--chip-seed", help="First chip seed.")] = 1,
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """AxDNN vs AccDNN under the same permanent faults: multiplier x faulty bit x stuck
    value x faulty-PE fraction x chip, accuracy against the same fault on the exact
    multiplier; heatmaps, a table and the headline."""
    from hasched.report.faltune import headline, write_axres_report
    from hasched.study.axres import AxResSettings, run_axres, summarize_axres
    from hasched.study.scenario import parse_fault

    name, params = parse_fault(scn["fault"])
    if name != "stuck-at" or params:
        raise HaschedError("resilience-ax sweeps stuck-at faults: give --fault stuck-at "
                           "(bits, values and sites come from --bits/--values/--sites)")
    base = scenario_from({**scn, "fault": "stuck-at"}, layers=_one_group(scn))
    s = AxResSettings(base, multipliers=_names(multipliers), sites=_names(sites),
                      bits=tuple(range(16)) if bits.strip() == "all"
                      else parse_int_list(bits, "bits"),
                      values=parse_int_list(values, "values"),
                      faulty_pes=_floats(faulty_pes, "faulty-pes"), chips=chips,
                      chip_seed=chip_seed, device=device)
    rows = run_axres(out, s, models_dir=models_dir, data_dir=data_dir, log=_log)
    summary = summarize_axres(rows)
    res = write_axres_report(out, rows, s.to_dict(), summary)
    typer.echo(headline(summary, s.chips))
    for p in summary["per_multiplier"]:
        g = p["mean_gap"]
        typer.echo(f"{p['multiplier']}: over {p['faults']} faults AxDNN loses "
                   f"{100 * p['ax_loss_mean']:.1f} points, AccDNN {100 * p['acc_loss_mean']:.1f};"
                   f" gap {100 * g['mean']:.1f} [{100 * g['ci95'][0]:.1f}, "
                   f"{100 * g['ci95'][1]:.1f}]")
    typer.echo(f"report: {res['report']}")


@app.command()
@scenario_options(exclude=_NOT_SWEPT, defaults={
    **_DEFAULTS, "multiplier": "drum4", "fault": "stuck-at:site=product"},
    override=("chip", "chip_seed", "faulty_pes"))  # lists of shares and of chip files
def retune(
    scn: dict,
    out: Annotated[Path, typer.Option(help="Output folder (resumed if it holds this run).")],
    method: Annotated[str, typer.Option(
        "--method", help="retune | retune+bias | prune | remap | finetune, or a comma list "
        "(all four by default); none and the exact multiplier are always measured.")] =
        "retune,prune,remap,finetune",
    chip: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045
        "--chip", help="Chip-map file (hasched chips); repeatable. Without it, --chips chips "
        "per --faulty-pes fraction are sampled from --fault.")] = None,
    faulty_pes: Annotated[str, typer.Option(
        "--faulty-pes", help="Fractions of faulty PEs of sampled chips.")] = "0.1",
    chips: Annotated[int, typer.Option(help="Sampled chips per fraction.")] = 3,
    chip_seed: Annotated[int, typer.Option("--chip-seed", help="First sampled chip seed.")] = 1,
    calibration_images: Annotated[int, typer.Option(
        help="First training images for int8 scales and retune's histograms.")] = 512,
    train_images: Annotated[str, typer.Option(
        help="Training images (A:B) of the fine-tunes.")] = "512:2560",
    search_images: Annotated[str, typer.Option(
        help="Training images (A:B) of the remap search's fitness.")] = "512:768",
    retune_steps: Annotated[int, typer.Option(
        help="Straight-through fine-tune steps after retune (retuned weights frozen).")] = 0,
    finetune_steps: Annotated[int, typer.Option(help="Steps of the finetune method.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Fine-tune batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Fine-tune Adam learning rate.")] = 1e-3,
    searcher: Annotated[str, typer.Option(
        help="Registered searcher for remap (hasched list).")] = "ga",
    search_config: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Searcher settings as JSON, e.g. '{\"population\": 10, \"generations\": 10}'.")
    ] = None,
    mitigation_seed: Annotated[int, typer.Option(
        help="Seed of the fine-tunes' shuffling and of the search.")] = 0,
    device: DeviceOpt = "cpu",
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Mitigate a chip's permanent faults on an approximate-multiplier accelerator:
    Fal-reTune's weight mapping, fault-aware pruning, remapping and fine-tuning, side by
    side on the same chips."""
    from hasched.mitigate.methods import MitigationSettings
    from hasched.report.faltune import retune_table, write_retune_report
    from hasched.search import create_searcher
    from hasched.study.build import check_image_spec, require_model
    from hasched.study.retune import RetuneSettings, load_chips, run_retune

    config = None
    if search_config:
        try:
            config = json.loads(search_config)
        except ValueError:
            raise HaschedError(f"--search-config is not JSON: {search_config!r}") from None
        if not isinstance(config, dict):
            raise HaschedError("--search-config must be a JSON object")
    for spec, opt in ((train_images, "--train-images"), (search_images, "--search-images")):
        check_image_spec(spec, opt)
    fracs = _floats(faulty_pes, "faulty-pes")
    base = scenario_from({**scn, "chip": None, "faulty_pes": fracs[0]},
                         layers=_one_group(scn)).validate()
    mit = MitigationSettings(retune_steps=retune_steps, finetune_steps=finetune_steps,
                             batch_size=batch_size, lr=lr, searcher=searcher,
                             search_config=config, seed=mitigation_seed)
    create_searcher(searcher, mit.search_settings())  # a bad searcher fails before any work
    s = RetuneSettings(base, chips=tuple(str(p) for p in chip or ()),
                       faulty_pes=fracs, n_chips=chips,
                       chip_seed=chip_seed, methods=_names(method),
                       calibration_images=calibration_images, train_images=train_images,
                       search_images=search_images, mitigation=mit, device=device)
    load_chips(s)  # malformed chip files: one line, before anything is loaded or written
    require_model(base, models_dir)
    summary, rows = run_retune(out, s, models_dir=models_dir, data_dir=data_dir, log=_log)
    report = write_retune_report(out, rows, s.to_dict(), summary)
    typer.echo(retune_table(summary))
    typer.echo(f"report: {report}")
