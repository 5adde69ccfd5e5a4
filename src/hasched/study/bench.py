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
from hasched.sim.faults import PAPER_FR_MAX
from hasched.sim.layers import weight_layer_names
from hasched.study.build import load_images, resolve_device
from hasched.study.scenario import Scenario
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
        custom: An extra scenario to time (``scenario/...`` entry).
        path_images: Images of the path table (``path/...``: every path at every FR_max,
            the dense ones are slow on a CPU).
        ga: Time the paper's GA end to end (c0, population 20, 100 generations, 3
            repeats); ``None``: on CUDA only (about 17 minutes on 2 CPU cores).
    """

    model: str = "mnist32-cnn"
    images: str = "5120:"
    device: str = "cpu"
    filter: str = ""
    population: int = 20
    repeats: int = 3
    warmup: int = 1
    trials: int = 3
    custom: Scenario | None = None
    path_images: str = "5120:5608"
    ga: bool | None = None


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


@dataclass(frozen=True)
class Entry:
    """One benchmark: what is timed (``kind``) on which scenario.

    Kinds: ``eval`` (one faulty evaluation), ``fitness`` / ``generation`` (a GA fitness call
    for ``population`` schedules), ``sensitivity`` (one scenario at each of the paper's
    rates), ``forward`` (the accelerator's fault-free forward pass: the arithmetic alone).
    """

    kind: str
    name: str
    scenario: Scenario
    population: int = 1


def _entries(cfg: BenchConfig, layers: list[str]) -> Iterator[Entry]:
    m = cfg.model
    base = Scenario(model=m, repeats=1)
    for layer in layers:
        for err, rates in PAPER_FR_MAX.items():
            yield Entry("eval", f"eval/{m}/{layer}/{err}/{rates[-1]:g}",
                        base.replace(layers=(layer,), fault=err, fr_max=rates[-1]))
    fit = base.replace(layers=("c0",), fault="flip-to-1", fr_max=5e-3, repeats=cfg.repeats)
    yield Entry("fitness", f"fitness/{m}/c0/flip-to-1/5e-3", fit)
    yield Entry("generation", f"generation/{m}/c0/flip-to-1/5e-3/pop{cfg.population}", fit,
                cfg.population)
    yield Entry("sensitivity", f"sensitivity/{m}/h2/bf16/0.1,0.2,0.5",
                base.replace(layers=("h2",), fault="bf16", repeats=cfg.repeats))
    every = tuple(layers)
    for mult in ("exact", "drum4", "bam8", "mitchell"):
        yield Entry("forward", f"int8/{m}/all/{mult}",
                    base.replace(layers=every, arithmetic="int8", multiplier=mult, fr_max=0.0))
    if cfg.custom is not None:
        yield Entry("eval", f"scenario/{cfg.custom.describe()}", cfg.custom.replace(model=m))
    yield Entry("eval", f"chip/{m}/all/systolic16x16/int8/stuck-at/0.05",
                base.replace(layers=every, mapping="systolic:16x16", arithmetic="int8",
                             fault="stuck-at", faulty_pes=0.05, chip_seed=1))


def _evaluator(entry: Entry, model, x, y, calib) -> FaultyEvaluator:
    scn = entry.scenario
    fault, profile, chip = scn.fault_data()
    return FaultyEvaluator(model, x, y, list(scn.layers), fault, profile, chip=chip,
                           mapping=scn.mapping_obj(), arithmetic=scn.arithmetic_obj(),
                           calibration=calib)


def _timed(entry: Entry, model, x, y, dev, cfg: BenchConfig) -> float:
    g = torch.Generator(device=dev).manual_seed(0)
    scn = entry.scenario
    calib = x[:512]
    if entry.kind == "sensitivity":
        evs = [_evaluator(Entry("eval", "", scn.replace(fr_max=r)), model, x, y, calib)
               for r in PAPER_FR_MAX[scn.fault]]
        return _time(lambda: [e.accuracy(None, scn.repeats, g) for e in evs], dev, cfg)
    ev = _evaluator(entry, model, x, y, calib)
    if entry.kind == "forward":
        def fwd() -> None:
            ev.state.faults_on = False
            try:
                with torch.no_grad():
                    ev.suffix(ev.inputs)
            finally:
                ev.state.faults_on = True
        return _time(fwd, dev, cfg)
    perms = None
    if entry.population > 1:
        layer = scn.layers[0]
        n = ev.rows[layer]
        perms = {layer: torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))
                                     for i in range(entry.population)]).to(dev)}
    return _time(lambda: ev.accuracy(perms, scn.repeats, g), dev, cfg)


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
    for entry in _entries(cfg, weight_layer_names(model)):
        if cfg.filter and cfg.filter not in entry.name:
            continue
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        secs = _timed(entry, model, x, y, dev, cfg)
        results.append({"name": entry.name, "device": str(dev), "seconds": secs,
                        "clean_seconds": clean, "ratio": secs / clean, "peak_mb": _peak_mb(dev)})
        if log:
            log(f"{entry.name}: {secs:.3f} s ({secs / clean:.1f}x clean)")
    if not cfg.filter or "resnet18" in cfg.filter:
        results += _resnet_entries(cfg, dev, log)
    if not cfg.filter or "path/" in cfg.filter:
        from hasched.study.bench_paths import path_rows

        xp, yp, _ = load_images(cfg.model, cfg.path_images, device=dev)
        with torch.no_grad():
            clean_p = _time(lambda: model(xp).argmax(-1), dev, cfg)
        one = BenchConfig(warmup=0, trials=1)
        results += path_rows(model, xp, yp, clean_p, lambda fn: _time(fn, dev, one),
                             lambda: _peak_mb(dev), log=log)
    if cfg.ga or (cfg.ga is None and dev.type == "cuda") or "ga/" in cfg.filter:
        results.append(_paper_ga(cfg, model, x, y, clean, dev, log))
    return results


def _paper_ga(cfg: BenchConfig, model, x, y, clean: float, dev, log) -> dict:
    """The paper's GA end to end: c0, flip-to-1 5e-3, population 20, 100 generations, 3
    repeats per fitness, on the bench images (the authors: ~28 h per run on an A100)."""
    from hasched.search.core.registry import create_searcher
    from hasched.study.schedule_search import ScheduleProblem

    scn = Scenario(model=cfg.model, layers=("c0",), fault="flip-to-1", fr_max=5e-3, repeats=3)
    ev = _evaluator(Entry("eval", "", scn), model, x, y, x[:512])
    ga = create_searcher("ga", {"population": 20, "generations": 100})
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    res = ga.run(ScheduleProblem(ev, repeats=3, seed=1), seed=1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    row = {"name": f"ga/{cfg.model}/c0/flip-to-1/5e-3/pop20x100gen", "device": str(dev),
           "seconds": secs, "clean_seconds": clean, "ratio": secs / clean,
           "peak_mb": _peak_mb(dev),
           "note": f"{res.evaluations} evaluations, best fitness {res.best_fitness:.4f}"}
    if log:
        log(f"{row['name']}: {secs:.1f} s ({row['note']})")
    return row


def _resnet_entries(cfg: BenchConfig, dev: torch.device, log) -> list[dict]:
    """resnet18 (random weights: only time is measured) with one faulty conv at 1e-3.

    A residual model runs on the plain (expanded-batch) path: the whole model once per
    population member; ``P x R`` entries show what a GA generation costs.
    """
    from hasched.zoo.load import eval_data
    from hasched.zoo.ref import ModelRef, build_model

    ref = ModelRef("resnet18", dataset="fashion-mnist")
    model = build_model(ref, 0).to(dev).eval()
    x, y, _ = eval_data(ref, ":200", device=dev)
    with torch.no_grad():
        clean = _time(lambda: model(x).argmax(-1), dev, cfg)
    scn = Scenario(model="resnet18", dataset="fashion-mnist", layers=("layer2.0.conv1",),
                   fault="bitflip", fr_max=1e-3, repeats=1)
    rows = [{"name": "eval/resnet18/clean", "device": str(dev), "seconds": clean,
             "clean_seconds": clean, "ratio": 1.0, "peak_mb": _peak_mb(dev)}]
    for name, entry in (("eval/resnet18/layer2.0.conv1/bitflip/1e-3", Entry("eval", "", scn)),
                        ("generation/resnet18/layer2.0.conv1/bitflip/1e-3/pop20x3",
                         Entry("generation", "", scn.replace(repeats=3), 20))):
        secs = _timed(entry, model, x, y, dev, cfg)
        members = entry.population * entry.scenario.repeats
        rows.append({"name": name, "device": str(dev), "seconds": secs, "clean_seconds": clean,
                     "ratio": secs / clean, "peak_mb": _peak_mb(dev),
                     "note": f"{secs / clean / members:.2f}x clean per member"})
        if log:
            log(f"{name}: {secs:.3f} s ({secs / clean:.1f}x clean, {rows[-1]['note']})")
    return rows


MARKDOWN_HEADER = "| entry | device | seconds | clean s | ratio | peak MB |"


def is_bench_markdown(content: bytes) -> bool:
    """Whether a file is a table :func:`to_markdown` wrote (``--markdown`` may replace it)."""
    return content.startswith(MARKDOWN_HEADER.encode())


def to_markdown(rows: list[dict]) -> str:
    """The table; ``peak MB`` is the process's peak so far (RSS on CPU), i.e. an upper
    bound of every entry above it."""
    lines = [MARKDOWN_HEADER + " note |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['device']} | {r['seconds']:.3f} | "
                     f"{r['clean_seconds']:.3f} | {r['ratio']:.2f} | {r['peak_mb']:.0f} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines) + "\n"
