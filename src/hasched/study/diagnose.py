"""Black-box diagnosis: estimate a chip's per-PE fault rates from test vectors only.

The paper assumes the fault profile is known. Here it is measured: a *probe GEMM* is a
matrix product whose every output element is exactly one partial product on one known PE,
with inputs chosen so that any fault on it changes the output. Counting the outputs that
differ from the known answer, per PE, over ``runs`` probe GEMMs of ``columns`` columns,
gives a binomial count per PE, hence a rate and a confidence interval (Clopper-Pearson,
exact and conservative, or Wilson).

**Probe design** (for the documented tile mapping of :mod:`hasched.sim.hardware`): a dense
GEMM with ``n_sms * block_height`` rows and one K-block (``K = dense_block_width``) has one
row-block per SM, so row ``r * block_height + t`` runs on thread ``t`` of SM ``r``, and
each output element is a single partial product. Weight row ``[v, 0, ..., 0]`` and input
column ``[1, 0, ..., 0]`` make that partial product exactly ``v``. The test value ``v`` is
chosen for the error model so that a hit always changes it (e.g. 2.0 for flip-to-1, whose
exponent bits 23-29 are all 0; 1.0 for flip-to-0); the detection probability ``d`` of the
chosen value is computed from the error model and divides the observed rate when ``d < 1``.

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

from hasched.errors import HaschedError
from hasched.sim.faults import ErrorModel
from hasched.sim.gemm import faulty_gemm
from hasched.sim.hardware import AcceleratorConfig, FaultProfile, layer_tiling, slot_rates

__all__ = ["Diagnosis", "SimulatedChip", "binomial_ci", "choose_test_value", "compare_to_truth",
           "detection_probability", "diagnose"]

# Test values tried per error model: powers of two clear all low exponent bits (flip-to-1),
# 1.0 sets them (flip-to-0), 2 - 2^-23 has a full mantissa (truncation).
_CANDIDATES = (2.0, 1.0, 2.0 - 2.0 ** -23, 3.0, 1.5, -2.0)


class SimulatedChip:
    """A faulty accelerator seen from outside: ``gemm(w, x)`` and nothing else.

    Args:
        profile: the chip's hidden per-PE rates.
        error_model: what a fault does.
        accel: geometry (public: the probe design needs the mapping, not the rates).
        seed: seed of the chip's fault draws.
    """

    def __init__(self, profile: FaultProfile, error_model: ErrorModel,
                 accel: AcceleratorConfig | None = None, seed: int = 0) -> None:
        self.accel = accel or AcceleratorConfig()
        profile.check(self.accel)
        self._profile, self.error_model = profile, error_model
        self._g = torch.Generator().manual_seed(seed)

    def gemm(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``w (R, K) @ x (K, C)`` as a dense layer on the chip: ``(R, C)``."""
        tiling = layer_tiling(w.shape[0], w.shape[1], self.accel)
        rates = slot_rates(self._profile, tiling, self.accel)[None]  # (1, R, n_k)
        return faulty_gemm(w, x[None], tiling, rates, self.error_model, self._g)[0, 0]


def detection_probability(error_model: ErrorModel, value: float, points: int = 4096) -> float:
    """Fraction of hits on ``value`` that change it (deterministic: a uniform grid of the
    error model's randomness, :meth:`ErrorModel.corrupt_u`)."""
    u = (torch.arange(points, dtype=torch.float32) + 0.5) / points
    v = torch.full((points,), value, dtype=torch.float32)
    out = error_model.corrupt_u(v, u)
    return float((out != v).double().mean())


def choose_test_value(error_model: ErrorModel) -> tuple[float, float]:
    """The candidate value with the highest detection probability: ``(value, d)``."""
    best = max(_CANDIDATES, key=lambda v: detection_probability(error_model, v))
    d = detection_probability(error_model, best)
    if d <= 0:
        raise HaschedError(f"error model {error_model.name} leaves every test value unchanged; "
                           "its faults cannot be observed at the outputs")
    return best, d


def binomial_ci(hits: np.ndarray, trials: int, confidence: float = 0.95,
                method: str = "clopper-pearson") -> tuple[np.ndarray, np.ndarray]:
    """Two-sided confidence interval of a binomial rate, elementwise.

    Args:
        hits: counts (any shape); trials: ``n`` per count.
        method: ``"clopper-pearson"`` (exact: coverage >= ``confidence`` for every rate)
            or ``"wilson"`` (score interval: coverage close to it on average).

    Returns:
        ``(low, high)`` arrays in [0, 1].
    """
    from scipy.stats import beta, norm

    x = np.asarray(hits, dtype=np.float64)
    n = float(trials)
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
        trials: probe partial products per PE (``runs * columns``).
        observed: PEs the mapping ever uses (threads below ``block_height``).
        value, detection: the test value and its detection probability.
    """

    rates: np.ndarray
    low: np.ndarray
    high: np.ndarray
    hits: np.ndarray
    trials: int
    observed: np.ndarray
    value: float
    detection: float
    confidence: float
    method: str

    def profile(self) -> FaultProfile:
        return FaultProfile(rates=self.rates)

    def save(self, path: str | Path) -> Path:
        """A ``.json`` profile file (``--profile``/``--plan-profile`` accept it) that also
        carries the intervals and counts under ``"diagnosis"``."""
        path = Path(path)
        if path.suffix != ".json":
            raise HaschedError(f"save a diagnosis as .json, got {path.name}")
        obj = {"rates": self.rates.tolist(), "fr_max": None, "seed": None, "diagnosis": {
            "low": self.low.tolist(), "high": self.high.tolist(), "hits": self.hits.tolist(),
            "trials": self.trials, "observed": self.observed.tolist(), "value": self.value,
            "detection": self.detection, "confidence": self.confidence, "method": self.method}}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj))
        tmp.replace(path)
        return path


def probe_gemm(accel: AcceleratorConfig, value: float,
               columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w (n_sms * block_height, K), x (K, columns))`` of one probe (module docstring)."""
    rows, k = accel.n_sms * accel.block_height, accel.dense_block_width
    w = torch.zeros(rows, k)
    w[:, 0] = value
    x = torch.zeros(k, columns)
    x[0] = 1.0
    return w, x


def diagnose(chip: SimulatedChip, runs: int, columns: int = 4096, confidence: float = 0.95,
             method: str = "clopper-pearson") -> Diagnosis:
    """Estimate the chip's per-PE rates from ``runs`` probe GEMMs of ``columns`` columns."""
    if runs < 1 or columns < 1:
        raise HaschedError(f"runs and columns must be >= 1, got {runs}, {columns}")
    if not 0 < confidence < 1:
        raise HaschedError(f"confidence must lie in (0, 1), got {confidence}")
    accel = chip.accel
    value, d = choose_test_value(chip.error_model)
    w, x = probe_gemm(accel, value, columns)
    hits = torch.zeros(w.shape[0], dtype=torch.long)
    for _ in range(runs):
        out = chip.gemm(w, x)  # (rows, columns)
        hits += (out != value).sum(1)
    bh = accel.block_height
    counts = np.zeros((accel.n_sms, accel.pes_per_sm), dtype=np.int64)
    counts[:, :bh] = hits.reshape(accel.n_sms, bh).numpy()  # row r*bh + t -> (SM r, thread t)
    observed = np.zeros_like(counts, dtype=bool)
    observed[:, :bh] = True
    n = runs * columns
    low, high = binomial_ci(counts, n, confidence, method)
    rates = np.where(observed, np.minimum(counts / (n * d), 1.0), 0.0)
    low = np.where(observed, np.minimum(low / d, 1.0), 0.0)
    high = np.where(observed, np.minimum(high / d, 1.0), 1.0)
    return Diagnosis(rates, low, high, counts, n, observed, value, d, confidence, method)


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
