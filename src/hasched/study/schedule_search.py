"""HAS schedule search end to end (paper §3.3, §4.4, §5.2): search, baselines, held-out test.

:func:`run_has_search` is what ``hasched search`` (and the demo) call. It

1. loads the search images and the disjoint held-out images (overlap is an error);
2. runs the searcher (any registered one: ``"ga"``, the paper's HAS, ``"criticality"``,
   ``"hybrid"``, ``"cma"``, ``"random"``) ``runs`` times on the search images; the fitness
   of a schedule is its mean top-1 accuracy over ``repeats`` fresh error instances
   (:class:`ScheduleProblem`, one batched call per population);
3. runs random search with, per run, exactly the number of fitness evaluations the main
   searcher used (unless ``random_baseline`` is off);
4. evaluates clean, identity (unshuffled, the reference), the searched best (key ``has``)
   and the random best on the held-out images with fresh error instances,
   ``holdout_repeats`` times each;
5. writes ``config.json``, ``schedule.json`` (loadable by ``hasched evaluate --schedule``),
   ``schedule-random.json``, ``history.csv``, ``convergence.png``, ``recovery.png``,
   ``summary.md`` and, last, ``summary.json``.

Every run checkpoints each generation to ``out/ckpt/``; calling again with the same settings
resumes from the last completed generation (bit-for-bit the uninterrupted result) and a
finished folder is returned from its ``summary.json`` at once. The folder follows
:func:`hasched.io.check_out_dir`: other settings, another command's folder or a user's
non-empty folder are refused, everything is checked before the folder is created, every
file is written atomically and a running search holds the folder's lock.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hasched.errors import HaschedError
from hasched.io import atomic_write, check_out_dir, claim_out_dir, read_json, require
from hasched.search import (
    ModelAwareProblem,
    RandomSearchConfig,
    SearchResult,
    best_of,
    budget_options,
    create_searcher,
    list_searchers,
)
from hasched.seeds import derive_seed
from hasched.sim.evaluator import FaultyEvaluator, summarize
from hasched.study.scenario import Scenario

__all__ = ["SearchSettings", "ScheduleProblem", "check_demo_dir", "check_disjoint",
           "check_search_dir", "demo_search_dir", "prepare_search", "run_has_search"]


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (see :func:`hasched.seeds.derive_seed`)."""
    return derive_seed(*(int(p) for p in parts))


@dataclass(frozen=True)
class SearchSettings:
    """Everything that determines a search's result (``device`` excepted).

    Attributes:
        scenario: What runs where and what goes wrong (model, the searched layer group,
            mapping, arithmetic, faults); ``scenario.repeats`` error instances per fitness
            evaluation (paper: 3); its ``images`` are replaced by the two ranges below.
        algorithm: any registered searcher (:func:`hasched.search.list_searchers`).
        population, generations: the budget, mapped onto the searcher's config by
            :func:`hasched.search.budget_options` (GA size; random search and CMA-ES get
            ``population * (generations + 1)`` evaluations; criticality ignores it).
        runs: independent runs; the best on the search images is kept (paper: 3).
        search_images, holdout_images: disjoint test-image ranges (``A:B`` etc.).
        holdout_repeats: fresh error instances on the held-out images.
        search_seed: run ``i`` is seeded with ``search_seed + i``.
        holdout_seed: seed of the held-out error instances.
        device: ``cpu``, ``cuda`` or ``auto`` (not part of the resume check).
        options: more config fields of the searcher, e.g. ``{"noise": "mean"}``.
        random_baseline: also run random search at each run's budget (off: saves up to
            half the time when random search runs separately, e.g. in ``compare``).
        plan_profile: the transient profile model-aware searchers plan with (slot
            exposure, probe rate), e.g. one estimated by ``hasched diagnose``; fitness and
            held-out accuracy always run on the scenario's own faults. ``None``: the same.
    """

    scenario: Scenario = Scenario()
    algorithm: str = "ga"
    population: int = 20
    generations: int = 100
    runs: int = 3
    search_images: str = "5120:"
    holdout_images: str = ":5120"
    holdout_repeats: int = 10
    search_seed: int = 0
    holdout_seed: int = 20240101
    device: str = "cpu"
    options: dict = field(default_factory=dict)
    random_baseline: bool = True
    plan_profile: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in list_searchers():
            raise HaschedError(f"--algorithm must be one of {', '.join(list_searchers())}, "
                               f"got {self.algorithm!r}")
        self.searcher()  # fail on a bad option before any loading or training
        for name, low in (("population", 2), ("generations", 0), ("runs", 1),
                          ("holdout_repeats", 2)):
            if getattr(self, name) < low:
                raise HaschedError(f"{name} must be >= {low}, got {getattr(self, name)}")

    @classmethod
    def make(cls, base: SearchSettings | None = None, **kw) -> SearchSettings:
        """Settings from keyword arguments; scenario fields (``layers``, ``fault``,
        ``fr_max``...) go into the scenario (``error`` is an alias of ``fault``)."""
        base = base or cls()
        if "error" in kw:
            kw["fault"] = kw.pop("error")
        scn_fields = {f.name for f in dataclasses.fields(Scenario)}
        scn_kw = {k: kw.pop(k) for k in list(kw) if k in scn_fields}
        if isinstance(scn_kw.get("layers"), str):
            spec = scn_kw["layers"]
            if "," in spec:
                raise HaschedError(f"search takes one layer group; join layers with + to "
                                   f"search them jointly (got --layers {spec})")
            scn_kw["layers"] = tuple(spec.split("+"))
        return dataclasses.replace(base, scenario=base.scenario.replace(**scn_kw), **kw)

    @property
    def repeats(self) -> int:
        return self.scenario.repeats

    def key(self) -> dict:
        """The settings a resumed run must share with the original one.

        Fields added later are left out at their defaults, so folders written before
        they existed still resume.
        """
        d = dataclasses.asdict(self)
        d.pop("device")
        d["scenario"] = self.scenario.to_dict()
        for name, default in (("options", {}), ("random_baseline", True),
                              ("plan_profile", None)):
            if d[name] == default:
                d.pop(name)
        return d

    def searcher(self):
        """The configured searcher (the common budget plus ``options``)."""
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
        return {k: v.detach().double().cpu() for k, v in self.plan.slot_exposure().items()}

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: lay.weight.detach().reshape(lay.rows, -1).cpu()
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
            if h["best_fitness"] is not None:  # None after a probe step
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


def check_search_dir(out: str | Path, s: SearchSettings) -> bool:
    """The output-folder policy for a search (reads only): True when ``out`` is resumed.

    Raises:
        HaschedError: ``out`` is a file, foreign, or holds a search with other settings.
    """
    want = json.loads(json.dumps(s.key()))

    def compatible(saved: dict, path: Path) -> None:
        if not {"scenario", "algorithm", "search_images"} <= set(saved):
            raise HaschedError(f"{path} is not a hasched search's config (another command's "
                               "folder?); use another --out")
        if saved != want:
            diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
            raise HaschedError(f"{out} holds a search with other settings ({', '.join(diff)});"
                               " use another --out or delete it")

    return check_out_dir(out, what="search", compatible=compatible)


def demo_search_dir(out: str | Path, s: SearchSettings) -> Path:
    """Where the demo's search goes: ``search/`` for the GA (as before), else
    ``search-<algorithm>/``, so a demo folder of an older hasched stays resumable."""
    return Path(out) / ("search" if s.algorithm == "ga" else f"search-{s.algorithm}")


def check_demo_dir(out: str | Path, s: SearchSettings) -> bool:
    """The output-folder policy of ``hasched demo`` (its folder and its search folder).

    A demo folder of an older hasched (only ``models/`` and ``search/``) counts as ours.
    """
    def compatible(cfg: dict, path: Path) -> None:
        if cfg.get("hasched") != "demo":
            raise HaschedError(f"{path} is not a hasched demo config (another command's "
                               "folder?); use another --out")

    resumed = check_out_dir(out, what="demo", compatible=compatible,
                            legacy=lambda names: set(names) <= {"models", "search"})
    check_search_dir(demo_search_dir(out, s), s)
    return resumed


def _read_summary(path: Path) -> dict:
    summary = read_json(path, what="search summary")
    require(summary, "results", dict, file=path)
    return summary


def prepare_search(s: SearchSettings, models_dir, data_dir, train: bool = False):
    """Every check that needs no output folder: scenario, layers, device, images, model."""
    from hasched.study.build import check_layers, load_images, require_model, resolve_device

    scn = s.scenario.validate()
    check_layers(scn, [scn.layers])
    dev = resolve_device(s.device)
    data_s = load_images(scn, s.search_images, data_dir, dev)
    data_h = load_images(scn, s.holdout_images, data_dir, dev)
    check_disjoint(data_s[2], data_h[2])
    if not train:
        require_model(scn, models_dir)
    return scn, dev, data_s, data_h


def run_has_search(
    out: str | Path,
    settings: SearchSettings | None = None,
    *,
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    train: bool = False,
    **overrides,
) -> dict:
    """Search a fault-aware schedule and evaluate it honestly; returns ``summary.json``'s dict.

    Everything is checked before ``out`` is created; while the search runs, ``out`` is
    locked against a second writer.

    Args:
        out: output folder (created; resumed when it holds a run with the same settings).
        settings: what to search; keyword ``overrides`` replace fields of it (or of the
            defaults), e.g. ``run_has_search("out", layers="h2,op", error="bf16", fr_max=0.5)``.
        models_dir, data_dir: checkpoint store and dataset folder.
        log: receives one-line status messages.
        progress: show tqdm bars on stderr.
        train: train a missing checkpoint (else it is an error).

    Raises:
        HaschedError: bad settings, overlapping image ranges, a missing checkpoint, ``out``
            foreign or holding another run, or a failed write.
    """
    from hasched.study.build import build_evaluator

    s = SearchSettings.make(settings, **overrides)
    log = log or (lambda _m: None)
    out = Path(out)
    sum_path = out / "summary.json"
    if check_search_dir(out, s) and sum_path.exists():
        log(f"{out}: finished earlier; reading {sum_path}")
        return _read_summary(sum_path)
    scn, dev, data_s, data_h = prepare_search(s, models_dir, data_dir, train)
    t0 = time.perf_counter()
    with claim_out_dir(out, s.key(), log=log):
        if sum_path.exists():  # finished by another run between our check and our lock
            return _read_summary(sum_path)
        kw = dict(device=dev, models_dir=models_dir, data_dir=data_dir, log=log,
                  progress=progress, train=train)
        ev = build_evaluator(scn.replace(images=s.search_images), data=data_s, **kw)
        ev_h = build_evaluator(scn.replace(images=s.holdout_images), data=data_h, **kw)
        plan = None
        if s.plan_profile is not None:  # one image is enough: only its slot rates are read
            plan = build_evaluator(scn.replace(images=s.search_images, profile=s.plan_profile),
                                   data=(data_s[0][:1], data_s[1][:1], data_s[2]), **kw)
        main, rand, seeds = _search(out, s, ev, progress, log, plan)
        results = _holdout(s, ev, ev_h, best_of(main), best_of(rand) if rand else None)
        summary = _write_outputs(out, s, ev, data_s, data_h, dev, main, rand, seeds, results, t0)
    r = summary["results"]
    rnd = f" | random {r['random']['mean']:.4f}" if r["random"] else ""
    log(f"held-out ({ev_h.n_images} images, {s.holdout_repeats} repeats): clean "
        f"{r['clean']['mean']:.4f} | identity {r['identity']['mean']:.4f} | {s.algorithm} "
        f"{r['has']['mean']:.4f}{rnd} -> {out}")
    return summary


def _search(out: Path, s: SearchSettings, ev: FaultyEvaluator, progress: bool,
            log: Callable[[str], None], plan: FaultyEvaluator | None = None
            ) -> tuple[list[SearchResult], list[SearchResult], list]:
    """The main searcher's runs and random search at the same budget, run by run."""
    seeds = [s.search_seed + i for i in range(s.runs)]
    ckdir = out / "ckpt"
    main = []
    if s.algorithm != "random":
        searcher = s.searcher()
        main = [_run_one(searcher, ev, s, sd, 1, ckdir / f"run{i}.pt",
                         f"{s.algorithm} run {i + 1}/{s.runs}", progress, plan)
                for i, sd in enumerate(seeds)]
    # Random search: per run, the main searcher's actual number of evaluations (or the
    # whole budget when random search is the main searcher).
    rand = []
    for i, sd in enumerate(seeds if s.random_baseline or not main else []):
        budget = main[i].evaluations if main else s.population * (s.generations + 1)
        rs = create_searcher("random", RandomSearchConfig(evaluations=budget, batch=s.population))
        rand.append(_run_one(rs, ev, s, sd, 2, ckdir / f"random{i}.pt",
                             f"random run {i + 1}/{s.runs}", progress))
    main = main or rand
    log(f"search done: best fitness {best_of(main).best_fitness:.4f} ({s.algorithm}), "
        f"{sum(r.evaluations for r in main)} evaluations")
    return main, rand, seeds


def _holdout(s: SearchSettings, ev: FaultyEvaluator, ev_h: FaultyEvaluator,
             best: SearchResult, rbest: SearchResult | None) -> dict:
    """Identity, searched best and random best on the held-out images, in one batched call."""
    found = [best] + ([rbest] if rbest is not None else [])
    perms = {k: torch.stack([torch.arange(n)] + [r.best[k] for r in found])
             for k, n in ev.rows.items()}
    g = torch.Generator(device=ev_h.device).manual_seed(s.holdout_seed)
    acc = ev_h.accuracy(perms, repeats=s.holdout_repeats, generator=g).tolist()  # (2|3, R)
    n_h = ev_h.n_images
    clean = ev_h.clean_accuracy
    return {
        "clean": {"mean": clean, "std": 0.0, "ci95": [clean, clean], "repeats": 1,
                  "images": n_h, "values": [clean]},
        "identity": _stats(acc[0], n_h), "has": _stats(acc[1], n_h),
        "random": _stats(acc[2], n_h) if rbest is not None else None,
    }


def _search_summary(s: SearchSettings, main: list[SearchResult],
                    rand: list[SearchResult]) -> dict:
    best = best_of(main)
    return {
        "algorithm": s.algorithm,
        "best_fitness": best.best_fitness,
        "random_best_fitness": best_of(rand).best_fitness if rand else None,
        "run_best_fitness": [r.best_fitness for r in main],
        "evaluations": [r.evaluations for r in main],
        "error_instances": [r.evaluations * s.repeats for r in main],
        "random_evaluations": [r.evaluations for r in rand],
        "run_seconds": [r.seconds for r in main],
        "search_seconds": sum(r.seconds for r in main) + (
            sum(r.seconds for r in rand) if main is not rand else 0.0),
        "info": best.info,
    }


def _write_outputs(out: Path, s: SearchSettings, ev: FaultyEvaluator, data_s, data_h, dev,
                   main: list[SearchResult], rand: list[SearchResult], seeds: list[int],
                   results: dict, t0: float) -> dict:
    """Schedules, history, figures, summary.md and, last, summary.json (each atomic)."""
    from hasched.report.search import plot_convergence, plot_recovery, write_markdown
    from hasched.study.build import save_schedule

    scn = s.scenario
    best, rbest = best_of(main), (best_of(rand) if rand else None)
    lost = results["clean"]["mean"] - results["identity"]["mean"]
    gained = results["has"]["mean"] - results["identity"]["mean"]
    meta = {"model": scn.model, "seed": scn.seed, "layers": ev.layers, "error": scn.fault,
            "fr_max": scn.fr_max, "profile_seed": scn.profile_seed, "scenario": scn.to_dict(),
            "mapping": ev.mapping.describe(), "algorithm": s.algorithm,
            "search_seed": s.search_seed, "search_images": data_s[2],
            "checkpoint": {k: ev.info["checkpoint"].get(k) for k in ("test_accuracy", "epochs")}}
    save_schedule(out / "schedule.json", best.best, **meta, fitness=best.best_fitness,
                  holdout_accuracy=results["has"]["mean"])
    if rbest is not None:
        save_schedule(out / "schedule-random.json", rbest.best,
                      **{**meta, "algorithm": "random"}, fitness=rbest.best_fitness,
                      holdout_accuracy=results["random"]["mean"])
    rows = _history_rows(s.algorithm, main, seeds)
    if main is not rand and rand:
        rows += _history_rows("random", rand, seeds)
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, ["algorithm", "run", "seed", "generation", "evaluations",
                              "best_fitness", "mean_fitness"])
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "history.csv", text.getvalue())
    summary = {
        "settings": {**s.key(), "device": str(dev)},
        "layers": ev.layers, "rows": ev.rows,
        "search_images": data_s[2], "holdout_images": data_h[2],
        "results": results,
        "degradation": lost, "recovery": gained,
        "recovered_fraction": gained / lost if lost > 0 else None,
        "has_minus_random": (results["has"]["mean"] - results["random"]["mean"]
                             if rbest is not None else None),
        "search": _search_summary(s, main, rand),
        "wall_seconds": time.perf_counter() - t0,
    }
    plot_convergence(rows, out / "convergence.png",
                     title=f"{scn.model} {scn.layer_spec} {scn.fault} FR_max {scn.fr_max:g}")
    plot_recovery(summary, out / "recovery.png")
    write_markdown(summary, out / "summary.md")
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    return summary
