"""The resilience grid behind ``hasched resilience-ax``: AxDNN vs AccDNN under the same
permanent faults.

Every cell is one :class:`~hasched.study.scenario.Scenario` (int8 with one multiplier, a
stuck-at fault with a fixed ``bit``/``value``/``site``, a faulty-PE fraction and a chip
seed) evaluated with :func:`hasched.study.build.build_evaluator`; the grid is
multiplier x site x bit x value x fraction x chip, run by :func:`hasched.study.grid.run_grid`
(resumable, one part file per cell). A chip's faulty PEs depend only on its seed and the
fraction, so the exact multiplier (the AccDNN) and every approximate one (the AxDNNs) meet
the *same* faulty PEs with the same stuck bit: the comparison is paired per chip.

A cell's *loss* is its fault-free accuracy minus its faulty accuracy (each multiplier
against its own fault-free int8 accuracy); the *gap* is the AxDNN's loss minus the AccDNN's
loss on the same chip.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hasched.errors import HaschedError
from hasched.sim.evaluator import EvalConfig, summarize
from hasched.sim.multipliers import create_multiplier
from hasched.study.grid import GridCell, run_grid
from hasched.study.scenario import Scenario

__all__ = ["AxResSettings", "grid_cells", "run_axres", "paired_losses", "summarize_axres",
           "KIND", "SITES"]

KIND = "resilience-ax"
SITES = ("product", "accumulator")


@dataclass(frozen=True)
class AxResSettings:
    """The grid.

    Attributes:
        scenario: Model, layers, mapping, test images, metric (arithmetic int8; its fault
            fields are set per cell).
        multipliers: Multiplier specs; ``exact`` (the AccDNN reference) is always included.
        sites: Fault sites (``product``, ``accumulator``).
        bits: Stuck bits (0-15: a product is a 16-bit word, the accumulator 32-bit).
        values: Stuck values (0, 1).
        faulty_pes: Fractions of faulty PEs.
        chips: Chips per fraction (seeds ``chip_seed .. chip_seed + chips - 1``).
        chip_seed: First chip seed.
        device: ``cpu`` or ``cuda``.
    """

    scenario: Scenario
    multipliers: tuple[str, ...] = ("exact", "trunc4", "drum4", "mitchell")
    sites: tuple[str, ...] = SITES
    bits: tuple[int, ...] = (2, 6, 10, 14)
    values: tuple[int, ...] = (0, 1)
    faulty_pes: tuple[float, ...] = (0.1,)
    chips: int = 3
    chip_seed: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        mults = tuple(dict.fromkeys(("exact", *self.multipliers)))
        object.__setattr__(self, "multipliers", mults)
        for m in mults:
            create_multiplier(m)
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise HaschedError(f"--sites: use product and/or accumulator, got {bad or 'none'}")
        if not self.bits or any(not 0 <= b <= 15 for b in self.bits):
            raise HaschedError(f"--bits must lie in 0..15 (or all), got {list(self.bits)}")
        if not self.values or any(v not in (0, 1) for v in self.values):
            raise HaschedError(f"--values must be 0 and/or 1, got {list(self.values)}")
        if not self.faulty_pes or any(not 0.0 < f <= 1.0 for f in self.faulty_pes):
            raise HaschedError(f"--faulty-pes must lie in (0, 1], got {list(self.faulty_pes)}")
        if self.chips < 1:
            raise HaschedError(f"--chips must be >= 1, got {self.chips}")
        for name in ("sites", "bits", "values", "faulty_pes"):
            v = getattr(self, name)
            if len(set(v)) != len(v):
                raise HaschedError(f"--{name.replace('_', '-')} lists a value twice")
        if self.scenario.arithmetic != "int8":
            raise HaschedError("resilience-ax compares int8 multipliers: use --arithmetic int8")
        for site in self.sites:
            self.scenario.mapping_obj().check_site(site)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scenario"] = self.scenario.to_dict()
        return d

    def cell_scenario(self, p: dict) -> Scenario:
        return self.scenario.replace(
            multiplier=p["multiplier"], fault="stuck-at",
            fault_params=(("bit", p["bit"]), ("value", p["value"]), ("site", p["site"])),
            faulty_pes=p["faulty_pes"], chip_seed=p["chip_seed"], repeats=1, chip=None)


def _key_part(m: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in m)


def grid_cells(s: AxResSettings) -> list[GridCell]:
    """Every cell, exact multiplier and AxDNNs of one fault next to each other."""
    cells = []
    for site in s.sites:
        for f in s.faulty_pes:
            for bit in s.bits:
                for val in s.values:
                    for i in range(s.chips):
                        for m in s.multipliers:
                            p = {"multiplier": m, "site": site, "bit": bit, "value": val,
                                 "faulty_pes": f, "chip_seed": s.chip_seed + i}
                            key = (f"{site[:3]}_b{bit}_v{val}_f{f:g}_c{s.chip_seed + i}_"
                                   f"{_key_part(m)}")
                            cells.append(GridCell(key, p))
    return cells


class _Grid:
    """Evaluates cells, sharing the loaded test images."""

    def __init__(self, s: AxResSettings, models_dir, data_dir, log) -> None:
        self.s, self.models_dir, self.data_dir, self.log = s, models_dir, data_dir, log

    @functools.cached_property
    def data(self):
        from hasched.study.build import load_images, resolve_device

        dev = resolve_device(self.s.device)
        return load_images(self.s.scenario, self.s.scenario.images, self.data_dir, dev)

    def cell(self, cell: GridCell) -> list[dict]:
        from hasched.study.build import build_evaluator, evaluate

        scn = self.s.cell_scenario(cell.params)
        ev = build_evaluator(scn, device=self.s.device, models_dir=self.models_dir,
                             data_dir=self.data_dir, data=self.data, progress=False,
                             config=EvalConfig(incremental=False))
        res = evaluate(ev, repeats=1, error_seed=0)
        return [{**cell.params, "accuracy": res["accuracy_mean"],
                 "clean_accuracy": res["clean_accuracy"],
                 "reference_accuracy": res["reference_accuracy"],
                 "faulty_count": ev.fault_model.describe()["faulty_pes"],
                 "images": res["images"]}]


def run_axres(out: str | Path, s: AxResSettings, *, models_dir=None, data_dir=None,
              log: Callable[[str], None] | None = None, progress: bool = True,
              max_cells: int | None = None) -> list[dict]:
    """Runs (or resumes) the grid into ``out``; returns its rows in grid order."""
    from hasched.study.build import require_model

    require_model(s.scenario, models_dir)  # before any folder exists
    grid = _Grid(s, models_dir, data_dir, log)
    return run_grid(out, KIND, s.to_dict(), grid_cells(s), grid.cell, log=log,
                    progress=progress, max_cells=max_cells)


def paired_losses(rows: list[dict]) -> list[dict]:
    """One entry per AxDNN cell with its loss, the AccDNN's loss on the same chip and fault,
    and the gap (accuracy points in [0, 1])."""
    def fault(r: dict) -> tuple:
        return (r["site"], r["bit"], r["value"], r["faulty_pes"], r["chip_seed"])

    exact = {fault(r): r for r in rows if r["multiplier"] == "exact"}
    out = []
    for r in rows:
        e = exact.get(fault(r))
        if r["multiplier"] == "exact" or e is None:
            continue
        ax = r["clean_accuracy"] - r["accuracy"]
        acc = e["clean_accuracy"] - e["accuracy"]
        out.append({**{k: r[k] for k in ("multiplier", "site", "bit", "value", "faulty_pes",
                                         "chip_seed")},
                    "ax_loss": ax, "acc_loss": acc, "gap": ax - acc})
    return out


def _group(pairs: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for p in pairs:
        out.setdefault(tuple(p[k] for k in keys), []).append(p)
    return out


def summarize_axres(rows: list[dict]) -> dict:
    """Per (multiplier, site, bit, value, fraction): losses and gap over chips; per
    multiplier: the gap averaged over faults (per chip, then over chips); the headline."""
    pairs = paired_losses(rows)
    cfg_keys = ("multiplier", "site", "bit", "value", "faulty_pes")
    per_fault = []
    for key, ps in _group(pairs, cfg_keys).items():
        per_fault.append({**dict(zip(cfg_keys, key, strict=True)),
                          "ax_loss": summarize([p["ax_loss"] for p in ps]),
                          "acc_loss": summarize([p["acc_loss"] for p in ps]),
                          "gap": summarize([p["gap"] for p in ps])})
    per_mult = []
    for (m,), ps in _group(pairs, ("multiplier",)).items():
        chips = _group(ps, ("faulty_pes", "chip_seed"))
        gaps = [sum(p["gap"] for p in c) / len(c) for c in chips.values()]
        faults = [f for f in per_fault if f["multiplier"] == m]
        per_mult.append({"multiplier": m, "faults": len(faults), "chips": len(chips),
                         "mean_gap": summarize(gaps),
                         "ax_loss_mean": sum(f["ax_loss"]["mean"] for f in faults) / len(faults),
                         "acc_loss_mean": sum(f["acc_loss"]["mean"] for f in faults)
                         / len(faults),
                         "ax_worse": sum(f["gap"]["ci95"][0] > 0 for f in faults),
                         "ax_better": sum(f["gap"]["ci95"][1] < 0 for f in faults)})
    headline = max(per_fault, key=lambda f: f["gap"]["mean"]) if per_fault else None
    clean = {r["multiplier"]: r["clean_accuracy"] for r in rows}
    ref = rows[0]["reference_accuracy"] if rows else None
    return {"per_fault": per_fault, "per_multiplier": per_mult, "headline": headline,
            "clean_accuracy": clean, "reference_accuracy": ref, "cells": len(rows)}
