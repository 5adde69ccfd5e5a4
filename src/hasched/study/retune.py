"""The mitigation study behind ``hasched retune``: the mitigations side by side on the same
chips of an approximate-multiplier (AxDNN) accelerator.

For every chip (loaded from files or sampled from the scenario's permanent fault) and every
method, one grid cell (:func:`hasched.study.grid.run_grid`: resumable, one part file per
cell) applies the method to a fresh copy of the model (:mod:`hasched.mitigate.methods`) and
measures it on the test images of the scenario. Two baselines are always measured on the
same chips: ``none`` (the AxDNN as it is) and ``exact`` (the same chip with the exact
multiplier, the AccDNN). Mitigations learn only from training images: the calibration
images (the first ``calibration_images``), ``train_images`` for the fine-tunes and
``search_images`` for the remap search.

Recovery on a chip is ``(acc_method - acc_none) / (acc_clean - acc_none)`` with
``acc_clean`` the AxDNN's fault-free accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hasched.errors import HaschedError
from hasched.mitigate.methods import MITIGATIONS, Context, MitigationSettings, run_mitigation
from hasched.sim.evaluator import EvalConfig, FaultyEvaluator, summarize
from hasched.sim.faults import PermanentFault
from hasched.sim.profile import ChipMap
from hasched.study.grid import GridCell, run_grid
from hasched.study.scenario import Scenario

__all__ = ["RetuneSettings", "load_chips", "retune_cells", "run_retune", "summarize_retune",
           "KIND"]

KIND = "retune"
BASELINES = ("none", "exact")


@dataclass(frozen=True)
class RetuneSettings:
    """What ``hasched retune`` runs.

    Attributes:
        scenario: Model, layers, mapping, int8 multiplier, permanent fault recipe, test
            images and metric (its ``chip``/``faulty_pes``/``chip_seed`` are not used).
        chips: Chip-map files; when empty, ``n_chips`` chips per ``faulty_pes`` fraction
            are sampled from the scenario's fault with seeds ``chip_seed, chip_seed+1...``.
        faulty_pes: Fractions of faulty PEs of sampled chips.
        n_chips: Sampled chips per fraction.
        chip_seed: First seed of sampled chips.
        methods: Mitigations (registered in :data:`hasched.mitigate.methods.MITIGATIONS`).
        calibration_images: First training images for int8 scales and retune histograms.
        train_images: Training-split range for the straight-through fine-tunes.
        search_images: Training-split range for the remap search's fitness.
        mitigation: The mitigations' knobs.
        device: ``cpu`` or ``cuda``.
    """

    scenario: Scenario
    chips: tuple[str, ...] = ()
    faulty_pes: tuple[float, ...] = (0.1,)
    n_chips: int = 3
    chip_seed: int = 1
    methods: tuple[str, ...] = ("retune", "prune", "remap", "finetune")
    calibration_images: int = 512
    train_images: str = "512:2560"
    search_images: str = "512:768"
    mitigation: MitigationSettings = field(default_factory=MitigationSettings)
    device: str = "cpu"

    def __post_init__(self) -> None:
        base = [m for m in self.methods if m in BASELINES]
        if base:
            raise HaschedError(f"--method {base[0]}: none and exact are always measured; "
                               "list only mitigations")
        for m in self.methods:
            MITIGATIONS.get(m)
        if len(set(self.methods)) != len(self.methods):
            raise HaschedError(f"--method lists a method twice: {','.join(self.methods)}")
        if self.scenario.arithmetic != "int8":
            raise HaschedError("retune studies int8 accelerators: use --arithmetic int8")
        if not self.chips:
            if self.n_chips < 1 or not self.faulty_pes:
                raise HaschedError("give --chip FILE(s), or --faulty-pes and --chips >= 1")
            if not isinstance(self.scenario.fault_obj(), PermanentFault):
                raise HaschedError(f"--fault {self.scenario.fault} is transient; chips hold "
                                   "permanent faults (stuck-at, dead)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scenario"] = self.scenario.to_dict()
        return d


def load_chips(s: RetuneSettings) -> list[tuple[str, ChipMap]]:
    """``[(name, chip)]``: the files (checked against the mapping) or the sampled chips.

    Raises:
        HaschedError: a missing or malformed file, a chip for another PE grid, or a fault
            site that a chosen method cannot handle (retune needs product faults).
    """
    chips = _chips(s)
    mapping = s.scenario.mapping_obj()
    if any(m.startswith("retune") for m in s.methods):
        for name, chip in chips:
            site = mapping.check_site(chip.site)
            if site != "product":
                raise HaschedError(f"chip {name}: its faults sit at the {site} site; retune "
                                   "maps weights through faulty products (site=product)")
    return chips


def _chips(s: RetuneSettings) -> list[tuple[str, ChipMap]]:
    mapping = s.scenario.mapping_obj()
    if s.chips:
        out = []
        for path in s.chips:
            chip = ChipMap.load(path)
            try:
                chip.check(mapping.pe_shape)
                mapping.check_site(chip.site)
            except HaschedError as err:
                raise HaschedError(f"chip map {path}: {err}") from None
            out.append((Path(path).stem, chip))
        if len({n for n, _ in out}) != len(out):
            raise HaschedError("two --chip files share a name")
        return out
    fault = s.scenario.fault_obj()
    return [(f"f{f:g}_s{s.chip_seed + i}", fault.sample_chip(mapping.pe_shape, f,
                                                             s.chip_seed + i, mapping.spec()))
            for f in s.faulty_pes for i in range(s.n_chips)]


class _Study:
    """Loads the model and data once and runs one (chip, method) cell."""

    def __init__(self, s: RetuneSettings, chips: dict[str, ChipMap], models_dir, data_dir,
                 log) -> None:
        self.s, self.chips, self.models_dir, self.data_dir, self.log = (
            s, chips, models_dir, data_dir, log)

    @functools.cached_property
    def data(self) -> dict:
        from hasched.study.build import calibration_images, load_images, resolve_device
        from hasched.zoo.load import eval_data, load_model

        scn, dev = self.s.scenario, resolve_device(self.s.device)
        model, meta = load_model(scn.model_ref(), scn.seed, models_dir=self.models_dir,
                                 data_dir=self.data_dir, progress=False)
        x, y, info = load_images(scn, scn.images, self.data_dir, dev)
        ref = scn.model_ref()
        tx, ty, _ = eval_data(ref, self.s.train_images, self.data_dir, dev, split="train")
        sx, sy, _ = eval_data(ref, self.s.search_images, self.data_dir, dev, split="train")
        cal = calibration_images(scn, self.data_dir, dev, self.s.calibration_images)
        return {"model": model.to(dev).eval(), "x": x, "y": y, "info": info, "tx": tx,
                "ty": ty, "sx": sx, "sy": sy, "cal": cal}

    def evaluate(self, model, chip: ChipMap, perms, multiplier: str | None = None) -> dict:
        scn, d = self.s.scenario, self.data
        arith = scn.arithmetic_obj() if multiplier is None else scn.replace(
            multiplier=multiplier).arithmetic_obj()
        ev = FaultyEvaluator(model, d["x"], d["y"], list(scn.layers), chip=chip,
                             mapping=scn.mapping_obj(), arithmetic=arith, calibration=d["cal"],
                             metric=scn.metric, config=EvalConfig(incremental=False))
        acc = float(ev.accuracy(perms)[0, 0])
        return {"accuracy": acc, "clean_accuracy": ev.clean_accuracy,
                "reference_accuracy": ev.reference_score}

    def cell(self, cell: GridCell) -> list[dict]:
        chip_name, method = cell.params["chip"], cell.params["method"]
        chip, scn, d = self.chips[chip_name], self.s.scenario, self.data
        row = {"chip": chip_name, "faulty_pes": chip.faulty_fraction,
               "faulty_count": int(chip.faulty.sum()), "chip_seed": chip.seed,
               "method": method}
        if method == "exact":  # the AccDNN on the same chip
            row.update(self.evaluate(d["model"], chip, None, "exact"), info={})
            return [row]
        search = method == "remap"
        ctx = Context(d["model"], list(scn.layers), scn.mapping_obj(), chip,
                      scn.arithmetic_obj(), d["cal"], d["sx"] if search else d["tx"],
                      d["sy"] if search else d["ty"], self.s.mitigation, self.log)
        out = run_mitigation(method, d["model"], ctx)
        res = self.evaluate(out.model, out.chip, out.perms)
        if method != "none":  # the fault-free accuracy of the *edited* model
            res["edited_clean_accuracy"] = res.pop("clean_accuracy")
            res.pop("reference_accuracy")
        row.update(res, info=_jsonable(out.info))
        return [row]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def retune_cells(chip_names: list[str], methods: tuple[str, ...]) -> list[GridCell]:
    """One cell per (chip, method), baselines first. A chip file's name may hold characters
    a part file's name cannot (``my chip.json``): those become ``-`` in the key only (two
    names that then collide are refused by the grid)."""
    def safe(name: str) -> str:
        return "".join(c if (c.isascii() and c.isalnum()) or c in "_.+=@-" else "-" for c in name)

    return [GridCell(f"{safe(name)}_{m}", {"chip": name, "method": m})
            for name in chip_names for m in (*BASELINES, *methods)]


def run_retune(out: str | Path, s: RetuneSettings, *, models_dir=None, data_dir=None,
               log: Callable[[str], None] | None = None, progress: bool = True,
               max_cells: int | None = None) -> tuple[dict, list[dict]]:
    """Runs (or resumes) every (chip, method) cell into ``out``; returns the summary and
    the rows."""
    chips = load_chips(s)
    cells = retune_cells([n for n, _ in chips], s.methods)
    study = _Study(s, dict(chips), models_dir, data_dir, log)
    config = s.to_dict()
    config["chip_maps"] = {n: c.to_dict() for n, c in chips}
    rows = run_grid(out, KIND, config, cells, study.cell, log=log, progress=progress,
                    max_cells=max_cells)
    return summarize_retune(rows, s), rows


def summarize_retune(rows: list[dict], s: RetuneSettings) -> dict:
    """Per faulty fraction and method: accuracy and recovery over chips (mean, 95% CI)."""
    by = {(r["chip"], r["method"]): r for r in rows}
    clean_of = {r["chip"]: r["clean_accuracy"] for r in rows if r["method"] == "none"}
    groups: dict[float | None, list[str]] = {}
    for r in rows:
        groups.setdefault(r["faulty_pes"], [])
        if r["chip"] not in groups[r["faulty_pes"]]:
            groups[r["faulty_pes"]].append(r["chip"])
    out = []
    for frac, chips in groups.items():
        for m in (*BASELINES, *s.methods):
            accs, recs = [], []
            for c in chips:
                r, none = by.get((c, m)), by.get((c, "none"))
                if r is None:
                    continue
                accs.append(r["accuracy"])
                lost = clean_of[c] - none["accuracy"] if none else 0.0
                if m not in BASELINES and lost > 0:
                    recs.append((r["accuracy"] - none["accuracy"]) / lost)
            if accs:
                out.append({"faulty_pes": frac, "method": m, "chips": len(accs),
                            "accuracy": summarize(accs), "recovery": summarize(recs)
                            if recs else None})
    clean = [r["clean_accuracy"] for r in rows if r["method"] == "none"]
    exact_clean = [r["clean_accuracy"] for r in rows if r["method"] == "exact"]
    ref = [r["reference_accuracy"] for r in rows if r["method"] == "none"]
    return {"rows": out, "clean_accuracy": clean[0] if clean else None,
            "exact_clean_accuracy": exact_clean[0] if exact_clean else None,
            "reference_accuracy": ref[0] if ref else None, "cells": len(rows)}
