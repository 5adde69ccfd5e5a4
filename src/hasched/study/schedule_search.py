"""HAS schedule search end to end (paper §3.3, §4.4, §5.2): search, baselines, held-out test.

:func:`run_has_search` is what ``hasched search`` (and the demo) call. It

1. loads the search images and the disjoint held-out images (overlap is an error);
2. runs the searcher (any registered one: ``"ga"``, the paper's HAS, ``"criticality"``,
   ``"hybrid"``, ``"cma"``, ``"random"``) ``runs`` times on the search images; the fitness
   of a schedule is its mean top-1 accuracy over ``repeats`` fresh error instances
   (:class:`ScheduleProblem`, one batched call per population);
3. runs random search with, per run, exactly the number of fitness evaluations the main
   searcher used;
4. evaluates clean, identity (unshuffled, the reference), the searched best (key ``has``)
   and the random best on the held-out images with fresh error instances,
   ``holdout_repeats`` times each;
5. writes ``config.json``, ``schedule.json`` (loadable by ``hasched evaluate --schedule``),
   ``schedule-random.json``, ``history.csv``, ``convergence.png``, ``recovery.png``,
   ``summary.md`` and, last, ``summary.json``.

Every run checkpoints each generation to ``out/ckpt/``; calling again with the same settings
resumes from the last completed generation (bit-for-bit the uninterrupted result) and a
finished folder is returned from its ``summary.json`` at once. Other settings for an existing
folder are refused.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hasched.errors import HaschedError
from hasched.search import (
    ModelAwareProblem,
    RandomSearchConfig,
    SearchResult,
    best_of,
    budget_options,
    create_searcher,
    list_searchers,
)
from hasched.sim.evaluator import FaultyEvaluator, summarize

__all__ = ["SearchSettings", "ScheduleProblem", "check_disjoint", "run_has_search"]

_M63 = 2**63


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (an LCG-style hash; no Python ``hash``)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % _M63
        h ^= h >> 29
    return h


@dataclass(frozen=True)
class SearchSettings:
    """Everything that determines a search's result (``device`` excepted).

    Attributes:
        model, seed: registered model and model seed.
        layers: faulty (and searched) layers, e.g. ``"c0"`` or ``"h2,op"`` (joint search).
        error, fr_max, profile_seed, n_sms: the fault scenario.
        profile: a ``.npy``/``.json`` profile file of the chip instead of
            ``fr_max``/``profile_seed``.
        plan_profile: the profile model-aware searchers plan with (slot exposure, probe
            rate), e.g. one estimated by ``hasched diagnose``; fitness and held-out
            accuracy always run on the chip's profile. ``None``: the chip's own.
        algorithm: any registered searcher (:func:`hasched.search.list_searchers`).
        population, generations: the budget, mapped onto the searcher's config by
            :func:`hasched.search.budget_options` (GA size; random search and CMA-ES get
            ``population * (generations + 1)`` evaluations; criticality ignores it).
        options: more config fields of the searcher, e.g. ``{"noise": "mean"}``.
        random_baseline: also run random search at each run's budget (off: saves up to
            half the time when random search is run separately, e.g. by ``compare``).
        runs: independent runs; the best on the search images is kept (paper: 3).
        repeats: error instances per fitness evaluation (paper: 3).
        search_images, holdout_images: disjoint test-image ranges (``A:B`` etc.).
        holdout_repeats: fresh error instances on the held-out images.
        search_seed: run ``i`` is seeded with ``search_seed + i``.
        holdout_seed: seed of the held-out error instances.
        device: ``cpu``, ``cuda`` or ``auto`` (not part of the resume check).
    """

    model: str = "mnist32-cnn"
    seed: int = 1
    layers: str = "c0"
    error: str = "flip-to-1"
    fr_max: float = 5e-3
    profile_seed: int = 1
    profile: str | None = None
    plan_profile: str | None = None
    algorithm: str = "ga"
    population: int = 20
    generations: int = 100
    runs: int = 3
    repeats: int = 3
    search_images: str = "5120:"
    holdout_images: str = ":5120"
    holdout_repeats: int = 10
    search_seed: int = 0
    holdout_seed: int = 20240101
    n_sms: int = 20
    device: str = "cpu"
    options: dict = field(default_factory=dict)
    random_baseline: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in list_searchers():
            raise HaschedError(f"--algorithm must be one of {', '.join(list_searchers())}, "
                               f"got {self.algorithm!r}")
        # Fail on a bad option before any loading or training.
        create_searcher(self.algorithm, {**budget_options(
            self.algorithm, self.population, self.generations), **self.options})
        for name, low in (("population", 2), ("generations", 0), ("runs", 1), ("repeats", 1),
                          ("holdout_repeats", 2)):
            if getattr(self, name) < low:
                raise HaschedError(f"{name} must be >= {low}, got {getattr(self, name)}")

    def key(self) -> dict:
        """The settings a resumed run must share with the original one.

        Fields added later are left out at their defaults, so folders written before
        they existed still resume.
        """
        d = dataclasses.asdict(self)
        d.pop("device")
        for name in ("profile", "plan_profile"):
            if d[name] is None:
                d.pop(name)
        if not d["options"]:
            d.pop("options")
        if d["random_baseline"]:
            d.pop("random_baseline")
        return d

    def searcher(self):
        """The configured searcher."""
        return create_searcher(self.algorithm, {**budget_options(
            self.algorithm, self.population, self.generations), **self.options})


class ScheduleProblem(ModelAwareProblem):
    """Fitness of schedules = mean accuracy over ``repeats`` fresh error instances.

    The error draws of each ``evaluate`` (or ``evaluate_rates``) call come from a generator
    seeded with ``(seed, individuals evaluated so far)``: every call sees fresh instances,
    the sequence is reproducible from ``seed``, and a resumed run (``evaluated`` restored
    from its checkpoint) continues the exact sequence of the uninterrupted one.

    Model-aware searchers see the slot rates of ``plan`` (default: ``ev`` itself), so a
    schedule can be planned from an estimated profile and scored on the real chip.

    Args:
        ev: evaluator on the search images, its faulty layers are the searched ones.
        repeats: error instances per schedule.
        seed: seed of this run's fitness noise.
        evaluated: individuals already evaluated (when resuming).
        plan: evaluator (any images) whose profile model-aware searchers plan with.
    """

    def __init__(self, ev: FaultyEvaluator, repeats: int, seed: int, evaluated: int = 0,
                 plan: FaultyEvaluator | None = None) -> None:
        super().__init__(ev.rows)
        self.ev, self.repeats, self.seed, self.evaluated = ev, repeats, seed, evaluated
        self.plan = plan or ev
        if self.plan.rows != ev.rows:
            raise HaschedError(f"plan evaluator rows {self.plan.rows} differ from {ev.rows}")

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.ev.device).manual_seed(
            mix_seed(self.seed, self.evaluated))

    def evaluate(self, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        acc = self.ev.accuracy(perms, repeats=self.repeats, generator=self._generator())
        self.evaluated += acc.shape[0]  # acc: (P, repeats)
        return acc.mean(1)

    def evaluate_rates(self, rates: dict[str, torch.Tensor]) -> torch.Tensor:
        rates = {k: v.to(self.ev.device) for k, v in rates.items()}
        acc = self.ev.accuracy(repeats=self.repeats, generator=self._generator(), rates=rates)
        self.evaluated += acc.shape[0]
        return acc.mean(1)

    def slot_rates(self) -> dict[str, torch.Tensor]:
        return {n: lay.slot_rate.detach().double().cpu()
                for n, lay in self.plan.state.layers.items()}

    def slot_exposure(self) -> dict[str, torch.Tensor]:
        return self.plan.slot_exposure()

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: lay.weight.detach().reshape(lay.tiling.rows, -1).cpu()
                for n, lay in self.ev.state.layers.items()}


def check_disjoint(search: dict, holdout: dict) -> None:
    """Raise if two image ranges (``{"start", "stop"}`` dicts) overlap."""
    if search["start"] < holdout["stop"] and holdout["start"] < search["stop"]:
        raise HaschedError(
            f"search images {search['start']}:{search['stop']} and held-out images "
            f"{holdout['start']}:{holdout['stop']} overlap; they must be disjoint")


def _ckpt_progress(path: Path) -> tuple[int, int]:
    """``(individuals evaluated, history entries)`` saved in a searcher checkpoint."""
    if not path.exists():
        return 0, 0
    try:
        state = torch.load(path, weights_only=True)
        return int(state["evaluations"]), len(state["history"])
    except Exception as e:  # the searcher reports the details when it loads the file
        raise HaschedError(f"checkpoint {path} is unreadable; delete it to restart") from e


def _run_one(searcher, ev, s: SearchSettings, run_seed: int, stream: int, ckpt: Path,
             label: str, progress: bool, plan: FaultyEvaluator | None = None) -> SearchResult:
    from tqdm import tqdm

    done_evals, done_steps = _ckpt_progress(ckpt)
    problem = ScheduleProblem(ev, s.repeats, mix_seed(stream, run_seed), done_evals, plan)
    with tqdm(initial=done_steps, desc=label, file=sys.stderr, unit="step",
              disable=not progress, leave=False) as bar:
        def cb(h: dict) -> None:
            if h["best_fitness"] is not None:
                bar.set_postfix(best=f"{h['best_fitness']:.4f}", evals=h["evaluations"])
            bar.update(1)

        return searcher.run(problem, run_seed, cb, ckpt)


def _stats(values: list[float], images: int) -> dict:
    st = summarize(values)
    return {"mean": st["mean"], "std": st["std"], "ci95": st["ci95"], "repeats": st["n"],
            "images": images, "values": [float(v) for v in values]}


def _history_rows(algorithm: str, results: list[SearchResult], seeds: list[int]) -> list[dict]:
    return [{"algorithm": algorithm, "run": i, "seed": sd, **h}
            for i, (r, sd) in enumerate(zip(results, seeds, strict=True)) for h in r.history]


def _open_folder(out: Path, s: SearchSettings, log: Callable[[str], None]) -> dict | None:
    """Create ``out`` or check it holds this search; a finished one's summary, else None."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, sum_path = out / "config.json", out / "summary.json"
    key = json.loads(json.dumps(s.key()))
    if not cfg_path.exists():
        cfg_path.write_text(json.dumps(key, indent=1))
        return None
    saved = json.loads(cfg_path.read_text())
    if saved != key:
        diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
        raise HaschedError(f"{out} holds a search with other settings ({', '.join(diff)}); "
                           "use another --out or delete it")
    if sum_path.exists():
        log(f"{out}: finished earlier; reading {sum_path}")
        return json.loads(sum_path.read_text())
    return None


def _evaluators(s: SearchSettings, models_dir, data_dir, log, progress) -> dict:
    """Search, held-out and (optionally) planning evaluators, sharing one model load."""
    from hasched.sim.hardware import AcceleratorConfig
    from hasched.study.build import FaultScenario, build_evaluator, load_images, resolve_device

    accel = AcceleratorConfig(n_sms=s.n_sms)
    scn = FaultScenario(error=s.error, fr_max=s.fr_max, profile_seed=s.profile_seed,
                        profile_path=s.profile, accel=accel)
    scn.error_model()
    scn.profile()
    dev = resolve_device(s.device)
    data_s = load_images(s.model, s.search_images, data_dir, dev)
    data_h = load_images(s.model, s.holdout_images, data_dir, dev)
    check_disjoint(data_s[2], data_h[2])

    def build(scenario, data):
        return build_evaluator(s.model, s.seed, s.layers, scenario, device=dev,
                               models_dir=models_dir, data_dir=data_dir, log=log,
                               progress=progress, data=data)

    ev, ev_h = build(scn, data_s), build(scn, data_h)
    plan = None
    if s.plan_profile is not None:  # one image is enough: only its slot rates are read
        plan = build(dataclasses.replace(scn, profile_path=s.plan_profile),
                     (data_s[0][:1], data_s[1][:1], data_s[2]))
    return {"ev": ev, "ev_h": ev_h, "plan": plan, "accel": accel, "device": dev,
            "search_images": data_s[2], "holdout_images": data_h[2]}


def _search(s: SearchSettings, evs: dict, out: Path, progress: bool) -> dict:
    """``runs`` runs of the searcher, then random search at each run's budget."""
    seeds = [s.search_seed + i for i in range(s.runs)]
    ckdir = out / "ckpt"
    main = []
    if s.algorithm != "random":
        searcher = s.searcher()
        main = [_run_one(searcher, evs["ev"], s, sd, 1, ckdir / f"run{i}.pt",
                         f"{s.algorithm} run {i + 1}/{s.runs}", progress, evs["plan"])
                for i, sd in enumerate(seeds)]
    # Random search: per run, the main searcher's actual number of evaluations (or the
    # whole budget when random search is the main searcher).
    rand = []
    for i, sd in enumerate(seeds if s.random_baseline or not main else []):
        budget = main[i].evaluations if main else s.population * (s.generations + 1)
        rs = create_searcher("random", RandomSearchConfig(evaluations=budget, batch=s.population))
        rand.append(_run_one(rs, evs["ev"], s, sd, 2, ckdir / f"random{i}.pt",
                             f"random run {i + 1}/{s.runs}", progress))
    main = main or rand
    rows = _history_rows(s.algorithm, main, seeds)
    if main is not rand and rand:
        rows += _history_rows("random", rand, seeds)
    return {"main": main, "random": rand, "seeds": seeds, "rows": rows,
            "best": best_of(main), "rbest": best_of(rand) if rand else None}


def _holdout(s: SearchSettings, ev_h: FaultyEvaluator, best: SearchResult,
             rbest: SearchResult | None) -> dict:
    """Identity, searched best and random best in one batched call, fresh errors."""
    found = [best] + ([rbest] if rbest is not None else [])
    perms = {k: torch.stack([torch.arange(n)] + [r.best[k] for r in found])
             for k, n in ev_h.rows.items()}
    g = torch.Generator(device=ev_h.device).manual_seed(s.holdout_seed)
    acc = ev_h.accuracy(perms, repeats=s.holdout_repeats, generator=g).tolist()  # (2|3, R)
    n_h, clean = ev_h.n_images, ev_h.clean_accuracy
    return {
        "clean": {"mean": clean, "std": 0.0, "ci95": [clean, clean], "repeats": 1,
                  "images": n_h, "values": [clean]},
        "identity": _stats(acc[0], n_h), "has": _stats(acc[1], n_h),
        "random": _stats(acc[2], n_h) if rbest is not None else None,
    }


def _search_summary(s: SearchSettings, found: dict) -> dict:
    main, rand, best = found["main"], found["random"], found["best"]
    seconds = sum(r.seconds for r in main)
    return {
        "algorithm": s.algorithm,
        "best_fitness": best.best_fitness,
        "random_best_fitness": found["rbest"].best_fitness if found["rbest"] else None,
        "run_best_fitness": [r.best_fitness for r in main],
        "evaluations": [r.evaluations for r in main],
        "error_instances": [r.evaluations * s.repeats for r in main],
        "random_evaluations": [r.evaluations for r in rand],
        "run_seconds": [r.seconds for r in main],
        "search_seconds": seconds + (sum(r.seconds for r in rand) if main is not rand else 0.0),
        "info": best.info,
    }


def run_has_search(
    out: str | Path,
    settings: SearchSettings | None = None,
    *,
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Search a fault-aware schedule and evaluate it honestly; returns ``summary.json``'s dict.

    Args:
        out: output folder (created; resumed when it holds a run with the same settings).
        settings: what to search; keyword ``overrides`` replace fields of it (or of the
            defaults), e.g. ``run_has_search("out", layers="h2,op", error="bf16", fr_max=0.5)``.
        models_dir, data_dir: checkpoint store and dataset folder.
        log: receives one-line status messages.
        progress: show tqdm bars on stderr.

    Raises:
        HaschedError: bad settings, overlapping image ranges, or ``out`` holding another run.
    """
    from hasched.study.build import save_schedule

    s = dataclasses.replace(settings or SearchSettings(), **overrides)
    log = log or (lambda _m: None)
    out = Path(out)
    done = _open_folder(out, s, log)
    if done is not None:
        return done
    t0 = time.perf_counter()
    evs = _evaluators(s, models_dir, data_dir, log, progress)
    ev = evs["ev"]
    found = _search(s, evs, out, progress)
    best, rbest = found["best"], found["rbest"]
    log(f"search done: best fitness {best.best_fitness:.4f} ({s.algorithm}), "
        f"{sum(r.evaluations for r in found['main'])} evaluations")
    results = _holdout(s, evs["ev_h"], best, rbest)
    clean = results["clean"]["mean"]
    lost = clean - results["identity"]["mean"]
    gained = results["has"]["mean"] - results["identity"]["mean"]

    meta = {"model": s.model, "seed": s.seed, "layers": ev.layers, "error": s.error,
            "fr_max": s.fr_max, "profile_seed": s.profile_seed, "profile": s.profile,
            "accelerator": dataclasses.asdict(evs["accel"]), "algorithm": s.algorithm,
            "search_seed": s.search_seed, "search_images": evs["search_images"],
            "checkpoint": {k: ev.info["checkpoint"].get(k) for k in ("test_accuracy", "epochs")}}
    save_schedule(out / "schedule.json", best.best, **meta, fitness=best.best_fitness,
                  holdout_accuracy=results["has"]["mean"])
    if rbest is not None:
        save_schedule(out / "schedule-random.json", rbest.best,
                      **{**meta, "algorithm": "random"}, fitness=rbest.best_fitness,
                      holdout_accuracy=results["random"]["mean"])
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["algorithm", "run", "seed", "generation", "evaluations",
                               "best_fitness", "mean_fitness"])
        w.writeheader()
        w.writerows(found["rows"])

    summary = {
        "settings": {**s.key(), "device": str(evs["device"])},
        "layers": ev.layers, "rows": ev.rows,
        "search_images": evs["search_images"], "holdout_images": evs["holdout_images"],
        "results": results,
        "degradation": lost, "recovery": gained,
        "recovered_fraction": gained / lost if lost > 0 else None,
        "has_minus_random": (results["has"]["mean"] - results["random"]["mean"]
                             if rbest is not None else None),
        "search": _search_summary(s, found),
        "wall_seconds": time.perf_counter() - t0,
    }
    _write_reports(out, s, summary, found["rows"])
    log(f"held-out ({results['has']['images']} images, {s.holdout_repeats} repeats): clean "
        f"{clean:.4f} | identity {results['identity']['mean']:.4f} | {s.algorithm} "
        f"{results['has']['mean']:.4f}" + (f" | random {results['random']['mean']:.4f}"
                                           if rbest is not None else "") + f" -> {out}")
    return summary


def _write_reports(out: Path, s: SearchSettings, summary: dict, rows: list[dict]) -> None:
    """Figures, markdown and, last, ``summary.json`` (its presence marks a finished run)."""
    from hasched.report.search import plot_convergence, plot_recovery, write_markdown

    plot_convergence(rows, out / "convergence.png",
                     title=f"{s.model} {'+'.join(summary['layers'])} {s.error} "
                           f"FR_max {s.fr_max:g}")
    plot_recovery(summary, out / "recovery.png")
    write_markdown(summary, out / "summary.md")
    sum_path = out / "summary.json"
    tmp = sum_path.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(sum_path)
