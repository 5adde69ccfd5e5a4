"""CLI of the computation-reuse study (Mquans): ``frames``, ``criticality``, ``reuse``.

Parses the options and calls :mod:`hasched.study.frames`, :mod:`hasched.study.criticality`
and :mod:`hasched.study.reuse`; nothing else happens here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from hasched.cli import DataDirOpt, ModelsDirOpt, SeedOpt, TrainOpt, _log, app
from hasched.errors import HaschedError

TorchvisionOpt = Annotated[str | None, typer.Option(
    help="A torchvision model instead of --model (bundled: resnet18, mobilenet_v3_small).")]
ModuleOpt = Annotated[str | None, typer.Option(
    help="PKG.MODULE:FUNCTION returning an nn.Module, instead of --model.")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    help="Weights file (.safetensors/.pt) instead of the store.")]
NumClassesOpt = Annotated[int | None, typer.Option(help="Outputs of a torchvision/module model.")]
DatasetOpt = Annotated[str | None, typer.Option(
    help="mnist, mnist32 or fashion-mnist (torchvision/module models).")]
LayersOpt = Annotated[str, typer.Option(
    help="Layers: all (every Linear/Conv layer) or a comma-separated list, e.g. c0,h0.")]
ReuseModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Registered model (default mnist32-cnn).")]


def parse_motion(text: str, max_offset: int):
    """``1px`` | ``2px,rot=10,noise=3`` -> :class:`~hasched.zoo.frames.Motion`."""
    from hasched.zoo.frames import Motion

    parts = [p.strip() for p in text.split(",") if p.strip()]
    m = re.fullmatch(r"(\d+)px", parts[0]) if parts else None
    if m is None:
        raise HaschedError(f"--motion must start with the speed, e.g. 1px or 2px,rot=10,"
                           f"noise=3; got {text!r}")
    extra = {"rot": 0.0, "noise": 0.0}
    for p in parts[1:]:
        key, _, val = p.partition("=")
        if key not in extra:
            raise HaschedError(f"--motion: unknown part {p!r} (use rot=DEGREES, noise=LEVELS)")
        try:
            extra[key] = float(val)
        except ValueError:
            raise HaschedError(f"--motion: {key} needs a number, got {val!r}") from None
    return Motion(int(m.group(1)), max_offset, extra["rot"], extra["noise"])


def parse_perturbation(text: str):
    """``quant:2`` | ``noise:0.1`` | ``FAULT[:k=v,...][,rate=R]`` -> a Perturbation."""
    from hasched.reuse.criticality import Perturbation
    from hasched.study.scenario import parse_fault

    kind, _, arg = text.partition(":")
    try:
        if kind == "quant":
            return Perturbation("quant", bits=int(arg or 2))
        if kind == "noise":
            return Perturbation("noise", sigma=float(arg or 0.1))
    except ValueError:
        raise HaschedError(f"--perturb {text!r}: quant takes bits (quant:2), noise a "
                           "share of the range (noise:0.1)") from None
    name, params = parse_fault(text)
    params = dict(params)
    try:
        rate = float(params.pop("rate", 1.0))
    except (TypeError, ValueError):
        raise HaschedError(f"--perturb {text!r}: rate must be a number in (0, 1]") from None
    return Perturbation("fault", fault=name, params=tuple(sorted(params.items())), rate=rate)


def parse_bits(bits: str, budget: str):
    """``uniform:4``, ``uniform:2-8``, ``mquans`` (comma-separated) -> BitSettings."""
    from hasched.study.reuse import BitSetting

    try:
        budgets = [float(b) for b in budget.split(",") if b.strip()]
    except ValueError:
        raise HaschedError(f"--budget must be numbers (points), got {budget!r}") from None
    out = []
    for part in (p.strip() for p in bits.split(",") if p.strip()):
        m = re.fullmatch(r"uniform:(\d+)(?:-(\d+))?", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if lo > hi:
                raise HaschedError(f"--bits {part}: the range must go up")
            out += [BitSetting("uniform", bits=b) for b in range(lo, hi + 1)]
        elif part == "mquans":
            if not budgets:
                raise HaschedError("mquans needs --budget (accuracy points)")
            out += [BitSetting("mquans", budget=b) for b in budgets]
        else:
            raise HaschedError(f"--bits: use uniform:B, uniform:A-B or mquans, got {part!r}")
    if not out:
        raise HaschedError("--bits is empty")
    return tuple(out)


def _ref_and_layers(model, torchvision, module, checkpoint, num_classes, dataset, layers):
    from hasched.reuse.quant import check_layers
    from hasched.sim.layers import weight_layer_names
    from hasched.zoo.ref import ModelRef, build_model

    ref = ModelRef.from_options(model, torchvision, module, checkpoint, num_classes, dataset,
                                default_model="mnist32-cnn")
    net = build_model(ref, 0)
    names = weight_layer_names(net) if layers.strip() == "all" else [
        n.strip() for n in layers.split(",") if n.strip()]
    return ref, tuple(check_layers(net, names))


@app.command()
def frames(
    out: Annotated[Path, typer.Option(help="New folder for frames.hsf, strip.png, "
                                      "preview.gif.")],
    dataset: Annotated[str, typer.Option(help="mnist32, mnist or fashion-mnist.")] = "mnist32",
    split: Annotated[str, typer.Option(help="Source images: test or train.")] = "test",
    images: Annotated[str | None, typer.Option(
        help="Source images from this range of the split only (N, A:B, A: or :B), e.g. "
        ":5000 for evaluation frames and 5000: for calibration frames.")] = None,
    exclude: Annotated[Path | None, typer.Option(
        help="Frames folder or file whose source images are not used (calibration frames "
        "held out from the evaluation frames).")] = None,
    sequences: Annotated[int, typer.Option(help="Number of sequences.")] = 200,
    length: Annotated[int, typer.Option(help="Frames per sequence.")] = 30,
    motion: Annotated[str, typer.Option(
        help="Speed (px per frame and axis), optional rotation (degrees) and noise (grey "
        "levels): 1px | 2px,rot=10,noise=3.")] = "1px",
    max_offset: Annotated[int, typer.Option(
        help="Bounce bound of the offset, px (the paper models are not shift-invariant: "
        "mnist32-cnn is 94 % accurate at 1, 55 % at 4).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of every draw.")] = 1,
    gif: Annotated[bool, typer.Option(help="Also write preview.gif.")] = True,
    data_dir: DataDirOpt = None,
) -> None:
    """Generate moving-object sequences from a dataset (deterministic from the seed)."""
    from hasched.study.frames import write_frames

    res = write_frames(out, dataset, sequences, length, parse_motion(motion, max_offset), seed,
                       split=split, images=images, exclude=exclude, data_dir=data_dir,
                       gif=gif, log=_log)
    typer.echo(f"wrote {res['file']}: {sequences} sequences x {length} frames "
               f"{res['shape'][2]}x{res['shape'][3]}; {100 * res['pixels_changed']:.1f} % of "
               f"pixels change between consecutive frames")


@app.command()
def criticality(
    out: Annotated[Path, typer.Option(help="Output folder (resumed if it holds this run).")],
    model: ReuseModelOpt = None,
    torchvision: TorchvisionOpt = None,
    module: ModuleOpt = None,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    dataset: DatasetOpt = None,
    seed: SeedOpt = 1,
    per: Annotated[str, typer.Option(help="neuron (one score each) or layer.")] = "neuron",
    layers: LayersOpt = "all",
    perturb: Annotated[str, typer.Option(
        help="quant:BITS (the neuron alone quantised) | noise:SIGMA (share of the range) | "
        "a transient fault model, e.g. bitflip:high_bit=30,rate=0.1.")] = "quant:2",
    images: Annotated[int, typer.Option(help="Training images the scores use.")] = 512,
    calibration_images: Annotated[int, typer.Option(
        help="Training images for the quantiser ranges.")] = 512,
    cell_neurons: Annotated[int, typer.Option(help="Neurons per resumable cell.")] = 512,
    population: Annotated[int, typer.Option(help="Neurons per forward pass.")] = 64,
    error_seed: Annotated[int, typer.Option(help="Seed of random perturbations.")] = 0,
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    train: TrainOpt = False,
) -> None:
    """Each neuron's criticality: the output change when its input value is perturbed."""
    from hasched.study.criticality import CriticalitySettings, run_criticality

    ref, names = _ref_and_layers(model, torchvision, module, checkpoint, num_classes, dataset,
                                 layers)
    s = CriticalitySettings(model=ref.to_dict(), seed=seed, layers=names, per=per,
                            perturbation=parse_perturbation(perturb), images=images,
                            calibration_images=calibration_images, cell_neurons=cell_neurons,
                            population=population, error_seed=error_seed)
    res = run_criticality(out, s, models_dir=models_dir, data_dir=data_dir, train=train,
                          log=_log)
    typer.echo(f"{res['rows']} rows -> {res['table']}; figure {res['figure']}")


@app.command()
def reuse(
    out: Annotated[Path, typer.Option(help="Output folder (resumed if it holds this run).")],
    frames: Annotated[Path, typer.Option(help="Frames folder or file (hasched frames).")],
    model: ReuseModelOpt = None,
    torchvision: TorchvisionOpt = None,
    module: ModuleOpt = None,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    dataset: DatasetOpt = None,
    seed: SeedOpt = 1,
    bits: Annotated[str, typer.Option(
        help="uniform:B | uniform:A-B | mquans, comma-separated.")] = "uniform:2-8,mquans",
    budget: Annotated[str, typer.Option(
        help="Mquans accuracy-drop budget(s) in points on the calibration frames.")] = "0.5",
    criticality: Annotated[Path | None, typer.Option(
        help="Criticality folder (hasched criticality --per neuron), for mquans.")] = None,
    layers: LayersOpt = "all",
    calib_sequences: Annotated[int, typer.Option(
        help="Leading sequences used for calibration (the rest are evaluated).")] = 50,
    calib_frames: Annotated[Path | None, typer.Option(
        help="Frames folder or file for calibration instead, made like --frames from "
        "held-out images (hasched frames --exclude FRAMES_DIR ...); then every sequence of "
        "--frames is evaluated.")] = None,
    refresh: Annotated[int, typer.Option(
        help="A dense frame every N frames (0: only the first).")] = 0,
    kernel: Annotated[str, typer.Option(
        help="Delta products: sparse (only changed inputs) or dense.")] = "sparse",
    rank: Annotated[str, typer.Option(
        help="Mquans' ranking: per-mac (criticality per MAC the neuron feeds) or "
        "criticality (the score alone).")] = "per-mac",
    bits_min: Annotated[int, typer.Option(help="Fewest bits Mquans gives.")] = 2,
    bits_max: Annotated[int, typer.Option(help="Most bits (Mquans' start).")] = 8,
    calibration_images: Annotated[int, typer.Option(
        help="Training images for the quantiser ranges.")] = 512,
    models_dir: ModelsDirOpt = None,
    data_dir: DataDirOpt = None,
    train: TrainOpt = False,
) -> None:
    """Computation reuse on frame sequences: reuse rate, MACs, wall-clock and accuracy of
    uniform bits and Mquans; the Pareto figure."""
    from hasched.study.reuse import ReuseSettings, run_reuse

    ref, names = _ref_and_layers(model, torchvision, module, checkpoint, num_classes, dataset,
                                 layers)
    s = ReuseSettings(model=ref.to_dict(), seed=seed, frames=str(frames),
                      settings=parse_bits(bits, budget), layers=names,
                      calib_sequences=calib_sequences, refresh=refresh, kernel=kernel,
                      bits_min=bits_min, bits_max=bits_max,
                      criticality=str(criticality) if criticality else None,
                      calibration_images=calibration_images,
                      calib_frames=str(calib_frames) if calib_frames else None, rank=rank)
    summ = run_reuse(out, s, models_dir=models_dir, data_dir=data_dir, train=train, log=_log)
    for r in summ["rows"]:
        typer.echo(f"{r['setting']:12s} accuracy {100 * r['accuracy']:.2f} % (drop "
                   f"{r['drop']:+.2f}) reuse {100 * r['reuse_rate']:.1f} % MACs saved "
                   f"{100 * r['mac_savings']:.1f} % speed-up {r['speedup']:.2f}x "
                   f"(engine {r['seconds_engine']:.1f} s, fp32 {r['seconds_fp32']:.1f} s)")
    typer.echo(f"report: {Path(out) / 'summary.md'}  figure: {Path(out) / 'pareto.png'}")
