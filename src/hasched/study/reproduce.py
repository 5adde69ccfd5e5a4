"""``hasched reproduce``: the paper's §5.2 recovery cases, side by side with its numbers.

Every (case, model seed, profile seed) is one
:func:`hasched.study.schedule_search.run_has_search` folder under ``out/cases/``; finished
folders are read back, unfinished ones resume from their last
generation, so a killed ``reproduce`` picks up where it stopped. ``REPORT.md`` and
``recovery-cases.png`` are rewritten at the end from all finished folders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from hasched.errors import HaschedError
from hasched.io import atomic_write, check_out_dir, claim_out_dir
from hasched.sim.evaluator import summarize
from hasched.study.executor import Executor, LocalExecutor
from hasched.study.scenario import Scenario
from hasched.study.schedule_search import SearchSettings, run_has_search

__all__ = ["Case", "paper_cases", "QUICK", "FULL", "check_reproduce_dir", "run_reproduce"]


@dataclass(frozen=True)
class Case:
    """One §5.2 case: which layers, which fault at which FR_max, and what the paper says."""

    model: str
    layers: str  # one layer group, "h2+op" faults both
    error: str
    fr_max: float
    paper: str  # what the paper's text reports for this case

    @property
    def name(self) -> str:
        return f"{self.model} {self.layers} {self.error} {self.fr_max:g}"

    @property
    def slug(self) -> str:
        return f"{self.model}_{self.layers}_{self.error}_{self.fr_max:g}"

    def scenario(self, base: Scenario, model_seed: int, profile_seed: int) -> Scenario:
        """The case on ``base``'s accelerator (mapping, arithmetic, fault parameters...)."""
        return base.replace(model=self.model, seed=model_seed,
                            layers=tuple(self.layers.split("+")), fault=self.error,
                            fr_max=self.fr_max, profile_seed=profile_seed)


def paper_cases() -> list[Case]:
    """All §5.2 cases with the paper's reported degradation/recovery (from its text)."""
    cases = []
    for err in ("flip-to-1", "bitflip"):
        for fr in (1e-3, 2e-3, 5e-3):
            cases.append(Case("mnist32-cnn", "c0", err, fr,
                              "~55% -> ~85% (+~30 points)" if fr == 5e-3
                              else "almost all lost accuracy recovered"))
    for err in ("tf32", "bf16"):
        for fr in (0.1, 0.2, 0.5):
            for layers in ("h2", "op", "h2+op"):
                cases.append(Case("mnist32-cnn", layers, err, fr,
                                  "+~5 points" if layers == "h2+op" else "+2-4 points"))
    for err in ("flip-to-1", "bitflip"):
        for layers, text in (("c0", "+~5 points; almost full recovery"), ("c1", "+~5 points"),
                             ("c0+c1", "+~10 points")):
            cases.append(Case("fashion-cnn", layers, err, 0.5, text))
    return cases


@dataclass(frozen=True)
class Plan:
    cases: list[Case]
    model_seeds: tuple[int, ...]
    profile_seeds: tuple[int, ...]
    settings: SearchSettings
    description: str


FULL = Plan(
    paper_cases(), (1, 2, 3), (1, 2),
    SearchSettings(population=20, generations=100, runs=3, search_images="5120:",
                   holdout_images=":5120", holdout_repeats=10),
    "all 42 §5.2 cases x model seeds 1,2,3 x profile seeds 1,2; paper GA (population 20, "
    "100 generations, 3 runs, 3 repeats), search images 5120:, held-out :5120, 10 repeats",
)
_QUICK_CASES = [c for c in paper_cases() if c.model == "mnist32-cnn" and (
    c.layers == "c0" or c.fr_max == 0.5)]
QUICK = Plan(
    _QUICK_CASES, (1,), (1,),
    SearchSettings(population=20, generations=30, runs=1, search_images="5120:6120",
                   holdout_images=":2000", holdout_repeats=10),
    "the 12 mnist32-cnn cases (c0 flip-to-1 and bitflip at 1e-3, 2e-3, 5e-3; h2, op, h2+op "
    "with tf32 and bf16 at 0.5), model seed 1, profile seed 1; GA population 20, "
    "30 generations, 1 run, 3 repeats on search images 5120:6120 (1,000); held-out :2000 "
    "with 10 repeats; random search at the GA's budget",
)


def _agg(vals: list[dict]) -> dict:
    """Mean over seed combinations; 95% t-interval over them (one combo: its own CI)."""
    if len(vals) == 1:
        return {"mean": vals[0]["mean"], "ci95": list(vals[0]["ci95"]), "n": 1}
    st = summarize([v["mean"] for v in vals])
    return {"mean": st["mean"], "ci95": st["ci95"], "n": st["n"]}


def _pct(st: dict) -> str:
    return f"{100 * st['mean']:.1f} [{100 * st['ci95'][0]:.1f}, {100 * st['ci95'][1]:.1f}]"


def plan_base() -> Scenario:
    """The cases' default accelerator: the paper's (gpu-tiles, 20 SMs, fp32), 3 repeats."""
    return Scenario(repeats=3)


def check_reproduce_dir(out: str | Path, quick: bool, base: Scenario | None = None) -> bool:
    """The output-folder policy for ``reproduce`` (reads only): True when ``out`` is resumed.

    A folder of an older hasched (no ``config.json``, only reproduce's own files) counts
    as ours.
    """
    plan = "quick" if quick else "full"

    def compatible(cfg: dict, path: Path) -> None:
        if cfg.get("hasched") != "reproduce":
            raise HaschedError(f"{path} is not a hasched reproduce config (another command's "
                               "folder?); use another --out")
        if cfg.get("plan") != plan:
            raise HaschedError(f"{out} holds the {cfg.get('plan')} reproduce plan, not the "
                               f"{plan} one; use another --out")
        want = (base or plan_base()).to_dict()
        if cfg.get("base", plan_base().to_dict()) != want:
            raise HaschedError(f"{out} holds the cases on another accelerator or fault "
                               "setting (--mapping, --arithmetic, ...); use another --out")

    return check_out_dir(out, what="reproduce", compatible=compatible,
                         legacy=lambda names: set(names) <= {"cases", "REPORT.md",
                                                             "recovery-cases.png"})


def run_reproduce(
    out: str | Path,
    quick: bool = False,
    *,
    device: str = "cpu",
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    train: bool = False,
    base: Scenario | None = None,
    algorithm: str = "ga",
    options: dict | None = None,
    executor: Executor | None = None,
) -> list[dict]:
    """Run (or resume) every case of the plan and write ``REPORT.md``; returns its rows.

    The folder policy, the device and every checkpoint of the plan are checked before
    ``out`` is created (``train`` trains missing checkpoints instead); ``out`` is locked
    against a second writer while the plan runs. ``base`` sets what the cases do not
    (mapping, arithmetic, fault parameters...): e.g. ``Scenario(n_sms=10)`` reruns the
    cases on the authors' 10-SM configuration. ``algorithm`` and ``options`` replace the
    plan's searcher (the paper's GA); another searcher writes its cases under
    ``out/cases-<algorithm>/`` and ``REPORT-<algorithm>.md``, so plans with different
    searchers share one output folder.
    """
    base = base or plan_base()
    from hasched.report.search import plot_cases
    from hasched.study.build import resolve_device
    from hasched.zoo.train import require_checkpoint

    plan = QUICK if quick else FULL
    options = dict(options or {})
    plan = replace(plan, settings=replace(plan.settings, algorithm=algorithm, options=options))
    cases = "cases" if algorithm == "ga" and not options else f"cases-{algorithm}"
    suffix = "" if cases == "cases" else f"-{algorithm}"
    log = log or (lambda _m: None)
    out = Path(out)
    check_reproduce_dir(out, quick, base)
    resolve_device(device)
    if not train:
        for model in dict.fromkeys(c.model for c in plan.cases):
            for ms in plan.model_seeds:
                require_checkpoint(model, ms, models_dir)
    t0 = time.perf_counter()
    with claim_out_dir(out, {"hasched": "reproduce", "plan": "quick" if quick else "full",
                             "base": base.to_dict()}, log=log):
        rows = _run_cases(out / cases, plan, executor or LocalExecutor(), device,
                          models_dir, data_dir, log, progress, train, base)
        plot_cases([{"name": r["case"].name, **{k: r[k] for k in ("clean", "identity", "has",
                                                                     "random")}} for r in rows],
                   out / f"recovery-cases{suffix}.png")
        wall = time.perf_counter() - t0
        _write_report(out / f"REPORT{suffix}.md", plan, rows, wall, quick, cases, suffix)
    log(f"wrote {out / f'REPORT{suffix}.md'} ({wall:.0f} s)")
    return rows


def _search_job(job: tuple) -> dict:
    """One seed pair of one case: a resumable search folder (picklable for executors)."""
    folder, settings, models_dir, data_dir, progress, train = job
    return run_has_search(folder, settings, models_dir=models_dir, data_dir=data_dir,
                          progress=progress, train=train)


def _run_cases(cases: Path, plan: Plan, executor: Executor, device: str, models_dir,
               data_dir, log: Callable[[str], None], progress: bool, train: bool,
               base: Scenario) -> list[dict]:
    """Every seed combination of every case (each its own resumable search folder)."""
    keys, jobs = [], []
    for k, case in enumerate(plan.cases):
        for ms in plan.model_seeds:
            for ps in plan.profile_seeds:
                s = replace(plan.settings, scenario=case.scenario(base, ms, ps), device=device)
                keys.append(k)
                jobs.append((cases / case.slug / f"ms{ms}_ps{ps}", s, models_dir, data_dir,
                             progress, train))
    runs: list[dict | None] = [None] * len(jobs)
    for done, (i, res) in enumerate(executor.map_unordered(_search_job, jobs), 1):
        runs[i] = res
        log(f"[{done}/{len(jobs)}] {plan.cases[keys[i]].name} {jobs[i][0].name} done")
    return [_case_row(case, [r for r, k in zip(runs, keys, strict=True) if k == n])
            for n, case in enumerate(plan.cases)]


def _case_row(case: Case, runs: list[dict]) -> dict:
    """A case's report row from its seed pairs' search results."""
    row = {"case": case, "runs": len(runs),
           "search_seconds": sum(r["search"]["search_seconds"] for r in runs)}
    for key in ("clean", "identity", "has", "random"):
        row[key] = _agg([r["results"][key] for r in runs])
    row["recovery"] = _agg([{"mean": r["recovery"], "ci95": [r["recovery"]] * 2} for r in runs])
    row["has_minus_random"] = _agg([{"mean": r["has_minus_random"],
                                     "ci95": [r["has_minus_random"]] * 2} for r in runs])
    return row


def _write_report(path: Path, plan: Plan, rows: list[dict], wall: float, quick: bool,
                  cases: str = "cases", suffix: str = "") -> None:
    st = plan.settings
    alg = "HAS" if st.algorithm == "ga" else st.algorithm
    opts = ", ".join(f"{k}={v}" for k, v in st.options.items())
    searcher = "" if not suffix else f" Searcher: {alg}{f' ({opts})' if opts else ''}."
    lines = [
        f"# HAS reproduction (paper §5.2){' -- quick' if quick else ''}"
        f"{f' -- {alg}' if suffix else ''}",
        "",
        f"Plan: {plan.description}.{searcher}",
        "",
        "Accuracies are held-out top-1 % with 95% intervals (over seed combinations when "
        "there are several, else over the held-out repeats of the single run). 'Paper' is "
        "what the paper's text reports for the case (it gives no intervals).",
        "",
        f"| case | paper | clean | degraded (identity) | {alg} | random (same budget) | "
        f"recovery (points) | {alg} - random | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rec, hmr = r["recovery"], r["has_minus_random"]
        lines.append(
            f"| {r['case'].name} | {r['case'].paper} | {_pct(r['clean'])} | "
            f"{_pct(r['identity'])} | {_pct(r['has'])} | {_pct(r['random'])} | "
            f"{100 * rec['mean']:+.1f}" + (f" [{100 * rec['ci95'][0]:+.1f}, "
                                           f"{100 * rec['ci95'][1]:+.1f}]" if rec["n"] > 1
                                           else "")
            + f" | {100 * hmr['mean']:+.1f} | {r['runs']} |")
    secs = sum(r["search_seconds"] for r in rows)
    lines += [
        "",
        f"Search time (summed, including earlier resumed sessions): {secs:.0f} s; this "
        f"invocation's wall time: {wall:.0f} s.",
        "",
        f"![recovery per case](recovery-cases{suffix}.png)",
        "",
        "Per-run folders (summary.json, schedule.json, history.csv, convergence.png, "
        f"recovery.png, summary.md) are under `{cases}/<case>/ms<model seed>_ps<profile "
        "seed>/`.",
        "",
    ]
    atomic_write(path, "\n".join(lines))
