"""Figures of the reuse study: frame previews, criticality per layer, the Pareto front."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hasched.io import atomic_write  # noqa: E402
from hasched.report.search import save_figure  # noqa: E402

__all__ = ["frame_strip", "frame_gif", "plot_criticality", "plot_pareto", "plot_layer_reuse"]


def _tile(frames: np.ndarray, rows: int, cols: int, scale: int = 2, gap: int = 2
          ) -> np.ndarray:
    """``(S, L, H, W)`` uint8 -> one grey image of ``rows`` sequences x ``cols`` frames."""
    S, L, H, W = frames.shape
    rows, cols = min(rows, S), min(cols, L)
    h, w = H * scale, W * scale
    img = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), 128, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            f = frames[r, c].repeat(scale, 0).repeat(scale, 1)
            img[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = f
    return img


def frame_strip(frames: np.ndarray, path: str | Path, rows: int = 6, cols: int = 15) -> Path:
    """A PNG of the first ``rows`` sequences, ``cols`` frames each (one row per sequence)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_tile(frames, rows, cols)).save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


def frame_gif(frames: np.ndarray, path: str | Path, rows: int = 2, cols: int = 4,
              ms_per_frame: int = 120) -> Path:
    """An animated GIF of the first ``rows * cols`` sequences side by side."""
    from PIL import Image

    S, L = frames.shape[:2]
    n = min(S, rows * cols)
    shown = np.zeros((rows * cols, L) + frames.shape[2:], dtype=np.uint8)
    shown[:n] = frames[:n]
    pics = []
    for t in range(L):
        grid = shown[:, t].reshape(rows, cols, *frames.shape[2:])  # (rows, cols, H, W)
        pics.append(Image.fromarray(_tile(grid, rows, cols)))
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=ms_per_frame,
                 loop=0)
    return atomic_write(path, buf.getvalue())


def plot_criticality(crit: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Per layer: neurons' criticality in index order (bars or dots) and sorted (line)."""
    n = len(crit)
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.1 * n + 0.6), squeeze=False)
    for i, (layer, c) in enumerate(crit.items()):
        ax, ax2 = axes[i]
        c = np.asarray(c, dtype=float)
        floor = max(float(c[c > 0].min()) if (c > 0).any() else 1e-12, 1e-12)
        shown = np.maximum(c, floor)
        if c.size <= 64:
            ax.bar(np.arange(c.size), shown, color="tab:blue")
        else:
            ax.plot(np.arange(c.size), shown, ".", ms=1.5, color="tab:blue")
        ax.set_yscale("log")
        ax.set_ylabel(f"{layer}\nKL", fontsize=8)
        ax.set_xlabel("neuron index", fontsize=7)
        ax2.plot(np.sort(shown)[::-1], color="tab:red")
        ax2.set_yscale("log")
        ax2.set_xlabel("rank", fontsize=7)
        ax2.set_title(f"{layer}: {c.size} neurons, median {np.median(c):.2e}, max "
                      f"{c.max():.2e}", fontsize=7)
        for a in (ax, ax2):
            a.tick_params(labelsize=6)
            a.grid(alpha=0.3)
    fig.suptitle(title or "neuron criticality (KL of outputs when perturbed)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_pareto(rows: list[dict], path: str | Path, fp32_accuracy: float, budget: float | None,
                title: str = "") -> Path:
    """Accuracy against MAC savings: uniform bit widths (line) and Mquans (stars).

    The y axis shows the few points below fp32 where the comparison happens (at least 3,
    or 4 budgets); a setting below that window is drawn on its lower edge as a triangle
    labelled with its accuracy, so that 1 or 2 bits do not flatten everything else.
    """
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    budgets = [r["budget"] for r in rows if r["method"] == "mquans"] + [budget or 0]
    top = 100 * fp32_accuracy + 0.6
    floor = 100 * fp32_accuracy - max(3.0, 4 * max(budgets))

    def y(r: dict) -> float:
        return max(100 * r["accuracy"], floor)

    uni = sorted((r for r in rows if r["method"] == "uniform"), key=lambda r: r["bits"])
    mq = sorted((r for r in rows if r["method"] == "mquans"), key=lambda r: r["budget"])
    if uni:
        ax.plot([100 * r["mac_savings"] for r in uni], [y(r) for r in uni], "-",
                color="tab:blue", label="uniform bits")
        for r in uni:
            below = 100 * r["accuracy"] < floor
            ax.plot(100 * r["mac_savings"], y(r), "v" if below else "o", color="tab:blue")
            text = f"{r['bits']}b" + (f" ({100 * r['accuracy']:.1f} %)" if below else "")
            ax.annotate(text, (100 * r["mac_savings"], y(r)), textcoords="offset points",
                        xytext=(4, 5 if below else -10), fontsize=7)
    if mq:
        ax.plot([100 * r["mac_savings"] for r in mq], [y(r) for r in mq], "*", ms=12,
                color="tab:red", label="Mquans (criticality bits)")
        for i, r in enumerate(mq):  # alternate above/below: budgets often land close
            ax.annotate(f"budget {r['budget']:g}", (100 * r["mac_savings"], y(r)),
                        textcoords="offset points", xytext=(-10, 8 if i % 2 == 0 else -14),
                        fontsize=7, color="tab:red")
    ax.axhline(100 * fp32_accuracy, color="k", lw=0.8, label="fp32 (no reuse)")
    if budget is not None:
        ax.axhline(100 * fp32_accuracy - budget, color="k", lw=0.8, ls="--",
                   label=f"fp32 - {budget:g} points")
    ax.set_xlabel("MACs saved by reuse (%)")
    ax.set_ylabel("top-1 accuracy on the sequences (%)")
    ax.set_ylim(floor - 0.3, top)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_layer_reuse(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Reuse rate per layer (grouped bars), one bar per setting."""
    layers = list(rows[0]["layers"]) if rows else []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        vals = [100 * r["layers"][n]["reuse_rate"] for n in layers]
        ax.bar(np.arange(len(layers)) + i * width, vals, width, label=r["setting"])
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers)
    ax.set_ylabel("inputs unchanged (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "reuse rate per layer", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return save_figure(fig, path)


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}"


def summary_markdown(summary: dict, s) -> str:
    """``summary.md`` of a reuse run: settings table, per-layer reuse and the acceptance."""
    rows = summary["rows"]
    lines = [f"# Computation reuse: {s.model['name']} seed {s.seed}", "",
             f"Evaluation: {summary['eval_sequences']} sequences x {summary['length']} frames "
             f"(streams); calibration: {summary['calib_frames']} frames ("
             + (f"`{s.calib_frames}`" if getattr(s, "calib_frames", None) else
                f"the first {s.calib_sequences} sequences")
             + f"). fp32 accuracy on the evaluation frames "
             f"{100 * summary['fp32_accuracy_eval']:.2f} %, on the calibration frames "
             f"{100 * summary['fp32_accuracy_calibration']:.2f} %. Refresh: "
             f"{s.refresh or 'first frame only'}; kernel {s.kernel}.", "",
             "| setting | mean bits (MAC-weighted) | calib drop | accuracy % | drop (points) "
             "| reuse % | MACs saved % | speed-up (MAC ratio) | engine s | fp32 s | "
             "delta vs quant mismatches |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['mean_bits']:.2f} ({r['mac_mean_bits']:.2f}) | "
            f"{r['calib_drop']:.2f} | {100 * r['accuracy']:.2f} | {r['drop']:.2f} | "
            f"{_pct(r['reuse_rate'])} | {_pct(r['mac_savings'])} | {r['speedup']:.2f}x | "
            f"{r['seconds_engine']:.2f} | {r['seconds_fp32']:.2f} | {r['mismatches']} |")
    layers = list(rows[0]["layers"]) if rows else []
    lines += ["", "Reuse rate per layer (% of input elements unchanged on delta frames):", "",
              "| setting | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for r in rows:
        lines.append(f"| {r['setting']} | " + " | ".join(
            _pct(r["layers"][n]["reuse_rate"]) for n in layers) + " |")
    for a in summary["acceptance"]:
        lines += ["", f"## Mquans at a budget of {a['budget']:g} points", ""]
        if "higher_reuse" not in a:
            lines.append(f"No comparison: best uniform {a['best_uniform']}, Mquans "
                         f"{a['mquans']}.")
            continue
        lines.append(
            f"Best uniform width within {a['budget']:g} points on the evaluation frames: "
            f"{a['best_uniform']} (by calibration drop: {a['best_uniform_by_calibration']}). "
            f"Mquans: drop {a['drop'][0]:.2f} vs {a['drop'][1]:.2f} points, MACs saved "
            f"{_pct(a['mac_savings'][0])} % vs {_pct(a['mac_savings'][1])} %, reuse rate "
            f"{_pct(a['reuse_rate'][0])} % vs {_pct(a['reuse_rate'][1])} %: "
            f"**{'higher reuse at equal accuracy' if a['higher_reuse'] else 'not higher'}**.")
        if a.get("best_mquans"):
            lines.append(
                f"\nThe Mquans setting with the most MACs saved among those within "
                f"{a['budget']:g} points on the evaluation frames (chosen like the uniform "
                f"one): {a['best_mquans']}, "
                f"**{'higher' if a['best_mquans_higher'] else 'not higher'}** than "
                f"{a['best_uniform']}.")
    lines += ["", "Figures: `pareto.png` (accuracy vs MACs saved), `reuse_layers.png`. "
              "Wall-clock is this machine's, frame by frame over all streams at once."]
    return "\n".join(lines) + "\n"
