"""The resilience map R[f, e] of a model on a systolic array (Reduce, step 1).

For every faulty-PE rate ``f`` and each of ``maps`` sampled chips at that rate: FAP, then
FAP+T, reading the accuracy after each amount ``e`` of retraining in the epoch list (one
training run per chip, see :mod:`hasched.study.fapt`). R[f, e] is the mean, the worst and a
95 % t-interval over the chips, on the validation images (the decision set) and on the test
images (for the reader).

One grid cell per (rate, chip) (:func:`hasched.study.grid.run_grid`): a killed run resumes
at the first unfinished chip, and every cell is seeded from its coordinates, so the tables
(``resilience.csv``, ``resilience.json``) are byte-identical to an uninterrupted run's.
Wall times live in the part files and ``timing.csv`` only.

A chip with no faulty PE (``f = 0``, or a rate too small for one PE) needs no retraining:
its accuracy is the clean model's at every ``e``, with 0 steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hasched.errors import HaschedError
from hasched.io import atomic_write, read_json, require
from hasched.seeds import derive_seed
from hasched.sim.evaluator import summarize
from hasched.sim.fap import faulty_weight_masks
from hasched.sim.profile import ChipMap
from hasched.study.fap_study import FapContext, FapStudy
from hasched.study.fapt import FapTrainer, masked_max, pruned_share, top1
from hasched.study.grid import GridCell, check_grid_dir, run_grid

__all__ = ["ResilienceConfig", "ResilienceMap", "Choice", "run_resilience", "fap_checkpoints",
           "summarize_map", "TABLE_NAME", "MAP_NAME"]

KIND = "resilience"
TABLE_NAME = "resilience.csv"
MAP_NAME = "resilience.json"


@dataclass(frozen=True)
class ResilienceConfig:
    """A resilience grid.

    Attributes:
        study: Model, array, images and fine-tuning (shared with ``hasched retrain``).
        rates: Faulty-PE rates, ascending. epochs: Retraining amounts, ascending, from 0.
        maps: Chips sampled per rate. chip_seed: Base seed of those chips.
    """

    study: FapStudy
    rates: tuple[float, ...]
    epochs: tuple[float, ...]
    maps: int = 5
    chip_seed: int = 1000

    def validate(self) -> ResilienceConfig:
        self.study.validate()
        for name, vals, top in (("--fault-rates", self.rates, 1.0),
                                ("--epochs", self.epochs, math.inf)):
            if not vals:
                raise HaschedError(f"{name} is empty")
            if any(not (math.isfinite(v) and 0 <= v <= top) for v in vals):
                raise HaschedError(f"{name} must be finite numbers in [0, {top:g}], got "
                                   f"{list(vals)}")
            if list(vals) != sorted(set(vals)):
                raise HaschedError(f"{name} must be ascending without repeats, got "
                                   f"{list(vals)}")
        if self.epochs[0] != 0:
            raise HaschedError(f"--epochs must start at 0 (FAP without retraining), got "
                               f"{list(self.epochs)}")
        if self.maps < 1:
            raise HaschedError(f"--maps must be >= 1, got {self.maps}")
        return self

    def identity(self) -> dict:
        return {"study": self.study.identity(), "rates": list(self.rates),
                "epochs": list(self.epochs), "maps": self.maps, "chip_seed": self.chip_seed}

    def cells(self) -> list[GridCell]:
        return [GridCell(f"f{f:g}_m{k}", {"rate": f, "map": k}) for f in self.rates
                for k in range(self.maps)]

    def chip(self, rate: float, k: int, pe_shape: tuple[int, int], spec: str) -> ChipMap:
        """Chip ``k`` at ``rate`` (dead PEs; for FAP the kind does not matter)."""
        seed = derive_seed("resilience-chip", self.chip_seed, float(rate), int(k))
        return ChipMap.sample(pe_shape, rate, seed, kind="dead", mapping=spec)


def fap_checkpoints(ctx: FapContext, chip: ChipMap, epochs: list[float], run_key: str,
                    progress: bool = False, on_point: Callable[[dict], None] | None = None
                    ) -> list[dict]:
    """FAP then FAP+T of one chip, one record per amount in ``epochs`` (ascending).

    Each record: ``epochs``, ``steps``, ``val_acc``, ``test_acc``, ``train_seconds``
    (cumulative), ``val_seconds`` (this evaluation), ``max_pruned_abs`` (0.0: FAP held).
    """
    import time

    masks = faulty_weight_masks(ctx.model, ctx.layers, ctx.mapping, chip, spatial=ctx.spatial)
    share = pruned_share(ctx.model, masks)
    if not any(bool(m.any()) for m in masks.values()):  # a healthy chip: nothing to retrain
        return [{"epochs": e, "steps": 0, "val_acc": ctx.clean_val, "test_acc": ctx.clean_test,
                 "pruned_share": 0.0, "train_seconds": 0.0, "val_seconds": 0.0,
                 "max_pruned_abs": 0.0} for e in epochs]
    trainer = FapTrainer(ctx.model, masks, ctx.recipe, *ctx.train, ctx.study.fine_tune,
                         run_key, progress=progress, desc=f"FAP+T {run_key}")
    out = []
    for e in epochs:
        trainer.advance_epochs(e)
        model = trainer.ready()
        t0 = time.perf_counter()
        val = _top1(model, ctx.val)
        val_seconds = time.perf_counter() - t0
        rec = {"epochs": e, "steps": trainer.step, "val_acc": val,
               "test_acc": _top1(model, ctx.test), "pruned_share": share,
               "train_seconds": trainer.train_seconds, "val_seconds": val_seconds,
               "max_pruned_abs": masked_max(model, masks)}
        out.append(rec)
        if on_point is not None and on_point(rec):
            break
    return out


def _top1(model, data) -> float:
    return top1(model, *data)


def run_resilience(cfg: ResilienceConfig, out: str | Path, ctx_loader: Callable[[],
                   FapContext], *, log: Callable[[str], None] | None = None,
                   progress: bool = True, max_cells: int | None = None) -> dict:
    """Computes (or resumes) the grid into ``out`` and writes the tables.

    Args:
        ctx_loader: Loads the study (called once, after the folder checks).
        max_cells: Stop after this many new cells (a controlled interruption, for tests).

    Returns:
        The map summary (what ``resilience.json`` holds).
    """
    cfg.validate()
    check_grid_dir(out, KIND, cfg.identity())
    ctx = ctx_loader()
    pe_shape, spec = ctx.mapping.pe_shape, ctx.mapping.spec()

    def cell_fn(cell: GridCell) -> list[dict]:
        f, k = cell.params["rate"], cell.params["map"]
        chip = cfg.chip(f, k, pe_shape, spec)
        pts = fap_checkpoints(ctx, chip, list(cfg.epochs), cell.key, progress=progress)
        return [{"rate": f, "map": k, "faulty_pes": int(chip.faulty.sum()), **p} for p in pts]

    cells = cfg.cells()
    rows = run_grid(out, KIND, cfg.identity(), cells, cell_fn, log=log, progress=progress,
                    max_cells=max_cells)
    clean = {"val": ctx.clean_val, "test": ctx.clean_test}
    summary = summarize_map(cfg, rows, clean)
    if summary["complete"]:
        write_tables(out, summary, rows)
    return summary


def summarize_map(cfg: ResilienceConfig, rows: list[dict], clean: dict) -> dict:
    """R[f, e] statistics from the cells' rows (only complete (f, e) entries are filled)."""
    stats: dict[str, list[list]] = {k: [] for k in (
        "steps", "n", "val_mean", "val_worst", "val_ci_lo", "val_ci_hi", "test_mean",
        "test_worst", "test_ci_lo", "test_ci_hi", "pruned_share")}
    for f in cfg.rates:
        row = {k: [] for k in stats}
        for e in cfg.epochs:
            pts = [r for r in rows if r["rate"] == f and r["epochs"] == e]
            val, test = summarize([r["val_acc"] for r in pts] or [math.nan]), summarize(
                [r["test_acc"] for r in pts] or [math.nan])
            row["steps"].append(max((r["steps"] for r in pts), default=0))
            row["n"].append(len(pts))
            for name, st, vals in (("val", val, [r["val_acc"] for r in pts]),
                                   ("test", test, [r["test_acc"] for r in pts])):
                row[f"{name}_mean"].append(st["mean"])
                row[f"{name}_worst"].append(min(vals, default=math.nan))
                row[f"{name}_ci_lo"].append(st["ci95"][0])
                row[f"{name}_ci_hi"].append(st["ci95"][1])
            row["pruned_share"].append(sum(r["pruned_share"] for r in pts) / max(len(pts), 1))
        for k in stats:
            stats[k].append(row[k])
    complete = all(n == cfg.maps for r in stats["n"] for n in r)
    return {"hasched": "resilience-map", "clean": clean, "rates": list(cfg.rates),
            "epochs": list(cfg.epochs), "maps": cfg.maps, "complete": complete, **stats}


def write_tables(out: str | Path, summary: dict, rows: list[dict]) -> None:
    """``resilience.csv`` (one line per (f, e)), ``resilience.json``, ``timing.csv``."""
    out = Path(out)
    cols = ["steps", "n", "val_mean", "val_worst", "val_ci_lo", "val_ci_hi", "test_mean",
            "test_worst", "test_ci_lo", "test_ci_hi", "pruned_share"]
    lines = ["faulty_pe_rate,epochs," + ",".join(cols)]
    for i, f in enumerate(summary["rates"]):
        for j, e in enumerate(summary["epochs"]):
            vals = [summary[c][i][j] for c in cols]
            lines.append(f"{f:g},{e:g}," + ",".join(
                str(v) if isinstance(v, int) else f"{v:.6f}" for v in vals))
    atomic_write(out / TABLE_NAME, "\n".join(lines) + "\n")
    atomic_write(out / MAP_NAME, json.dumps(summary, indent=1) + "\n")
    timing = ["rate,map,epochs,steps,train_seconds"] + [
        f"{r['rate']:g},{r['map']},{r['epochs']:g},{r['steps']},{r['train_seconds']:.2f}"
        for r in rows]
    atomic_write(out / "timing.csv", "\n".join(timing) + "\n")


@dataclass(frozen=True)
class Choice:
    """What the resilience map prescribes for one chip.

    Attributes:
        index: Index into the map's epoch list. epochs: That amount.
        reason: ``map`` (the smallest amount whose worst case meets the constraint),
            ``none-suffices`` (no amount does: the largest, the closest the model gets),
            ``beyond-map`` (the chip's rate exceeds the map's largest: the largest amount).
        predicted: Interpolated worst-case validation accuracy at that amount (or None).
    """

    index: int
    epochs: float
    reason: str
    predicted: float | None


@dataclass(frozen=True)
class ResilienceMap:
    """A finished map, read back for the Reduce policy (validation accuracies)."""

    rates: list[float]
    epochs: list[float]
    val_worst: list[list[float]]
    clean_val: float
    clean_test: float
    study: dict
    steps: list[list[int]]
    val_mean: list[list[float]] | None = None

    @classmethod
    def load(cls, folder: str | Path) -> ResilienceMap:
        folder = Path(folder)
        path = folder / MAP_NAME
        if not path.is_file():
            raise HaschedError(f"--resilience {folder} holds no finished resilience map "
                               f"({MAP_NAME}); run or finish `hasched resilience --out "
                               f"{folder}`")
        obj = read_json(path, what="resilience map")
        cfg = read_json(folder / "config.json", what="resilience config")
        for key, kind in (("rates", list[float]), ("epochs", list[float]),
                          ("val_worst", list[list[float]]), ("val_mean", list[list[float]]),
                          ("steps", list[list[int]])):
            require(obj, key, kind, file=path)
        for key in ("val_worst", "val_mean"):
            if not obj["rates"] or not obj["epochs"] or len(obj[key]) != len(
                    obj["rates"]) or any(len(r) != len(obj["epochs"]) for r in obj[key]):
                raise HaschedError(f"{path}: {key} must be a rates x epochs table")
        clean = require(obj, "clean", dict, file=path)
        if not obj.get("complete"):
            raise HaschedError(f"resilience map {path} is incomplete; finish the run first")
        study = require(cfg, "study", dict, file=folder / "config.json")
        return cls([float(f) for f in obj["rates"]], [float(e) for e in obj["epochs"]],
                   obj["val_worst"], float(require(clean, "val", float, file=path)),
                   float(require(clean, "test", float, file=path)), study, obj["steps"],
                   obj["val_mean"])

    def worst_at(self, rate: float) -> list[float] | None:
        """Worst-case validation accuracy per amount at ``rate``, linear in the rate
        between the map's rates; the lowest rate's below it; None above the highest."""
        fs = self.rates
        if rate > fs[-1] + 1e-12:
            return None
        if rate <= fs[0]:
            return list(self.val_worst[0])
        i = max(j for j in range(len(fs)) if fs[j] <= rate)
        if fs[i] == rate or i == len(fs) - 1:
            return list(self.val_worst[i])
        w = (rate - fs[i]) / (fs[i + 1] - fs[i])
        return [(1 - w) * a + w * b for a, b in zip(self.val_worst[i], self.val_worst[i + 1],
                                                    strict=True)]

    def choose(self, rate: float, max_drop: float) -> Choice:
        """The smallest amount whose (interpolated) worst case is within ``max_drop``
        points of the clean validation accuracy."""
        target = self.clean_val - max_drop / 100.0
        last = len(self.epochs) - 1
        worst = self.worst_at(rate)
        if worst is None:
            return Choice(last, self.epochs[last], "beyond-map", None)
        for j, acc in enumerate(worst):
            if acc >= target - 1e-12:
                return Choice(j, self.epochs[j], "map", acc)
        return Choice(last, self.epochs[last], "none-suffices", worst[last])

    def equivalent_rate(self, fap_acc: float) -> float | None:
        """The faulty-PE rate at which the map's mean FAP-only (``e = 0``) accuracy equals
        ``fap_acc``, linear between the map's rates (the column made non-increasing first);
        None when the chip is worse than the mean chip at the largest rate."""
        col, low = [], math.inf
        for row in self.val_mean:
            low = min(low, row[0])
            col.append(low)
        if fap_acc >= col[0]:
            return self.rates[0]
        for i in range(1, len(col)):
            if fap_acc >= col[i]:
                w = (col[i - 1] - fap_acc) / (col[i - 1] - col[i])
                return self.rates[i - 1] + w * (self.rates[i] - self.rates[i - 1])
        return None

    def choose_by_damage(self, fap_acc: float, max_drop: float) -> Choice:
        """Reduce with the chip's own damage instead of its rate: how hard its faults hit
        critical weights shows in its FAP-only validation accuracy, which places it at an
        equivalent rate of the map (:meth:`equivalent_rate`); a chip that already meets the
        constraint after FAP needs no retraining (reason ``fap-meets``)."""
        if fap_acc >= self.clean_val - max_drop / 100.0 - 1e-12:
            return Choice(0, self.epochs[0], "fap-meets", fap_acc)
        rate = self.equivalent_rate(fap_acc)
        if rate is None:
            last = len(self.epochs) - 1
            return Choice(last, self.epochs[last], "beyond-map", None)
        return self.choose(rate, max_drop)
