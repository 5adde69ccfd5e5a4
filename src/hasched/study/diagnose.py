"""Black-box diagnosis: estimate a chip's per-PE fault rates from test vectors only.

The paper assumes the fault profile is known. Here it is measured: a *probe GEMM* is a
matrix product whose every output element is exactly one partial product on one known PE,
with inputs chosen so that any fault on it changes the output. Counting the outputs that
differ from the known answer, per PE, over ``runs`` probe GEMMs of ``columns`` columns,
gives a binomial count per PE, hence a rate and a confidence interval (Clopper-Pearson,
exact and conservative, or Wilson).

**Probe design** (from the documented mapping, :mod:`hasched.sim.mapping`): a dense GEMM
with ``K = 1`` has one chain per row, so each output element is a single partial product,
emitted by the PE the mapping names for that row (``LayerPlan.pe_chain``); with one row per
PE of the grid (gpu-tiles: row-block ``r`` on SM ``r``, row ``t`` of a block on thread
``t``) every PE is probed ``columns`` times per run. Weight ``v`` and input ``1`` make that
partial product exactly ``v``. The test value ``v`` is chosen for the fault model so that
a hit always changes it (e.g. 2.0 for flip-to-1, whose exponent bits 23-29 are all 0; 1.0
for flip-to-0); the detection probability ``d`` of the chosen value is computed from the
fault model and divides the observed rate when ``d < 1``. This needs faults at the
``output`` site (one PE emits each partial product: gpu-tiles); other sites would mix
several PEs into one output.

:class:`SimulatedChip` is the device under test: it runs GEMMs on the simulator with a
profile the diagnosis never reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.sim.arithmetic import Word
from hasched.sim.faults import FaultModel
from hasched.sim.layers import inject_faults
from hasched.sim.mapping import GemmShape, GpuTiles, Mapping
from hasched.sim.profile import FaultProfile

__all__ = ["Diagnosis", "SimulatedChip", "binomial_ci", "choose_test_value", "compare_to_truth",
           "detection_probability", "diagnose", "run_diagnosis"]

_FP32 = Word("float32")

# Test values tried per error model: powers of two clear all low exponent bits (flip-to-1),
# 1.0 sets them (flip-to-0), 2 - 2^-23 has a full mantissa (truncation).
_CANDIDATES = (2.0, 1.0, 2.0 - 2.0 ** -23, 3.0, 1.5, -2.0)


class SimulatedChip:
    """A faulty accelerator seen from outside: ``gemm(w, x)`` and nothing else.

    Args:
        profile: the chip's hidden per-PE transient rates.
        fault: what a fault does (a transient fault model).
        mapping: where partial products run (public: the probe design needs the mapping,
            not the rates); default gpu-tiles.
        seed: seed of the chip's fault draws.
    """

    def __init__(self, profile: FaultProfile, fault: FaultModel,
                 mapping: Mapping | None = None, seed: int = 0) -> None:
        if fault is None or getattr(fault, "permanent", False):
            raise HaschedError("diagnose estimates transient fault rates; give a transient "
                               "fault model (flip-to-1, bitflip, ...)")
        self.mapping = mapping or GpuTiles()
        profile.check(self.mapping.pe_shape)
        self._rates = torch.from_numpy(profile.flat_rates().copy())
        self.fault = fault
        self._g = torch.Generator().manual_seed(seed)

    def gemm(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``w (R, K) @ x (K, C)`` as a dense layer on the chip: ``(R, C)``."""
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        model, state = inject_faults(nn.Sequential(layer), ["0"], self.mapping, self._rates,
                                     self.fault, generator=self._g)
        state.configure(None, 1)
        with torch.no_grad():
            return model(x.T).T  # the samples are the GEMM's output columns


def detection_probability(fault: FaultModel, value: float, points: int = 4096) -> float:
    """Fraction of hits on ``value`` that change it (deterministic: a uniform grid of the
    fault model's randomness, the ``u`` of :meth:`FaultModel.corrupt`)."""
    u = (torch.arange(points, dtype=torch.float32) + 0.5) / points
    v = torch.full((points,), value, dtype=torch.float32)
    out = fault.corrupt(v, _FP32, None, u, None)
    return float((out != v).double().mean())


def choose_test_value(fault: FaultModel) -> tuple[float, float]:
    """The candidate value with the highest detection probability: ``(value, d)``."""
    best = max(_CANDIDATES, key=lambda v: detection_probability(fault, v))
    d = detection_probability(fault, best)
    if d <= 0:
        raise HaschedError(f"fault model {fault.name} leaves every test value unchanged; "
                           "its faults cannot be observed at the outputs")
    return best, d


def binomial_ci(hits: np.ndarray, trials: int | np.ndarray, confidence: float = 0.95,
                method: str = "clopper-pearson") -> tuple[np.ndarray, np.ndarray]:
    """Two-sided confidence interval of a binomial rate, elementwise.

    Args:
        hits: counts (any shape); trials: ``n`` per count (a number or an array like
            ``hits``, all >= 1).
        method: ``"clopper-pearson"`` (exact: coverage >= ``confidence`` for every rate)
            or ``"wilson"`` (score interval: coverage close to it on average).

    Returns:
        ``(low, high)`` arrays in [0, 1].
    """
    from scipy.stats import beta, norm

    x = np.asarray(hits, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    a = 1.0 - confidence
    if method == "clopper-pearson":
        with np.errstate(invalid="ignore"):
            low = np.where(x > 0, beta.ppf(a / 2, x, n - x + 1), 0.0)
            high = np.where(x < n, beta.ppf(1 - a / 2, x + 1, n - x), 1.0)
        return low, high
    if method == "wilson":
        z = norm.ppf(1 - a / 2)
        p = x / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    raise HaschedError(f"unknown interval method {method!r}; use clopper-pearson or wilson")


@dataclass(frozen=True)
class Diagnosis:
    """Estimated per-PE rates with confidence intervals, all ``(n_sms, pes_per_sm)``.

    Attributes:
        rates: point estimates (``hits / (trials * detection)``; 0 where unobserved).
        low, high: confidence bounds on the rate.
        hits: corrupted outputs counted per PE.
        trials: probe partial products per PE (``runs * columns`` per probe row on it; 0
            where unobserved).
        observed: PEs the mapping ever uses (threads below ``block_height``).
        value, detection: the test value and its detection probability.
    """

    rates: np.ndarray
    low: np.ndarray
    high: np.ndarray
    hits: np.ndarray
    trials: np.ndarray
    observed: np.ndarray
    value: float
    detection: float
    confidence: float
    method: str

    def profile(self) -> FaultProfile:
        return FaultProfile(rates=self.rates)

    def to_dict(self) -> dict:
        """A profile file's JSON (``--profile``/``--plan-profile`` accept it) that also
        carries the intervals and counts under ``"diagnosis"``."""
        return {"kind": "fault-profile", "rates": self.rates.tolist(), "fr_max": None,
                "seed": None, "diagnosis": {
                    "low": self.low.tolist(), "high": self.high.tolist(),
                    "hits": self.hits.tolist(), "trials": self.trials.tolist(),
                    "observed": self.observed.tolist(), "value": self.value,
                    "detection": self.detection, "confidence": self.confidence,
                    "method": self.method}}

    def save(self, path: str | Path) -> Path:
        """Writes :meth:`to_dict` to a ``.json`` file, atomically."""
        from hasched.io import atomic_write

        path = Path(path)
        if path.suffix != ".json":
            raise HaschedError(f"save a diagnosis as .json, got {path.name}")
        return atomic_write(path, json.dumps(self.to_dict()) + "\n")


def probe_pes(mapping: Mapping) -> tuple[int, torch.Tensor]:
    """Rows of the probe GEMM and the PE that emits each row's partial product.

    Returns:
        ``(rows, LongTensor[rows])``: as many rows as the grid has PEs, ``K = 1`` (a mapping
        that uses fewer threads per SM than it has probes some PEs twice, others never).

    Raises:
        HaschedError: the mapping has no single PE per partial product.
    """
    rows = mapping.n_pes
    plan = mapping.plan(GemmShape(rows=rows, k=1))
    if plan.pe_chain is None:
        raise HaschedError(f"diagnose needs a mapping where one PE emits each partial product "
                           f"(gpu-tiles); {mapping.spec()} accumulates along a row of PEs")
    return rows, plan.pe_chain[:, 0].long()


def diagnose(chip: SimulatedChip, runs: int, columns: int = 4096, confidence: float = 0.95,
             method: str = "clopper-pearson") -> Diagnosis:
    """Estimate the chip's per-PE rates from ``runs`` probe GEMMs of ``columns`` columns."""
    if runs < 1 or columns < 1:
        raise HaschedError(f"runs and columns must be >= 1, got {runs}, {columns}")
    if not 0 < confidence < 1:
        raise HaschedError(f"confidence must lie in (0, 1), got {confidence}")
    site = chip.mapping.check_site(chip.fault.site)
    if site != "output":
        raise HaschedError(f"diagnose observes faults at the output site; {chip.fault.name} "
                           f"hits the {site} site here")
    value, d = choose_test_value(chip.fault)
    rows, pe = probe_pes(chip.mapping)
    w = torch.full((rows, 1), value)
    x = torch.ones(1, columns)
    hits = torch.zeros(rows, dtype=torch.long)
    for _ in range(runs):
        hits += (chip.gemm(w, x) != value).sum(1)  # (rows,) corrupted outputs per row
    shape = chip.mapping.pe_shape
    n_pes = shape[0] * shape[1]
    counts = torch.zeros(n_pes, dtype=torch.long).index_add_(0, pe, hits)
    probes = torch.zeros(n_pes, dtype=torch.long).index_add_(0, pe, torch.ones_like(pe))
    counts, observed = counts.reshape(shape).numpy(), probes.reshape(shape).numpy() > 0
    n = probes.reshape(shape).numpy() * (runs * columns)  # trials per PE
    low, high = binomial_ci(counts, np.maximum(n, 1), confidence, method)
    rates = np.where(observed, np.minimum(counts / (np.maximum(n, 1) * d), 1.0), 0.0)
    low = np.where(observed, np.minimum(low / d, 1.0), 0.0)
    high = np.where(observed, np.minimum(high / d, 1.0), 1.0)
    return Diagnosis(rates, low, high, counts, n, observed, value, d, confidence, method)


def run_diagnosis(chip: SimulatedChip, out: str | Path, runs: int, columns: int = 4096,
                  confidence: float = 0.95, method: str = "clopper-pearson") -> Diagnosis:
    """:func:`diagnose`, then the estimate written to ``out`` (a new ``.json`` file).

    Raises:
        HaschedError: ``out`` exists, is not ``.json`` or cannot be written; checked
            before any probe runs.
    """
    from hasched.io import check_out_file, make_dirs

    out = Path(out)
    if out.suffix != ".json":
        raise HaschedError(f"--out must be a .json file, got {out.name}")
    check_out_file(out, option="--out")
    diag = diagnose(chip, runs, columns, confidence, method)
    make_dirs(out.parent)
    diag.save(out)
    return diag


def compare_to_truth(diag: Diagnosis, truth: FaultProfile) -> dict:
    """How a diagnosis matches the true profile (only a simulation can know this)."""
    from scipy.stats import spearmanr

    obs = diag.observed
    t, e = truth.rates[obs], diag.rates[obs]
    inside = (diag.low[obs] <= t) & (t <= diag.high[obs])
    rho = spearmanr(t, e).statistic if np.ptp(t) > 0 else float("nan")
    return {"pes": int(obs.sum()), "mean_abs_error": float(np.abs(t - e).mean()),
            "max_abs_error": float(np.abs(t - e).max()), "ci_coverage": float(inside.mean()),
            "spearman": float(rho) if not math.isnan(rho) else None}
