"""Per-chip FAP / FAP+T under a retraining policy (Reduce, step 2), and its costs.

Policies (:class:`Policy`):

- ``none``: FAP only (0 epochs).
- ``fixed:E``: every chip gets ``E`` epochs of FAP+T (``fixed`` alone: one policy per amount
  of the resilience map, so the cheapest uniform amount for a yield can be read off).
- ``reduce``: the chip's own faulty-PE rate picks, from the resilience map, the smallest
  amount whose worst case stays within ``max_drop`` points of clean
  (:meth:`~hasched.study.resilience.ResilienceMap.choose`); retrain that long, verify on the
  validation images, and step up to the map's next amount while verification misses
  (:func:`reduce_steps`).
- ``reduce-crit``: Reduce placed on the map by the chip's own damage rather than its rate:
  how hard its faults hit critical weights shows in its FAP-only validation accuracy, which
  gives an equivalent rate (:meth:`~hasched.study.resilience.ResilienceMap.choose_by_damage`;
  a chip that meets the constraint after FAP is not retrained); then verify and step up.
- ``remap``: HAS-style row remapping, no retraining (:mod:`hasched.study.remap`).

All retraining policies of one run share each chip's single FAP+T run (:class:`ChipRun`):
the accuracy after ``e`` epochs is read when the run passes ``e``, which equals a separate
run of ``e`` epochs bit for bit (same seed, mini-batch order and dropout stream; a test
checks it). Each policy is charged only for what it would do alone: its epochs, the
training seconds up to its amount, and (Reduce) its verification evaluations.

A chip *meets* the constraint when its test accuracy is at least the clean test accuracy
minus ``max_drop`` points; the *yield* of a policy is the share of chips that meet it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hasched.errors import HaschedError
from hasched.io import atomic_write
from hasched.seeds import derive_seed
from hasched.sim.fap import faulty_weight_masks
from hasched.sim.profile import ChipMap
from hasched.study.fap_study import FapContext, FapStudy
from hasched.study.fapt import FapTrainer, masked_max, pruned_share, steps_for, top1
from hasched.study.grid import GridCell, check_grid_dir, run_grid
from hasched.study.resilience import ResilienceMap

__all__ = ["Policy", "RetrainConfig", "ChipRun", "reduce_steps", "run_retrain",
           "summarize_policies", "hindsight_bound", "TABLE_NAME"]

KIND = "retrain"
TABLE_NAME = "retrain.csv"
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+=@-")


@dataclass(frozen=True)
class Policy:
    """One retraining policy: ``none``, ``fixed`` (``epochs`` set, or None for the sweep
    over the map's amounts), ``reduce`` or ``remap``."""

    kind: str
    epochs: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("none", "fixed", "reduce", "reduce-crit", "remap"):
            raise HaschedError(f"unknown policy {self.kind!r}; use none, fixed:E, reduce, "
                               "reduce-crit or remap")
        if self.epochs is not None and not (self.kind == "fixed" and self.epochs >= 0
                                            and math.isfinite(self.epochs)):
            # (fixed:inf used to pass here and fail inside the first chip's cell)
            raise HaschedError(f"policy {self.kind}: only fixed takes an amount (fixed:E, "
                               "E finite and >= 0)")

    @property
    def name(self) -> str:
        return f"fixed:{self.epochs:g}" if self.kind == "fixed" and self.epochs is not None \
            else self.kind


@dataclass(frozen=True)
class RetrainConfig:
    """A retraining run over a folder of chips.

    Attributes:
        study: Model, array, images, fine-tuning (must match the resilience map's).
        policies: The policies compared. max_drop: Allowed drop in points (1.0 = 1 %).
        chips: ``(name, ChipMap)`` pairs. resilience: The map (needed by reduce/fixed).
        remap_searcher/remap_config/remap_images: The remap search (registry name,
            config mapping or None for the small default, fitness images).
        verify_margin: Points Reduce keeps in hand on the validation images, in its map
            choice and its verification (it aims at ``max_drop - verify_margin``), because a
            chip's validation drop can understate its test drop; yield is still judged at
            ``max_drop``.
    """

    study: FapStudy
    policies: tuple[Policy, ...]
    chips: tuple[tuple[str, ChipMap], ...]
    max_drop: float = 1.0
    resilience: ResilienceMap | None = None
    remap_searcher: str = "ga"
    remap_config: dict | None = None
    remap_images: int = 256
    digests: dict = field(default_factory=dict)
    verify_margin: float = 0.0

    def expanded(self) -> list[Policy]:
        """Policies with ``fixed`` expanded to one per map amount > 0."""
        out: list[Policy] = []
        for p in self.policies:
            if p.kind == "fixed" and p.epochs is None:
                out += [Policy("fixed", e) for e in self.resilience.epochs if e > 0]
            else:
                out.append(p)
        return list(dict.fromkeys(out))

    def validate(self) -> RetrainConfig:
        self.study.validate()
        if not self.policies:
            raise HaschedError("--policy is empty")
        if not (self.max_drop >= 0):
            raise HaschedError(f"--max-drop must be >= 0 points, got {self.max_drop}")
        if not (0 <= self.verify_margin <= self.max_drop):
            raise HaschedError(f"--verify-margin must be in 0..--max-drop ({self.max_drop:g})"
                               f" points, got {self.verify_margin}")
        needs_map = [p.name for p in self.policies if p.kind.startswith("reduce") or (
            p.kind == "fixed" and p.epochs is None)]
        if needs_map and self.resilience is None:
            raise HaschedError(f"policy {needs_map[0]} needs a resilience map: give "
                               "--resilience DIR (hasched resilience), or fixed:E")
        if self.resilience is not None:
            mine, theirs = self.study.identity(), self.resilience.study
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise HaschedError(f"the resilience map was made with other settings "
                                   f"(differs in: {', '.join(diff)}); repeat its options")
        if self.remap_images < 1:
            raise HaschedError(f"--remap-images must be >= 1, got {self.remap_images}")
        return self

    def identity(self) -> dict:
        # the margin enters only when set, so runs made before it existed still resume
        margin = {"verify_margin": self.verify_margin} if self.verify_margin else {}
        return {**margin, "study": self.study.identity(),
                "policies": [p.name for p in self.expanded()],
                "max_drop": self.max_drop, "chips": [[n, self.digests.get(n, _digest(c))]
                                                     for n, c in self.chips],
                "resilience": None if self.resilience is None else _map_digest(
                    self.resilience),
                "remap": {"searcher": self.remap_searcher, "config": self.remap_config,
                          "images": self.remap_images}}

    def cells(self) -> list[GridCell]:
        return [GridCell(n if set(n) <= _SAFE else f"chip{i}", {"chip": n})
                for i, (n, _) in enumerate(self.chips)]


def _digest(chip: ChipMap) -> str:
    raw = json.dumps([chip.kind.tolist(), chip.bit.tolist(), chip.value.tolist(), chip.site])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _map_digest(rmap: ResilienceMap) -> str:
    raw = json.dumps([rmap.rates, rmap.epochs, rmap.val_worst, rmap.clean_val])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class ChipRun:
    """One chip's FAP+T run with cached readings; ``at(e)`` trains forward to ``e``.

    ``wanted`` amounts below a requested one are read on the way, so the policies can ask
    in any order as long as every amount they may ask for is wanted or asked in order.
    """

    def __init__(self, ctx: FapContext, chip: ChipMap, run_key: str, wanted: list[float],
                 progress: bool = False) -> None:
        self.ctx = ctx
        self.masks = faulty_weight_masks(ctx.model, ctx.layers, ctx.mapping, chip,
                                         spatial=ctx.spatial)
        self.healthy = not any(bool(m.any()) for m in self.masks.values())
        self.share = pruned_share(ctx.model, self.masks)
        self.trainer = None if self.healthy else FapTrainer(
            ctx.model, self.masks, ctx.recipe, *ctx.train, ctx.study.fine_tune, run_key,
            progress=progress, desc=f"FAP+T {run_key}")
        self.wanted = sorted(set(wanted))
        self.cache: dict[float, dict] = {}

    def steps(self, epochs: float) -> int:
        return 0 if self.trainer is None else steps_for(epochs, self.trainer.steps_per_epoch)

    def at(self, epochs: float) -> dict:
        """``epochs``, ``steps``, ``val_acc``, ``test_acc``, ``train_seconds`` (cumulative),
        ``val_seconds`` after ``epochs`` of FAP+T."""
        for e in [w for w in self.wanted if w < epochs] + [epochs]:
            if e not in self.cache:
                self.cache[e] = self._read(e)
        return self.cache[epochs]

    def _read(self, epochs: float) -> dict:
        ctx = self.ctx
        if self.trainer is None:
            return {"epochs": epochs, "steps": 0, "val_acc": ctx.clean_val,
                    "test_acc": ctx.clean_test, "train_seconds": 0.0, "val_seconds": 0.0,
                    "train_cpu_seconds": 0.0, "val_cpu_seconds": 0.0}
        if self.steps(epochs) < self.trainer.step:
            raise RuntimeError(f"FAP+T already passed {epochs} epochs")  # a caller bug
        self.trainer.advance_epochs(epochs)
        model = self.trainer.ready()
        t0, c0 = time.perf_counter(), time.process_time()
        val = top1(model, *ctx.val)
        val_seconds, val_cpu = time.perf_counter() - t0, time.process_time() - c0
        if masked_max(model, self.masks) != 0.0:  # the invariant the tests check, kept live
            raise RuntimeError("FAP+T let a pruned weight move")
        return {"epochs": epochs, "steps": self.trainer.step, "val_acc": val,
                "test_acc": top1(model, *ctx.test), "train_seconds": self.trainer.train_seconds,
                "val_seconds": val_seconds, "train_cpu_seconds": self.trainer.train_cpu_seconds,
                "val_cpu_seconds": val_cpu}


def reduce_steps(start: int, epochs: list[float], val_at: Callable[[float], float],
                 target: float) -> list[int]:
    """Reduce's verification loop: indices into ``epochs`` tried, the last one kept.

    Retrain to ``epochs[start]``; while the validation accuracy misses ``target`` and a
    larger amount exists, step up to the next one.
    """
    tried = [start]
    while val_at(epochs[tried[-1]]) < target - 1e-12 and tried[-1] + 1 < len(epochs):
        tried.append(tried[-1] + 1)
    return tried


def _chip_rows(cfg: RetrainConfig, ctx: FapContext, name: str, chip: ChipMap,
               progress: bool) -> list[dict]:
    """Every policy's row for one chip (see :func:`run_retrain`)."""
    policies = cfg.expanded()
    wanted = [0.0] + [p.epochs for p in policies if p.kind == "fixed"]
    if any(p.kind.startswith("reduce") for p in policies):
        # Reduce may ask for any amount of the map after a larger fixed:E was read (the run
        # only goes forward), so every map amount is read on the way
        wanted += list(cfg.resilience.epochs)
    run = ChipRun(ctx, chip, name, wanted, progress)
    spe = 1 if run.trainer is None else run.trainer.steps_per_epoch
    base = {"chip": name, "rate": float(chip.faulty.mean()),
            "faulty_pes": int(chip.faulty.sum()), "pruned_share": run.share}
    aim = cfg.max_drop - cfg.verify_margin  # Reduce's decisions; yield is judged at max_drop
    target = {"val": ctx.clean_val - cfg.max_drop / 100.0,
              "test": ctx.clean_test - cfg.max_drop / 100.0,
              "aim": ctx.clean_val - aim / 100.0}
    rows = []
    for p in policies:
        extra: dict = {}
        if p.kind == "remap":
            rec = _remap(cfg, ctx, name, chip)
            extra = {k: rec.pop(k) for k in ("evaluations", "search_fitness", "schedule")}
        elif p.kind.startswith("reduce"):
            rec, extra = _reduce(cfg.resilience, run, base["rate"], aim, target["aim"],
                                 by_damage=p.kind == "reduce-crit")
        else:
            rec = run.at(0.0 if p.kind == "none" else p.epochs)
            rec = {**rec, "seconds": rec["train_seconds"],
                   "cpu_seconds": rec["train_cpu_seconds"]}
        rows.append({**base, "policy": p.name, "epochs": rec["epochs"], "steps": rec["steps"],
                     "cost_epochs": rec["steps"] / spe, "val_acc": rec["val_acc"],
                     "test_acc": rec["test_acc"],
                     "val_ok": rec["val_acc"] >= target["val"] - 1e-12,
                     "meets": rec["test_acc"] >= target["test"] - 1e-12,
                     "seconds": rec["seconds"], "cpu_seconds": rec["cpu_seconds"], **extra})
    return rows


def _reduce(rmap: ResilienceMap, run: ChipRun, rate: float, max_drop: float,
            target_val: float, by_damage: bool = False) -> tuple[dict, dict]:
    """Reduce (``by_damage``: reduce-crit, placed on the map by its FAP-only accuracy)."""
    eps = rmap.epochs
    if by_damage:
        choice = rmap.choose_by_damage(run.at(0.0)["val_acc"], max_drop)
    else:
        choice = rmap.choose(rate, max_drop)
    tried = reduce_steps(choice.index, eps, lambda e: run.at(e)["val_acc"], target_val)
    rec = dict(run.at(eps[tried[-1]]))
    # charged: training up to the amount kept, plus one validation pass per amount it
    # measured (reduce-crit also measures the FAP-only chip)
    measured = sorted({*tried, *([0] if by_damage else [])})
    rec["seconds"] = rec["train_seconds"] + sum(run.at(eps[i])["val_seconds"]
                                                for i in measured)
    rec["cpu_seconds"] = rec["train_cpu_seconds"] + sum(run.at(eps[i])["val_cpu_seconds"]
                                                        for i in measured)
    return rec, {"chosen": choice.epochs, "reason": choice.reason,
                 "predicted": choice.predicted, "tried": [eps[i] for i in tried],
                 "step_ups": len(tried) - 1}


def _remap(cfg: RetrainConfig, ctx: FapContext, name: str, chip: ChipMap) -> dict:
    from hasched.study.remap import remap_chip

    res = remap_chip(ctx, chip, cfg.remap_searcher, cfg.remap_config,
                     derive_seed("remap", ctx.study.fine_tune.seed, name), cfg.remap_images)
    return {**res, "epochs": 0.0, "steps": 0}


def run_retrain(cfg: RetrainConfig, out: str | Path, ctx_loader: Callable[[], FapContext], *,
                log: Callable[[str], None] | None = None, progress: bool = True,
                max_cells: int | None = None) -> dict:
    """Runs (or resumes) every chip under every policy into ``out``; writes the tables.

    Returns:
        The summary (what ``summary.json`` holds); ``complete`` is False after a
        ``max_cells`` interruption.
    """
    cfg.validate()
    check_grid_dir(out, KIND, cfg.identity())
    ctx = ctx_loader()
    chips = dict(cfg.chips)

    def cell_fn(cell: GridCell) -> list[dict]:
        return _chip_rows(cfg, ctx, cell.params["chip"], chips[cell.params["chip"]], progress)

    cells = cfg.cells()
    rows = run_grid(out, KIND, cfg.identity(), cells, cell_fn, log=log, progress=progress,
                    max_cells=max_cells)
    summary = summarize_policies(rows, [p.name for p in cfg.expanded()],
                                 {"val": ctx.clean_val, "test": ctx.clean_test}, cfg.max_drop)
    summary["complete"] = len({r["chip"] for r in rows}) == len(cells)
    summary["study"] = cfg.study.identity()
    summary["verify_margin"] = cfg.verify_margin
    if summary["complete"]:
        _write_tables(out, rows, summary)
    return summary


def summarize_policies(rows: list[dict], policies: list[str], clean: dict,
                       max_drop: float) -> dict:
    """Per policy: yield (overall and per faulty-PE rate), summed costs, accuracy drops."""
    out = {"hasched": "retrain-summary", "clean": clean, "max_drop": max_drop,
           "policies": {}}
    for name in policies:
        mine = [r for r in rows if r["policy"] == name]
        if not mine:
            continue
        drops = [100.0 * (clean["test"] - r["test_acc"]) for r in mine]
        by_rate: dict[str, list[bool]] = {}
        for r in mine:
            by_rate.setdefault(f"{r['rate']:.4g}", []).append(bool(r["meets"]))
        out["policies"][name] = {
            "chips": len(mine), "yield": sum(r["meets"] for r in mine) / len(mine),
            "yield_by_rate": {k: sum(v) / len(v) for k, v in by_rate.items()},
            "total_epochs": sum(r["cost_epochs"] for r in mine),
            "total_steps": sum(r["steps"] for r in mine),
            "total_seconds": sum(r["seconds"] for r in mine),
            "total_cpu_seconds": sum(r["cpu_seconds"] for r in mine),
            "mean_drop": sum(drops) / len(drops), "worst_drop": max(drops),
            "step_ups": sum(r.get("step_ups", 0) for r in mine)}
    return out


def hindsight_bound(rows: list[dict]) -> dict | None:
    """What a per-chip oracle would pay: each chip gets the smallest amount (``none`` or a
    ``fixed:E`` of the run) that meets the constraint *on the test images*.

    Not a policy (it reads the yield images); it bounds what any amount-selection policy
    could save at that yield on these chips with these amounts. A chip that no amount
    brings within the constraint counts as a miss and is charged nothing (retraining it
    would not change the yield), so the total is a lower bound.

    Args:
        rows: Rows with ``chip``, ``policy``, ``cost_epochs`` and ``meets``
            (``retrain.csv``'s columns, typed).

    Returns:
        ``{"chips", "yield", "total_epochs", "amounts": {chip: epochs or None}}``, or None
        when the rows hold no ``fixed:E`` amount to choose from.
    """
    per_chip: dict[str, list[tuple[float, dict]]] = {}
    for r in rows:
        name = r["policy"]
        if name == "none" or name.startswith("fixed:"):
            amount = 0.0 if name == "none" else float(name.split(":", 1)[1])
            per_chip.setdefault(r["chip"], []).append((amount, r))
    if not any(a > 0 for runs in per_chip.values() for a, _ in runs):
        return None
    total, met, amounts = 0.0, 0, {}
    for chip, runs in per_chip.items():
        runs.sort(key=lambda ar: ar[0])
        first = next(((a, r) for a, r in runs if r["meets"]), None)
        total += 0.0 if first is None else first[1]["cost_epochs"]
        met += first is not None
        amounts[chip] = None if first is None else first[0]
    return {"chips": len(per_chip), "yield": met / len(per_chip), "total_epochs": total,
            "amounts": amounts}


def _write_tables(out: str | Path, rows: list[dict], summary: dict) -> None:
    """``retrain.csv`` (deterministic), ``costs.csv`` (wall times), ``summary.json``."""
    out = Path(out)
    head = ["chip", "rate", "faulty_pes", "policy", "epochs", "steps", "cost_epochs",
            "val_acc", "test_acc", "val_ok", "meets", "chosen", "reason", "tried"]
    lines = [",".join(head)]
    for r in rows:
        tried = " ".join(f"{e:g}" for e in r.get("tried", []))
        chosen = r.get("chosen")
        lines.append(",".join([
            r["chip"], f"{r['rate']:.6f}", str(r["faulty_pes"]), r["policy"],
            f"{r['epochs']:g}", str(r["steps"]), f"{r['cost_epochs']:.6f}",
            f"{r['val_acc']:.6f}", f"{r['test_acc']:.6f}", str(int(r["val_ok"])),
            str(int(r["meets"])), "" if chosen is None else f"{chosen:g}",
            r.get("reason", ""), tried]))
    atomic_write(out / TABLE_NAME, "\n".join(lines) + "\n")
    costs = ["chip,policy,cost_epochs,seconds,cpu_seconds"] + [
        f"{r['chip']},{r['policy']},{r['cost_epochs']:.6f},{r['seconds']:.3f},"
        f"{r['cpu_seconds']:.3f}" for r in rows]
    atomic_write(out / "costs.csv", "\n".join(costs) + "\n")
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
