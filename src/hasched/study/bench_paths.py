"""``make bench`` entries of the path cost model: one layer across FR_max, every path timed.

For each FR_max the chosen path (``auto``) runs beside every forced path on the same images;
the note says which path was chosen and how it compares with the fastest one. The issue's
claim to check: the chosen path is never more than 10 % slower than the best.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hasched.sim.evaluator import EvalConfig, FaultyEvaluator

__all__ = ["PATH_RATES", "path_rows"]

PATH_RATES = (1e-4, 1e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
_FORCED = {"incremental": EvalConfig(mode="sparse", incremental=True),
           "sparse": EvalConfig(mode="sparse", incremental=False),
           "dense": EvalConfig(mode="dense", incremental=False)}


def path_rows(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clean: float,
              time_fn: Callable[[Callable[[], object]], float], peak: Callable[[], float],
              layer: str = "h0", fault: str = "flip-to-1", repeats: int = 3,
              rates: tuple[float, ...] = PATH_RATES,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Rows ``path/<model>/<layer>/<fault>/<rate>/<path>`` (``clean`` is for ``x``)."""
    from hasched.study.scenario import Scenario

    rows = []
    for rate in rates:
        scn = Scenario(layers=(layer,), fault=fault, fr_max=rate, repeats=repeats)
        f, profile, _ = scn.fault_data()
        secs = {}
        for path, cfg in {**_FORCED, "auto": EvalConfig()}.items():
            ev = FaultyEvaluator(model, x, y, [layer], f, profile, calibration=x[:256],
                                 config=cfg)
            g = torch.Generator(device=x.device).manual_seed(0)
            secs[path] = time_fn(lambda ev=ev, g=g: ev.accuracy(None, repeats, g))
            taken = ev.last_path if path == "auto" else path
        best = min(secs[p] for p in _FORCED)
        chosen = "incremental" if taken == "incremental" else ev.layer_modes()[layer]
        for path, s in secs.items():
            note = (f"chosen: {chosen}; {s / best:.2f}x the fastest" if path == "auto"
                    else "fastest" if s == best else f"{s / best:.2f}x the fastest")
            rows.append({"name": f"path/mnist32-cnn/{layer}/{fault}/{rate:g}/{path}",
                         "device": str(x.device), "seconds": s, "clean_seconds": clean,
                         "ratio": s / clean, "peak_mb": peak(), "note": note})
            if log:
                log(f"{rows[-1]['name']}: {s:.3f} s ({note})")
    return rows
