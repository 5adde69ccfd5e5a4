"""The benchmark suite behind ``hasched bench`` / ``make bench``.

Times clean and faulty inference in the same run and reports ratios, so numbers from
different machines stay comparable. Entry names are stable paths:
``eval/<model>/<layer>/<error>/<rate>``, ``fitness/...``, ``generation/...``,
``sensitivity/...``. Speed targets live here, never in unit tests.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hasched.sim.evaluator import FaultyEvaluator
from hasched.sim.faults import PAPER_FR_MAX, create_error_model
from hasched.sim.hardware import AcceleratorConfig, FaultProfile
from hasched.sim.layers import weight_layer_names
from hasched.study.build import load_images, resolve_device
from hasched.zoo.models import create_model
from hasched.zoo.train import CheckpointNotFoundError, load_checkpoint

__all__ = ["BenchConfig", "is_bench_markdown", "run_bench", "to_markdown"]


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark.

    Attributes:
        model: Registered model name.
        images: Test-image range (the search images by default: 4,880 of them).
        device: ``cpu``, ``cuda`` or ``auto``.
        filter: Only entries whose name contains this substring.
        population: GA population for the generation entry.
        repeats: Repeats per fitness evaluation.
        warmup: Untimed runs before each timing.
        trials: Timed runs; the median is reported.
    """

    model: str = "mnist32-cnn"
    images: str = "5120:"
    device: str = "cpu"
    filter: str = ""
    population: int = 20
    repeats: int = 3
    warmup: int = 1
    trials: int = 3


def _peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _time(fn: Callable[[], object], dev: torch.device, cfg: BenchConfig) -> float:
    for _ in range(cfg.warmup):
        fn()
    times = []
    for _ in range(cfg.trials):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


Entry = tuple[str, str, list[str], str, float, int, int]


def _entries(cfg: BenchConfig, layers: list[str]) -> Iterator[Entry]:
    """(kind, name, layers, error, rate, population, repeats) of every entry."""
    m = cfg.model
    for layer in layers:
        for err, rates in PAPER_FR_MAX.items():
            yield ("eval", f"eval/{m}/{layer}/{err}/{rates[-1]:g}", [layer], err, rates[-1], 1, 1)
    yield ("fitness", f"fitness/{m}/c0/flip-to-1/5e-3", ["c0"], "flip-to-1", 5e-3, 1,
           cfg.repeats)
    yield ("generation", f"generation/{m}/c0/flip-to-1/5e-3/pop{cfg.population}", ["c0"],
           "flip-to-1", 5e-3, cfg.population, cfg.repeats)
    yield ("sensitivity", f"sensitivity/{m}/h2/bf16/0.1,0.2,0.5", ["h2"], "bf16", -1.0, 1,
           cfg.repeats)


def run_bench(
    cfg: BenchConfig, log: Callable[[str], None] | None = None, model: torch.nn.Module | None = None
) -> list[dict]:
    """Runs the suite; returns ``[{name, device, seconds, clean_seconds, ratio, peak_mb}]``."""
    dev = resolve_device(cfg.device)
    if model is None:
        try:
            model, _ = load_checkpoint(cfg.model, 1)
        except CheckpointNotFoundError:
            if log:
                log(f"no {cfg.model} seed-1 checkpoint: benchmarking random weights")
            model = create_model(cfg.model)
    model = model.to(dev).eval()
    x, y, _ = load_images(cfg.model, cfg.images, device=dev)
    with torch.no_grad():
        clean = _time(lambda: model(x).argmax(-1), dev, cfg)
    results = [{"name": f"eval/{cfg.model}/clean", "device": str(dev), "seconds": clean,
                "clean_seconds": clean, "ratio": 1.0, "peak_mb": _peak_mb(dev)}]
    if log:
        log(f"clean inference of {x.shape[0]} images: {clean:.3f} s")
    acc = AcceleratorConfig()
    for kind, name, layers, err, rate, pop, reps in _entries(cfg, weight_layer_names(model)):
        if cfg.filter and cfg.filter not in name:
            continue
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        em = create_error_model(err)
        g = torch.Generator(device=dev).manual_seed(0)
        if kind == "sensitivity":
            evs = [FaultyEvaluator(model, x, y, layers, FaultProfile.generate(r, 1, acc), em,
                                   acc) for r in PAPER_FR_MAX[err]]
            secs = _time(lambda evs=evs, reps=reps, g=g: [e.accuracy(None, reps, g) for e in evs],
                         dev, cfg)
        else:
            prof = FaultProfile.generate(rate, 1, acc)
            ev = FaultyEvaluator(model, x, y, layers, prof, em, acc)
            n = ev.rows[layers[0]]
            perms = {layers[0]: torch.stack([torch.randperm(n, generator=torch.Generator()
                                                            .manual_seed(i))
                                             for i in range(pop)]).to(dev)}
            secs = _time(lambda ev=ev, perms=perms, reps=reps, g=g: ev.accuracy(perms, reps, g),
                         dev, cfg)
        row = {"name": name, "device": str(dev), "seconds": secs, "clean_seconds": clean,
               "ratio": secs / clean, "peak_mb": _peak_mb(dev)}
        results.append(row)
        if log:
            log(f"{name}: {secs:.3f} s ({secs / clean:.1f}x clean)")
    return results


MARKDOWN_HEADER = "| entry | device | seconds | clean s | ratio | peak MB |"


def is_bench_markdown(content: bytes) -> bool:
    """Whether a file is a table :func:`to_markdown` wrote (``--markdown`` may replace it)."""
    return content.startswith(MARKDOWN_HEADER.encode())


def to_markdown(rows: list[dict]) -> str:
    lines = [MARKDOWN_HEADER, "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['device']} | {r['seconds']:.3f} | "
                     f"{r['clean_seconds']:.3f} | {r['ratio']:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"
