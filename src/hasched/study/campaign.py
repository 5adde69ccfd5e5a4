"""Fault-sensitivity campaigns (paper section 5.1): a grid of faulty evaluations.

The grid is model seeds x layer entries x error types x FR_max x profile seeds; every
*cell* is one evaluator (:func:`hasched.study.build.build_evaluator`, the same engine as
``hasched evaluate``) evaluated ``repeats`` times with fresh error instances. The error seed
of a cell is a stable hash of its coordinates, so a resumed campaign gives exactly the rows
of an uninterrupted one.

Layout of a campaign folder::

    DIR/config.json          the grid (a rerun with other arguments is refused)
    DIR/.hasched.lock        the PID of the run writing the folder (a second one is refused)
    DIR/parts/<cell>.json    one file per finished cell, written atomically (tmp + rename)
    DIR/results.csv          tidy table, one row per evaluation, rebuilt from the parts
    DIR/summary.csv          mean +- std over model seeds x profile seeds x repeats

A folder holds exactly one grid. To grow a study (e.g. seed 1 now, seeds 2,3 later) run
the new part into another folder and pool them with ``hasched report DIR1 DIR2``: cells
are content-addressed (their error seed depends only on their coordinates), so pooled
folders give the same numbers as one big campaign.

Example:
    >>> cfg = CampaignConfig.from_args("mnist32-cnn", seeds="1", layers="c0", errors="bitflip")
    >>> len(expand_grid(cfg))
    6
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import pandas as pd

from hasched.errors import HaschedError
from hasched.io import (
    atomic_write,
    check_fields,
    check_out_dir,
    claim_out_dir,
    make_dirs,
    read_json,
    require,
)
from hasched.seeds import derive_seed
from hasched.sim.gemm import SAMPLER_VERSION
from hasched.study.executor import Executor, LocalExecutor
from hasched.study.scenario import Scenario

__all__ = [
    "SWEEP_FR_MAX",
    "CampaignConfig",
    "Cell",
    "expand_grid",
    "run_campaign",
    "load_results",
    "summarize_results",
    "RESULT_COLUMNS",
]

FORMAT_VERSION = 2  # 2: the whole scenario in every row

# The wider sweep drawn as curves (``--fr-max sweep``), on top of Table 1's rates.
SWEEP_FR_MAX: tuple[float, ...] = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2,
                                   0.1, 0.2, 0.5)

# One row per evaluation; with the campaign's base scenario the first 13 columns re-create
# the row's Scenario exactly ("error" is the fault model).
RESULT_COLUMNS = ["model", "seed", "layers", "mapping", "n_sms", "k_order", "arithmetic",
                  "multiplier", "error", "fault_params", "fr_max", "profile_seed", "metric",
                  "repeat", "error_seed", "images", "clean_accuracy", "accuracy",
                  "degradation_pts"]
GROUP_COLUMNS = ["model", "layers", "error", "fr_max"]


def _ints(spec: str | int | list[int] | tuple[int, ...], what: str) -> tuple[int, ...]:
    if isinstance(spec, int):
        return (spec,)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    try:
        out = tuple(int(s) for s in items if str(s) != "")
    except ValueError:
        raise HaschedError(f"--{what} must be a comma-separated list of integers, got "
                           f"{spec!r}") from None
    if not out:
        raise HaschedError(f"--{what} is empty")
    if len(set(out)) != len(out):
        raise HaschedError(f"--{what} lists a value twice: {spec!r}")
    return out


def _errors(errors: str | list[str]) -> list[str]:
    """Fault specs (``name`` or ``name:key=value,...``) to sweep."""
    from hasched.sim.faults import PAPER_FR_MAX, list_fault_models
    from hasched.study.scenario import parse_fault, split_fault_list

    names = list_fault_models()
    if isinstance(errors, str):
        errs = list(PAPER_FR_MAX) if errors.strip() == "all" else split_fault_list(errors)
    else:
        errs = list(errors)
    for e in errs:
        if parse_fault(e)[0] not in names:
            raise HaschedError(f"unknown error model {e!r}; known: {', '.join(names)}")
    if not errs or len(set(errs)) != len(errs):
        raise HaschedError(f"--errors must list distinct error models, got {errors!r}")
    return errs


def _rates(fr_max: str | list[float], errs: list[str]) -> str | tuple[float, ...]:
    from hasched.sim.faults import PAPER_FR_MAX

    if isinstance(fr_max, str) and fr_max.strip() in ("paper", "sweep"):
        missing = [e for e in errs if _name(e) not in PAPER_FR_MAX]
        if missing:
            raise HaschedError(f"the paper gives no FR_max for {', '.join(missing)}; "
                               "pass explicit rates with --fr-max 1e-3,2e-3")
        return fr_max.strip()
    items = fr_max.split(",") if isinstance(fr_max, str) else fr_max
    try:
        frs = tuple(sorted({float(v) for v in items if str(v).strip()}))
    except ValueError:
        raise HaschedError(f"--fr-max must be paper, sweep or rates like 1e-3,5e-3; "
                           f"got {fr_max!r}") from None
    if not frs or not all(0 < v <= 1 and math.isfinite(v) for v in frs):
        raise HaschedError(f"--fr-max rates must lie in (0, 1], got {fr_max!r}")
    return frs


def _normalized(base: Scenario, model: str) -> Scenario:
    """The base with every field a cell sets reset, so that a config records (and a
    resume compares) only what is really common to all cells."""
    d = Scenario()
    return base.replace(model=model, seed=d.seed, layers=d.layers, fault=d.fault,
                        fault_params=d.fault_params, fr_max=d.fr_max,
                        profile_seed=d.profile_seed, repeats=d.repeats, images=None,
                        error_seed=d.error_seed)


def _fault_fields(spec: str) -> dict:
    from hasched.study.scenario import parse_fault

    name, params = parse_fault(spec)
    return {"fault": name, "fault_params": params} if params else {"fault": name}


def _name(spec: str) -> str:
    return spec.partition(":")[0]


@dataclass(frozen=True)
class CampaignConfig:
    """What a campaign computes (its identity; workers and progress are not part of it).

    Attributes:
        model: Registered model name.
        seeds: Model seeds.
        layers: Layer entries; an entry of several layers (``"c0+c1"``) faults them together.
        errors: Error model names (``"all"`` in :meth:`from_args`: the paper's five).
        fr_max: ``"paper"`` (Table 1 per error), ``"sweep"`` (Table 1 plus
            :data:`SWEEP_FR_MAX`) or a tuple of rates used for every error.
        profile_seeds: Fault-profile seeds.
        repeats: Error instances per cell.
        images: Test images (``N``, ``A:B``; ``None`` = all).
        device: ``"cpu"`` or ``"cuda"`` (random draws differ between them).
    """

    model: str
    seeds: tuple[int, ...] = (1, 2, 3)
    layers: tuple[str, ...] = ("c0",)
    errors: tuple[str, ...] = ("flip-to-1",)
    fr_max: str | tuple[float, ...] = "paper"
    profile_seeds: tuple[int, ...] = (1, 2)
    repeats: int = 3
    images: str | None = "1000"
    device: str = "cpu"
    base: Scenario = field(default_factory=Scenario)

    @classmethod
    def from_args(
        cls,
        model: str,
        seeds: str | list[int] = "1,2,3",
        layers: str | list[str] = "each",
        errors: str | list[str] = "all",
        fr_max: str | list[float] = "paper",
        profile_seeds: str | list[int] = "1,2",
        repeats: int = 3,
        images: str | int | None = 1000,
        device: str = "cpu",
        base: Scenario | None = None,
    ) -> CampaignConfig:
        """Parses and validates command-line style arguments (raises HaschedError).

        ``base`` holds the scenario fields that are not swept (mapping, arithmetic, fault
        parameters, metric...); its model, seed, layers, fault, rates and images are
        replaced per cell.
        """
        from hasched.study.build import model_layer_names
        from hasched.study.scenario import parse_layer_groups

        groups = parse_layer_groups(layers, model_layer_names((base or Scenario()).replace(
            model=model)))
        errs = _errors(errors)
        frs = _rates(fr_max, errs)
        if int(repeats) < 1:
            raise HaschedError(f"--repeats must be >= 1, got {repeats}")
        if images is not None:
            from hasched.study.build import check_image_spec

            check_image_spec(str(images).strip())
        dev = str(device or "cpu").split(":")[0]
        if dev not in ("cpu", "cuda"):
            raise HaschedError(f"--device must be cpu or cuda, got {device!r}")
        base = _normalized(base or Scenario(), model)
        for e in errs:  # every fault must build with the base's parameters
            base.replace(**_fault_fields(e), fr_max=0.0).validate()
        return cls(model=model, seeds=_ints(seeds, "seeds"),
                   layers=tuple("+".join(g) for g in groups), errors=tuple(errs), fr_max=frs,
                   profile_seeds=_ints(profile_seeds, "profile-seeds"), repeats=int(repeats),
                   images=None if images is None else str(images).strip(), device=dev,
                   base=base)

    def scenario(self, cell: Cell) -> Scenario:
        """The full scenario of one cell."""
        return self.base.replace(model=self.model, seed=cell.seed,
                                 layers=tuple(cell.layers.split("+")), **_fault_fields(cell.error),
                                 fr_max=cell.fr_max, profile_seed=cell.profile_seed,
                                 repeats=self.repeats, images=self.images,
                                 error_seed=cell.error_seed(self.model))

    def rates(self, error: str) -> tuple[float, ...]:
        """The FR_max values of one error type."""
        from hasched.sim.faults import PAPER_FR_MAX

        if self.fr_max == "paper":
            return tuple(PAPER_FR_MAX[_name(error)])
        if self.fr_max == "sweep":
            return tuple(sorted(set(PAPER_FR_MAX[_name(error)]) | set(SWEEP_FR_MAX)))
        return tuple(self.fr_max)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "base"}
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["base"] = self.base.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CampaignConfig:
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        d["base"] = Scenario.from_dict(d.get("base", {}))
        return cls(**d)


@dataclass(frozen=True)
class Cell:
    """One evaluator of the grid: its coordinates."""

    seed: int
    layers: str
    error: str
    fr_max: float
    profile_seed: int

    @property
    def key(self) -> str:
        return f"s{self.seed}_{self.layers}_{self.error}_{self.fr_max:.6g}_p{self.profile_seed}"

    def error_seed(self, model: str) -> int:
        """Stable across runs, processes and Python versions (not ``hash()``)."""
        return derive_seed(model, self.key)


def expand_grid(cfg: CampaignConfig) -> list[Cell]:
    """Every cell of the campaign, in a fixed order (also the order of the table)."""
    return [Cell(s, layer, e, float(fr), p)
            for s in cfg.seeds for layer in cfg.layers for e in cfg.errors
            for fr in cfg.rates(e) for p in cfg.profile_seeds]


# ---------------------------------------------------------------- the results store

def _part_path(out: Path, cell: Cell) -> Path:
    return out / "parts" / f"{cell.key}.json"


def _want(cfg: CampaignConfig) -> dict:
    return {"format": FORMAT_VERSION, "sampler": SAMPLER_VERSION, "config": cfg.to_dict()}


def check_campaign_dir(out: str | Path, cfg: CampaignConfig) -> bool:
    """The output-folder policy for a campaign (reads only): True when ``out`` is resumed.

    Raises:
        HaschedError: ``out`` is a file, foreign, or holds a different campaign.
    """
    want = _want(cfg)

    def compatible(have: dict, path: Path) -> None:
        if not isinstance(have.get("config"), dict) or "format" not in have:
            raise HaschedError(f"{path} is not a sensitivity campaign's config (another "
                               "command's folder?); use another --out")
        if have != want:
            old = have["config"]
            diff = sorted(k for k in set(old) | set(want["config"])
                          if old.get(k) != want["config"].get(k))
            if not diff:  # same grid, other engine: resuming would mix error draws
                diff = ["format/sampler version of an older hasched"]
            raise HaschedError(f"{out} holds a different campaign (differs in: "
                               f"{', '.join(diff)}); rerun with its arguments or use "
                               "another --out")

    return check_out_dir(out, what="campaign", compatible=compatible)


@contextlib.contextmanager
def open_store(
    out: str | Path, cfg: CampaignConfig, log: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Checks ``out``, then creates it with its config and holds its lock in the block."""
    check_campaign_dir(out, cfg)
    with claim_out_dir(out, _want(cfg), log=log) as folder:
        make_dirs(folder / "parts")
        yield folder


_CONFIG_FIELDS = {"model": str, "seeds": list[int], "layers": list[str], "errors": list[str],
                  "fr_max": str | list[float], "profile_seeds": list[int], "repeats": int,
                  "images": str | None, "device": str, "base": dict}


def read_config(out: str | Path) -> CampaignConfig:
    """The grid of a campaign folder, schema-checked (errors name the file and field)."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise HaschedError(f"{out} is not a campaign folder (no config.json)")
    d = require(read_json(path, what="campaign config"), "config", dict, file=path)
    return CampaignConfig.from_dict(check_fields(d, _CONFIG_FIELDS, file=path, where="config"))


def _finished(out: Path, cells: list[Cell]) -> dict[str, list[dict]]:
    """Rows of every finished cell; tmp files and unreadable parts count as unfinished."""
    done: dict[str, list[dict]] = {}
    for cell in cells:
        path = _part_path(out, cell)
        if not path.is_file():
            continue
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            rows = obj["rows"]
            if obj.get("key") != cell.key or not isinstance(rows, list) or not rows:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        done[cell.key] = rows
    return done


def _rows(cfg: CampaignConfig, cell: Cell, res: dict) -> list[dict]:
    clean = float(res["clean_accuracy"])
    scn = cfg.scenario(cell)
    fixed = {"model": cfg.model, "seed": cell.seed, "layers": cell.layers,
             "mapping": scn.mapping, "n_sms": scn.n_sms, "k_order": scn.k_order,
             "arithmetic": scn.arithmetic, "multiplier": scn.multiplier, "error": cell.error,
             "fault_params": json.dumps(dict(scn.fault_params), sort_keys=True),
             "fr_max": cell.fr_max, "profile_seed": cell.profile_seed, "metric": scn.metric,
             "error_seed": cell.error_seed(cfg.model), "images": int(res["images"]),
             "clean_accuracy": clean}
    return [{**fixed, "repeat": i, "accuracy": float(a),
             "degradation_pts": 100.0 * (clean - float(a))}
            for i, a in enumerate(res["accuracies"])]


def load_results(out: str | Path) -> pd.DataFrame:
    """The tidy table of a campaign folder, rebuilt from its finished part files."""
    out = Path(out)
    cfg = read_config(out)
    cells = expand_grid(cfg)
    done = _finished(out, cells)
    rows = [r for c in cells if c.key in done for r in done[c.key]]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def summarize_results(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof=1) per model x layers x error x FR_max.

    The statistics pool every row of a group, i.e. model seeds x profile seeds x repeats.
    """
    g = df.groupby(GROUP_COLUMNS, sort=True)
    s = g.agg(n=("accuracy", "size"), clean_accuracy=("clean_accuracy", "mean"),
              accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
              degradation_mean_pts=("degradation_pts", "mean"),
              degradation_std_pts=("degradation_pts", "std")).reset_index()
    return s.fillna({"accuracy_std": 0.0, "degradation_std_pts": 0.0})


def write_tables(out: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuilds ``results.csv`` and ``summary.csv`` from the parts (atomically)."""
    out = Path(out)
    df = load_results(out)
    summary = summarize_results(df)
    atomic_write(out / "results.csv", df.to_csv(index=False))
    atomic_write(out / "summary.csv", summary.to_csv(index=False))
    return df, summary


# ---------------------------------------------------------------- running

Evaluate = Callable[[CampaignConfig, Cell], dict]
_WORKER: dict = {}


def _default_evaluate(cfg: CampaignConfig, cell: Cell) -> dict:
    """Builds the cell's evaluator (model and data cached per process) and evaluates it."""
    from hasched.study.build import build_evaluator, evaluate, load_images

    device = _WORKER.get("device", cfg.device)
    dkey = ("data", device)
    if dkey not in _WORKER:
        _WORKER[dkey] = load_images(cfg.base, cfg.images, _WORKER.get("data_dir"), device)
    scn = cfg.scenario(cell)
    ev = build_evaluator(scn, device=device, models_dir=_WORKER.get("models_dir"),
                         data_dir=_WORKER.get("data_dir"), progress=False, data=_WORKER[dkey])
    return evaluate(ev, repeats=scn.repeats, error_seed=scn.error_seed)


def _setup_worker(models_dir, data_dir, device: str, threads: int) -> None:
    """Prepares a worker (process or Ray task) for :func:`_work` (picklable as a partial)."""
    _WORKER.update(models_dir=models_dir, data_dir=data_dir, device=device)


def _work(args: tuple) -> tuple[str, dict]:
    cfg, cell, fn = args
    return cell.key, (fn or _default_evaluate)(cfg, cell)


def _devices(cfg: CampaignConfig, workers: int, evaluate_fn: Evaluate | None) -> list[str]:
    if cfg.device == "cuda" and evaluate_fn is None:
        from hasched.study.build import resolve_device

        resolve_device("cuda")
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"] * workers


def _check_inputs(cfg: CampaignConfig, models_dir, data_dir, train: bool) -> None:
    """What the real engine needs, checked before the folder is created."""
    from hasched.study.build import load_images, require_model

    load_images(cfg.base, cfg.images, data_dir)  # the dataset is there, the range fits
    if not train:
        for seed in cfg.seeds:
            require_model(cfg.base.replace(seed=seed), models_dir)


def run_campaign(
    cfg: CampaignConfig,
    out: str | Path,
    *,
    workers: int = 1,
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    max_cells: int | None = None,
    evaluate_fn: Evaluate | None = None,
    train: bool = False,
    executor: Executor | None = None,
) -> dict:
    """Runs (or resumes) a campaign into ``out`` and rebuilds its tables.

    Everything is checked (folder policy, image range, device, checkpoints) before the
    folder is created; while it runs, the folder is locked against a second writer.

    Args:
        cfg: The grid.
        out: Campaign folder; an existing one must hold the same ``cfg``.
        workers: CPU worker processes (spawned; each loads model and data once and gets
            ``cpu_count // workers`` torch threads). On CUDA, one process per visible GPU.
        models_dir, data_dir: Checkpoint store and dataset location.
        progress: tqdm bar with ETA on stderr.
        log: One-line messages (e.g. training a missing checkpoint).
        max_cells: Stop after this many newly finished cells (a controlled interruption).
        evaluate_fn: ``(cfg, cell) -> {"clean_accuracy", "accuracies", "images"}``;
            defaults to :func:`hasched.study.build.evaluate` on a fresh evaluator. Must be picklable
            when ``workers > 1``.
        train: Train missing checkpoints (else a missing one is an error).
        executor: Where cells run (default: :class:`LocalExecutor` with ``workers``);
            e.g. :class:`hasched.study.executor.RayExecutor`. The tables do not depend on it.

    Returns:
        ``{"cells", "done_before", "computed", "rows", "seconds", "complete"}``.
    """
    if workers < 1:
        raise HaschedError(f"--workers must be >= 1, got {workers}")
    check_campaign_dir(out, cfg)
    executor = executor or LocalExecutor(workers, tuple(_devices(cfg, workers, evaluate_fn)))
    if evaluate_fn is None:
        _check_inputs(cfg, models_dir, data_dir, train)
    with open_store(out, cfg, log=log) as out:
        cells = expand_grid(cfg)
        done = _finished(out, cells)
        pending = [c for c in cells if c.key not in done]
        if max_cells is not None:
            pending = pending[:max_cells]
        if pending and evaluate_fn is None:
            from hasched.zoo.load import load_model

            for seed in cfg.seeds:  # train missing checkpoints once, before any worker starts
                load_model(cfg.base.model_ref(), seed, models_dir=models_dir,
                           data_dir=data_dir, train=train, log=log, progress=progress)
        t0 = time.perf_counter()
        computed = _compute(cfg, out, cells, len(done), pending, executor, evaluate_fn,
                            partial(_setup_worker, models_dir, data_dir), progress)
        seconds = time.perf_counter() - t0
        df, _ = write_tables(out)
    return {"cells": len(cells), "done_before": len(done), "computed": computed,
            "rows": len(df), "seconds": seconds,
            "complete": len(done) + computed == len(cells)}


def _compute(cfg: CampaignConfig, out: Path, cells: list[Cell], n_done: int,
             pending: list[Cell], executor: Executor, evaluate_fn: Evaluate | None,
             setup: Callable[[str, int], None], progress: bool) -> int:
    """Evaluates the pending cells, saving each as it finishes; returns how many."""
    from tqdm import tqdm

    bar = tqdm(total=len(cells), initial=n_done, desc=f"sensitivity {cfg.model}", unit="cell",
               disable=not progress, dynamic_ncols=True)
    computed = 0
    jobs = [(cfg, c, evaluate_fn) for c in pending]
    try:
        for _, (key, res) in executor.map_unordered(_work, jobs, setup):
            cell = next(c for c in pending if c.key == key)
            obj = {"key": key, "cell": asdict(cell), "rows": _rows(cfg, cell, res)}
            atomic_write(_part_path(out, cell), json.dumps(obj) + "\n")
            computed += 1
            bar.update(1)
    finally:
        bar.close()
        _WORKER.clear()
    return computed
