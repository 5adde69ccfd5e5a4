"""``hasched reuse``: reuse rate, MACs, wall-clock and accuracy of bit allocations on frames.

The sequences of a frames file are split: the first ``calib_sequences`` are the
*calibration set* (Mquans spends its accuracy budget there; every frame counts as one
image), the others the *evaluation set*, run as streams through the reuse engine. Each bit
setting (``uniform`` b bits, or ``mquans`` with a budget) is one cell of a resumable grid.

Metrics per setting, on the evaluation set: accuracy of the reuse engine (top-1 of every
frame against its sequence's label) and its drop against the unquantised fp32 model on the
same frames (points); the dense quantised model's accuracy and how many predictions the
engine's delta updates changed against it (float64 rounding; expected 0); reuse rate (input
elements unchanged on delta frames) per layer and pooled; MACs saved and the speed-up as a
MAC ratio (dense / performed; first frames are dense); wall-clock of the engine and of the
dense fp32 model, frame by frame over the same streams (measured on this machine and
reported as is: the engine's gathers and scatters are not free on a CPU). No energy column:
an energy figure would need a validated model of the reuse buffers' memory traffic, which
this simulator does not have.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hasched.errors import HaschedError
from hasched.io import atomic_write, make_dirs
from hasched.reuse.allocate import RANKS, greedy_allocation, per_mac
from hasched.reuse.engine import KERNELS, ReuseEngine
from hasched.reuse.quant import LayerQuantizer, LayerSpec, calibrate, neuron_axis, uniform_bits
from hasched.study.criticality import CRITICALITY_FILE, load_criticality, load_study_model
from hasched.study.grid import GridCell, check_grid_dir, run_grid
from hasched.zoo.frames import FrameSet, frames_to_tensor, load_frames

__all__ = ["BitSetting", "ReuseSettings", "run_reuse", "acceptance"]

_ROW_KEYS = ["setting", "method", "bits", "budget", "mean_bits", "mac_mean_bits",
             "calib_drop", "evaluations", "accuracy", "accuracy_quant", "mismatches", "drop",
             "reuse_rate", "mac_savings", "speedup", "macs_done", "macs_dense",
             "seconds_engine", "seconds_fp32"]


@dataclass(frozen=True)
class BitSetting:
    """``uniform`` (every neuron at ``bits``) or ``mquans`` (greedy, within ``budget``)."""

    method: str
    bits: int = 0
    budget: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in ("uniform", "mquans"):
            raise HaschedError(f"bit setting must be uniform or mquans, got {self.method!r}")
        if self.method == "uniform" and not 1 <= self.bits <= 16:
            raise HaschedError(f"uniform bits must be 1..16, got {self.bits}")
        if self.method == "mquans" and self.budget < 0:
            raise HaschedError(f"the Mquans budget must be >= 0 points, got {self.budget}")

    @property
    def key(self) -> str:
        return f"uniform-{self.bits}" if self.method == "uniform" else f"mquans-{self.budget:g}"


@dataclass(frozen=True)
class ReuseSettings:
    """What ``hasched reuse`` computes.

    Attributes:
        model: ``ModelRef.to_dict()``. seed: Model seed. frames: Frames file or folder.
        settings: The bit settings (grid cells, in order).
        layers: Layers that reuse (empty: every Linear/Conv layer).
        calib_sequences: Leading sequences used as the calibration set (without
            ``calib_frames``).
        calib_frames: Frames file or folder whose every frame is the calibration set; then
            every sequence of ``frames`` is evaluated (``calib_sequences`` is ignored). Make
            it like the evaluation frames from held-out images (``hasched frames --exclude``):
            the frames of one sequence share a source image, so a few leading sequences hold
            few samples and a budget of a fraction of a point is within their noise; training
            images understate the drop (memorised), single frames overstate it (shifted more
            often than a bouncing sequence's frames).
        refresh: A dense frame every ``refresh`` frames (0: only the first).
        kernel: Delta products ``sparse`` or ``dense`` (timing only; same MACs counted).
        bits_min, bits_max: Mquans' bit range.
        criticality: Criticality folder (needed by ``mquans``).
        calibration_images: Training images for the quantiser ranges.
        rank: Mquans' ranking key, ``per-mac`` (default) or ``criticality``
            (:mod:`hasched.reuse.allocate`).
    """

    model: dict
    seed: int
    frames: str
    settings: tuple[BitSetting, ...]
    layers: tuple[str, ...] = ()
    calib_sequences: int = 50
    refresh: int = 0
    kernel: str = "sparse"
    bits_min: int = 2
    bits_max: int = 8
    criticality: str | None = None
    calibration_images: int = 512
    calib_frames: str | None = None
    rank: str = "per-mac"

    def __post_init__(self) -> None:
        if self.rank not in RANKS:
            raise HaschedError(f"rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if not self.settings:
            raise HaschedError("no bit setting given")
        if len({b.key for b in self.settings}) != len(self.settings):
            raise HaschedError("a bit setting is listed twice")
        if self.kernel not in KERNELS or self.refresh < 0:
            raise HaschedError(f"need kernel in {KERNELS} and refresh >= 0")
        if self.calib_frames is None and self.calib_sequences < 1:
            raise HaschedError("need calib sequences >= 1 (or a calibration frames file)")
        if not 1 <= self.bits_min <= self.bits_max <= 16:  # else the first mquans cell fails
            raise HaschedError(f"need 1 <= --bits-min <= --bits-max <= 16, got "
                               f"{self.bits_min}..{self.bits_max}")
        if any(b.method == "mquans" for b in self.settings) and not self.criticality:
            raise HaschedError("mquans needs a criticality table (--criticality DIR, from "
                               "`hasched criticality`)")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _frames_id(fs: FrameSet) -> dict:
    return {"header": fs.header, "sha256": hashlib.sha256(fs.frames.tobytes()).hexdigest()[:16]}


def _config(s: ReuseSettings, fs: FrameSet, cal: FrameSet | None, crit_id: str | None) -> dict:
    d = asdict(s)
    d["settings"] = [b.key for b in s.settings]
    d["layers"] = list(s.layers)
    d["frames"] = _frames_id(fs)
    # the defaults leave no trace, so runs made before these options existed still resume
    if cal is None:
        del d["calib_frames"]
    else:
        d["calib_frames"], d["calib_sequences"] = _frames_id(cal), 0
    if s.rank == "criticality":  # the only ranking before the option existed
        del d["rank"]
    d["criticality"] = crit_id
    return d


def _as_input(frames: torch.Tensor, adapter) -> torch.Tensor:
    """``(S, L, 1, H, W)`` -> ``(S, L, C, H', W')`` as the model expects."""
    S, L = frames.shape[:2]
    return adapter(frames.reshape(S * L, *frames.shape[2:])).reshape(S, L, -1,
                                                                   *adapter.target[1:])


def _accuracy(net, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    with torch.no_grad():
        pred = torch.cat([net(x[i:i + batch]).argmax(-1) for i in range(0, x.shape[0], batch)])
    return float((pred == y).double().mean())


def _time_dense(net, frames: torch.Tensor) -> float:
    """Wall-clock of the dense model over the streams, frame by frame (as the engine runs)."""
    seconds = 0.0
    with torch.no_grad():
        for t in range(frames.shape[1]):
            x = frames[:, t].contiguous()
            t0 = time.perf_counter()
            net(x)
            seconds += time.perf_counter() - t0
    return seconds


class _Study:
    """The loaded model, data and baselines every cell of one reuse run shares."""

    def __init__(self, s: ReuseSettings, fs: FrameSet, cal: FrameSet | None, net, ref, layers,
                 calib_x) -> None:
        from hasched.zoo.ref import adapter_for

        self.s, self.net = s, net
        self.specs: dict[str, LayerSpec] = calibrate(net, layers, calib_x)
        mods = dict(net.named_modules())
        self.axes = {n: neuron_axis(mods[n]) for n in layers}
        adapter = adapter_for(ref, net)
        frames = _as_input(frames_to_tensor(fs.frames), adapter)  # (S, L, C, H, W)
        labels = torch.from_numpy(fs.labels.astype("int64"))
        C, L = (0, fs.length) if cal is not None else (s.calib_sequences, fs.length)
        if cal is None:
            self.cal_x = frames[:C].reshape(C * L, *frames.shape[2:])  # (C*L, C, H, W)
            self.cal_y = labels[:C].repeat_interleave(L)
        else:
            cx = _as_input(frames_to_tensor(cal.frames), adapter)  # (S', L', C, H, W)
            self.cal_x = cx.reshape(-1, *cx.shape[2:])
            self.cal_y = torch.from_numpy(cal.labels.astype("int64")).repeat_interleave(
                cal.length)
        self.ev_frames, self.ev_labels = frames[C:], labels[C:]
        ev_flat = self.ev_frames.reshape(-1, *frames.shape[2:])
        self.fp32_cal = _accuracy(net, self.cal_x, self.cal_y)
        self.fp32_eval = _accuracy(net, ev_flat, self.ev_labels.repeat_interleave(L))
        self.engine = ReuseEngine(net, self.quantizers(uniform_bits(self.specs, s.bits_max)),
                                  s.refresh, s.kernel)

    def quantizers(self, bits: dict[str, torch.Tensor]) -> dict[str, LayerQuantizer]:
        return {n: LayerQuantizer(sp, bits[n], self.axes[n]) for n, sp in self.specs.items()}

    def set_bits(self, bits: dict[str, torch.Tensor]) -> None:
        for n, q in self.quantizers(bits).items():
            self.engine.layers[n].quant = q

    def calib_drop(self, bits: dict[str, torch.Tensor]) -> float:
        """Accuracy drop (points) of the quantised model on the calibration frames."""
        self.set_bits(bits)
        self.engine.reset("quant")
        return 100 * (self.fp32_cal - _accuracy(self.engine.model, self.cal_x, self.cal_y))

    def mean_bits(self, bits: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Neuron-weighted and MAC-weighted mean bits."""
        n = sum(int(b.numel()) for b in bits.values())
        mean = sum(float(b.sum()) for b in bits.values()) / n
        w = {k: self.specs[k].macs_per_neuron for k in bits}
        tot = sum(w[k] * bits[k].numel() for k in bits)
        mac = sum(w[k] * float(bits[k].sum()) for k in bits) / tot if tot else mean
        return mean, mac


def _evaluate(st: _Study, bits: dict[str, torch.Tensor]) -> dict:
    """Engine (delta) and dense quantised runs over the evaluation streams."""
    eng, L = st.engine, st.ev_frames.shape[1]
    st.set_bits(bits)
    q_logits, _ = eng.run(st.ev_frames, "quant")
    logits, seconds = eng.run(st.ev_frames, "delta")
    labels = st.ev_labels[:, None].expand(-1, L)
    pred, qpred = logits.argmax(-1), q_logits.argmax(-1)
    tot = eng.totals()
    acc = float((pred == labels).double().mean())
    layers = {n: {"reuse_rate": v.reuse_rate, "mac_savings": v.mac_savings,
                  "mean_bits": float(bits[n].double().mean()), "macs_done": v.macs_done,
                  "macs_dense": v.macs_dense} for n, v in eng.stats.items()}
    return {"accuracy": acc, "accuracy_quant": float((qpred == labels).double().mean()),
            "mismatches": int((pred != qpred).sum()), "drop": 100 * (st.fp32_eval - acc),
            "reuse_rate": tot.reuse_rate, "mac_savings": tot.mac_savings,
            "speedup": tot.macs_dense / max(1, tot.macs_done), "macs_done": tot.macs_done,
            "macs_dense": tot.macs_dense, "seconds_engine": seconds,
            "seconds_fp32": _time_dense(st.net, st.ev_frames), "layers": layers}


def run_reuse(out: str | Path, s: ReuseSettings, *, models_dir=None, data_dir=None,
              train: bool = False, log: Callable[[str], None] | None = None,
              progress: bool = True) -> dict:
    """Runs (or resumes) every bit setting into ``out``; writes tables, figures, summary."""
    fs = load_frames(s.frames)
    from hasched.zoo.ref import ModelRef

    ref = ModelRef.from_dict(s.model)
    if fs.header.get("dataset") != ref.dataset:
        raise HaschedError(f"the frames are made from {fs.header.get('dataset')!r}, the model "
                           f"{ref.name} is for {ref.dataset!r}; make frames of its dataset")
    cal_fs = load_frames(s.calib_frames) if s.calib_frames else None
    if cal_fs is not None and cal_fs.header.get("dataset") != fs.header.get("dataset"):
        raise HaschedError(f"the calibration frames are made from "
                           f"{cal_fs.header.get('dataset')!r}"
                           f", the frames from {fs.header.get('dataset')!r}")
    if cal_fs is None and fs.n_sequences <= s.calib_sequences:
        raise HaschedError(f"{fs.n_sequences} sequences leave none for evaluation after "
                           f"{s.calib_sequences} calibration sequences")
    crit_id = None
    if s.criticality:
        load_criticality(s.criticality)  # a bad table fails before the model is loaded
        crit_id = _sha(Path(s.criticality) / CRITICALITY_FILE)
    config = _config(s, fs, cal_fs, crit_id)
    check_grid_dir(out, "reuse", config)
    net, ref, layers, x, _ = load_study_model(
        s.model, s.seed, models_dir=models_dir, data_dir=data_dir, train=train,
        calibration_images=s.calibration_images, layers=s.layers, log=log)
    st = _Study(s, fs, cal_fs, net, ref, layers, x)
    crit = load_criticality(s.criticality, st.specs)[1] if s.criticality else None
    out = Path(out)

    def cell_rows(cell: GridCell) -> list[dict]:
        b = next(b for b in s.settings if b.key == cell.key)
        alloc = None
        if b.method == "uniform":
            bits = uniform_bits(st.specs, b.bits)
            cal = st.calib_drop(bits)
        else:
            keys = crit if s.rank == "criticality" else per_mac(
                crit, {n: sp.macs_per_neuron for n, sp in st.specs.items()})
            alloc = greedy_allocation(keys, st.calib_drop, b.budget, s.bits_max, s.bits_min,
                                      log=log)
            bits, cal = alloc.bits, alloc.drop
            make_dirs(out / "allocations")
            atomic_write(out / "allocations" / f"{b.key}.json",
                         json.dumps(alloc.to_dict()) + "\n")
        mean, mac_mean = st.mean_bits(bits)
        row = {"setting": b.key, "method": b.method, "bits": b.bits or None,
               "budget": b.budget if b.method == "mquans" else None, "mean_bits": mean,
               "mac_mean_bits": mac_mean, "calib_drop": cal,
               "evaluations": alloc.evaluations if alloc else 1, **_evaluate(st, bits)}
        return [row]

    cells = [GridCell(b.key, {"method": b.method, "bits": b.bits, "budget": b.budget})
             for b in s.settings]
    rows = run_grid(out, "reuse", config, cells, cell_rows, log=log, progress=progress)
    return _write_outputs(out, rows, st, s)


def acceptance(rows: list[dict], budget: float) -> dict:
    """Mquans at ``budget`` against the best uniform width within the same drop.

    "Best uniform" is the uniform setting with the most MACs saved among those whose drop
    on the evaluation frames is at most ``budget`` (chosen on the test frames, which favours
    the baseline); also reported: the one chosen by calibration drop. ``best_mquans`` is
    the Mquans setting (any budget) chosen the same way, and ``best_mquans_higher`` says
    whether it saves more MACs and reuses more than the best uniform at that accuracy.
    """
    uni = [r for r in rows if r["method"] == "uniform"]
    mq = next((r for r in rows if r["method"] == "mquans" and r["budget"] == budget), None)
    best = max((r for r in uni if r["drop"] <= budget), key=lambda r: r["mac_savings"],
               default=None)
    best_cal = max((r for r in uni if r["calib_drop"] <= budget),
                   key=lambda r: r["mac_savings"], default=None)
    # the same selection for Mquans, so that both sides are chosen on the evaluation frames
    best_mq = max((r for r in rows if r["method"] == "mquans" and r["drop"] <= budget),
                  key=lambda r: r["mac_savings"], default=None)
    res = {"budget": budget, "best_uniform": best and best["setting"],
           "best_uniform_by_calibration": best_cal and best_cal["setting"],
           "mquans": mq and mq["setting"], "best_mquans": best_mq and best_mq["setting"]}
    if best_mq is not None and best is not None:
        res["best_mquans_higher"] = bool(best_mq["mac_savings"] > best["mac_savings"]
                                         and best_mq["reuse_rate"] > best["reuse_rate"])
    if mq is not None and best is not None:
        res.update(
            mquans_within_budget=mq["drop"] <= budget,
            mac_savings=[mq["mac_savings"], best["mac_savings"]],
            reuse_rate=[mq["reuse_rate"], best["reuse_rate"]],
            drop=[mq["drop"], best["drop"]],
            higher_reuse=bool(mq["drop"] <= budget and mq["mac_savings"] > best["mac_savings"]
                              and mq["reuse_rate"] > best["reuse_rate"]))
    return res


def _csv(rows: list[dict], keys: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _write_outputs(out: Path, rows: list[dict], st: _Study, s: ReuseSettings) -> dict:
    from hasched.report.reuse import plot_layer_reuse, plot_pareto, summary_markdown

    atomic_write(out / "results.csv", _csv(rows, _ROW_KEYS))
    per_layer = [{"setting": r["setting"], "layer": n, **v} for r in rows
                 for n, v in r["layers"].items()]
    atomic_write(out / "layers.csv", _csv(per_layer, ["setting", "layer", "reuse_rate",
                                                      "mac_savings", "mean_bits", "macs_done",
                                                      "macs_dense"]))
    budgets = sorted({r["budget"] for r in rows if r["method"] == "mquans"})
    checks = [acceptance(rows, b) for b in budgets]
    summary = {"fp32_accuracy_eval": st.fp32_eval, "fp32_accuracy_calibration": st.fp32_cal,
               "eval_sequences": int(st.ev_frames.shape[0]), "length": int(
                   st.ev_frames.shape[1]), "calib_frames": int(st.cal_x.shape[0]),
               "specs": {n: sp.to_dict() for n, sp in st.specs.items()},
               "rows": rows, "acceptance": checks}
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    name = s.model["name"]
    plot_pareto(rows, out / "pareto.png", st.fp32_eval, 0.5 if 0.5 in budgets else (
        budgets[0] if budgets else None),
                f"{name} seed {s.seed}: accuracy vs MACs saved by reuse")
    plot_layer_reuse(rows, out / "reuse_layers.png", f"{name}: reuse rate per layer")
    atomic_write(out / "summary.md", summary_markdown(summary, s))
    return summary
