"""``hasched criticality``: every neuron's fault tolerance, as a resumable grid.

One grid cell per layer and block of neurons (:func:`hasched.study.grid.run_grid`), each
seeded from its coordinates. Outputs in the folder: ``criticality.csv`` (one row per
neuron: ``layer, kind, neuron, criticality, acc_drop, flip_rate``), ``layers.json`` (the
layers' quantiser specs), ``criticality.png`` (per layer) and ``summary.md``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hasched.errors import HaschedError
from hasched.io import atomic_write, read_json, require
from hasched.reuse.criticality import Perturbation, neuron_scores
from hasched.reuse.quant import LayerSpec, calibrate, check_layers
from hasched.seeds import derive_seed
from hasched.study.grid import GridCell, check_grid_dir, run_grid

__all__ = ["CriticalitySettings", "run_criticality", "load_criticality", "load_study_model",
           "CRITICALITY_FILE"]

CRITICALITY_FILE = "criticality.csv"
_COLUMNS = ["layer", "kind", "neuron", "criticality", "acc_drop", "flip_rate"]


@dataclass(frozen=True)
class CriticalitySettings:
    """What ``hasched criticality`` computes (the grid's identity).

    Attributes:
        model: ``ModelRef.to_dict()``. seed: Model seed.
        layers: Layer names (empty: every Linear/Conv layer).
        per: ``neuron`` (one score per neuron) or ``layer`` (the whole layer perturbed).
        perturbation: How a neuron is perturbed.
        images: Training images the scores are measured on (the first N).
        calibration_images: Training images for the quantiser ranges (the first N).
        cell_neurons: Neurons per grid cell (resume granularity).
        population: Neurons per forward pass.
        error_seed: Seed of random perturbations.
    """

    model: dict
    seed: int = 1
    layers: tuple[str, ...] = ()
    per: str = "neuron"
    perturbation: Perturbation = field(default_factory=Perturbation)
    images: int = 512
    calibration_images: int = 512
    cell_neurons: int = 512
    population: int = 64
    error_seed: int = 0

    def __post_init__(self) -> None:
        if self.per not in ("neuron", "layer"):
            raise HaschedError(f"--per must be neuron or layer, got {self.per!r}")
        if min(self.images, self.calibration_images, self.cell_neurons, self.population) < 1:
            raise HaschedError("images, calibration images, cell size and population must "
                               "be >= 1")

    def config(self) -> dict:
        return {"model": self.model, "seed": self.seed, "layers": list(self.layers),
                "per": self.per, "perturbation": self.perturbation.to_dict(),
                "images": self.images, "calibration_images": self.calibration_images,
                "cell_neurons": self.cell_neurons, "error_seed": self.error_seed}


def load_study_model(model: dict, seed: int, *, models_dir=None, data_dir=None,
                     train: bool = False, calibration_images: int = 512,
                     layers: tuple[str, ...] = (), log=None):
    """``(model, ref, layers, calibration images, labels)`` of a study (CPU, eval mode)."""
    from hasched.sim.layers import weight_layer_names
    from hasched.zoo.load import eval_data, load_model
    from hasched.zoo.ref import ModelRef

    ref = ModelRef.from_dict(model)
    net, _ = load_model(ref, seed, models_dir=models_dir, data_dir=data_dir, train=train,
                        log=log)
    net.eval()
    names = check_layers(net, layers or weight_layer_names(net))
    x, y, _ = eval_data(ref, f":{calibration_images}", data_dir, split="train", model=net)
    return net, ref, names, x, y


def _cells(specs: dict[str, LayerSpec], s: CriticalitySettings) -> list[GridCell]:
    cells = []
    for name, spec in specs.items():
        safe = name.replace("/", "_")
        if s.per == "layer":
            cells.append(GridCell(f"{safe}", {"layer": name, "start": -1, "stop": -1}))
            continue
        for a in range(0, spec.neurons, s.cell_neurons):
            b = min(spec.neurons, a + s.cell_neurons)
            cells.append(GridCell(f"{safe}_{a:06d}", {"layer": name, "start": a, "stop": b}))
    return cells


def run_criticality(out: str | Path, s: CriticalitySettings, *, models_dir=None, data_dir=None,
                    train: bool = False, log: Callable[[str], None] | None = None,
                    progress: bool = True, max_cells: int | None = None) -> dict:
    """Computes (or resumes) the criticality table into ``out``; returns a summary."""
    check_grid_dir(out, "criticality", s.config())  # a bad folder fails before the model
    n_img = max(s.images, s.calibration_images)
    net, ref, layers, x, y = load_study_model(
        s.model, s.seed, models_dir=models_dir, data_dir=data_dir, train=train,
        calibration_images=n_img, layers=s.layers, log=log)
    specs = calibrate(net, layers, x[:s.calibration_images])
    xs, ys = x[:s.images], y[:s.images]

    def cell_rows(cell: GridCell) -> list[dict]:
        p = cell.params
        layer, spec = p["layer"], specs[p["layer"]]
        gen = torch.Generator().manual_seed(derive_seed(s.error_seed, layer, p["start"]))
        members = None if p["start"] < 0 else list(range(p["start"], p["stop"]))
        rows = neuron_scores(net, layer, spec, xs, ys, members, s.perturbation, gen,
                             s.population)
        return [{"layer": layer, "kind": spec.kind, **r} for r in rows]

    rows = run_grid(out, "criticality", s.config(), _cells(specs, s), cell_rows, log=log,
                    progress=progress, max_cells=max_cells)
    out = Path(out)
    if len(rows) < len(_cells(specs, s)) and max_cells is not None:
        return {"rows": len(rows), "finished": False}
    _write_outputs(out, rows, specs, s)
    return {"rows": len(rows), "finished": True, "table": str(out / CRITICALITY_FILE),
            "figure": str(out / "criticality.png")}


def _write_outputs(out: Path, rows: list[dict], specs: dict[str, LayerSpec],
                   s: CriticalitySettings) -> None:
    from hasched.report.reuse import plot_criticality

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in _COLUMNS})
    atomic_write(out / CRITICALITY_FILE, buf.getvalue())
    atomic_write(out / "layers.json", json.dumps(
        {"layers": [sp.to_dict() for sp in specs.values()]}, indent=1) + "\n")
    crit = {n: np.array([r["criticality"] for r in rows if r["layer"] == n]) for n in specs}
    plot_criticality(crit, out / "criticality.png",
                     f"{s.model['name']} seed {s.seed}: {s.perturbation.kind} perturbation")
    lines = [f"# Neuron criticality: {s.model['name']} seed {s.seed}", "",
             f"Perturbation: `{json.dumps(s.perturbation.to_dict())}` on {s.images} training "
             f"images; per {s.per}. Criticality = mean KL(clean || perturbed) of the softmax.",
             "", "| layer | kind | neurons | median | max | max acc drop (points) |",
             "|---|---|---|---|---|---|"]
    for n, sp in specs.items():
        c = crit[n]
        drops = [r["acc_drop"] for r in rows if r["layer"] == n]
        lines.append(f"| {n} | {sp.kind} | {c.size} | {np.median(c):.3g} | {c.max():.3g} | "
                     f"{max(drops):.2f} |")
    atomic_write(out / "summary.md", "\n".join(lines) + "\n")


def load_criticality(folder: str | Path, specs: dict[str, LayerSpec] | None = None
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, layer -> Tensor[neurons])`` from a criticality folder, checked.

    Args:
        folder: Output of ``hasched criticality`` (``--per neuron``).
        specs: When given, every layer must be covered with its number of neurons.
    """
    folder = Path(folder)
    cfg = read_json(folder / "config.json", what="criticality config")
    if not isinstance(cfg, dict) or cfg.get("hasched") != "criticality":
        raise HaschedError(f"{folder} is not a hasched criticality folder")
    if require(cfg, "per", str, file=folder / "config.json") != "neuron":
        raise HaschedError(f"{folder} holds per-layer criticality; Mquans needs --per neuron")
    path = folder / CRITICALITY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HaschedError(f"{path} not found: the criticality run in {folder} has not "
                           "finished (rerun it to resume)") from None
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != _COLUMNS:
        raise HaschedError(f"{path}: columns must be {', '.join(_COLUMNS)}")
    table: dict[str, dict[int, float]] = {}
    for i, r in enumerate(reader, start=2):
        try:
            table.setdefault(r["layer"], {})[int(r["neuron"])] = float(r["criticality"])
        except (TypeError, ValueError):
            raise HaschedError(f"{path}:{i}: neuron must be an integer and criticality a "
                               "number") from None
    crit = {}
    for layer, vals in table.items():
        n = len(vals)
        if sorted(vals) != list(range(n)):
            raise HaschedError(f"{path}: layer {layer} does not list neurons 0..{n - 1} once")
        crit[layer] = torch.tensor([vals[k] for k in range(n)], dtype=torch.float64)
    if specs is not None:
        for name, sp in specs.items():
            if name not in crit or crit[name].numel() != sp.neurons:
                got = crit[name].numel() if name in crit else 0
                raise HaschedError(f"{path}: layer {name} needs {sp.neurons} neurons, the "
                                   f"table has {got}")
        crit = {n: crit[n] for n in specs}
    return cfg, crit

