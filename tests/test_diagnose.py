"""Tests for hasched.study.diagnose: probe GEMMs, binomial intervals, estimated profiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hasched.errors import HaschedError
from hasched.sim.faults import create_fault
from hasched.sim.mapping import GpuTiles, Systolic
from hasched.sim.profile import FaultProfile
from hasched.study.diagnose import (
    SimulatedChip,
    binomial_ci,
    choose_test_value,
    compare_to_truth,
    detection_probability,
    diagnose,
)


def test_clopper_pearson_and_wilson_textbook_values():
    lo, hi = binomial_ci(np.array([0, 10]), 10, 0.95, "clopper-pearson")
    # x = 0: upper = 1 - (alpha/2)^(1/n); x = n: lower = (alpha/2)^(1/n).
    assert lo[0] == 0.0 and hi[0] == pytest.approx(1 - 0.025 ** 0.1, abs=1e-9)
    assert lo[1] == pytest.approx(0.025 ** 0.1, abs=1e-9) and hi[1] == 1.0
    lo, hi = binomial_ci(np.array([5]), 10, 0.95, "wilson")
    assert lo[0] == pytest.approx(0.2366, abs=1e-4) and hi[0] == pytest.approx(0.7634, abs=1e-4)
    with pytest.raises(HaschedError, match="method"):
        binomial_ci(np.array([1]), 10, 0.95, "wald")


@pytest.mark.parametrize("method,least", [("clopper-pearson", 0.95), ("wilson", 0.93)])
def test_interval_coverage_at_a_realistic_rate(method, least):
    # 3000 binomial counts at p = 3e-3, n = 4096. Clopper-Pearson is exact, so its coverage
    # is >= 95 % for every p; Wilson's is close on average. The estimate's standard error
    # is ~0.004, so 3 of them are allowed below the nominal level.
    p, n, reps = 3e-3, 4096, 3000
    x = np.random.default_rng(0).binomial(n, p, reps)
    lo, hi = binomial_ci(x, n, 0.95, method)
    cover = float(((lo <= p) & (p <= hi)).mean())
    assert cover >= least - 3 * math.sqrt(0.05 * 0.95 / reps), cover


def test_test_values_are_always_detected():
    flip1, flip0 = create_fault("flip-to-1"), create_fault("flip-to-0")
    # 2.0 has exponent 128 (bits 23-29 clear): setting any of them changes it; 1.0 has
    # exponent 127 (bits 23-29 set): flip-to-1 there changes nothing at all.
    assert detection_probability(flip1, 2.0) == 1.0 and detection_probability(flip1, 1.0) == 0
    assert choose_test_value(flip1) == (2.0, 1.0) and choose_test_value(flip0) == (1.0, 1.0)
    assert choose_test_value(create_fault("tf32"))[1] == 1.0
    assert choose_test_value(create_fault("bitflip"))[1] == 1.0


def test_probe_gemm_counts_land_on_the_right_pe():
    rates = np.zeros((20, 32))
    rates[7, 13] = 1.0  # one broken PE: every probe on it is corrupted, nothing else is
    chip = SimulatedChip(FaultProfile(rates=rates), create_fault("bitflip"), GpuTiles(), 0)
    diag = diagnose(chip, runs=2, columns=64)
    assert (diag.trials == 128).all() and diag.hits[7, 13] == 128 and diag.hits.sum() == 128
    assert diag.rates[7, 13] == 1.0 and diag.rates.sum() == 1.0
    assert diag.high[0, 0] == pytest.approx(1 - 0.025 ** (1 / 128))


def test_diagnosis_covers_the_true_rates_and_ranks_them():
    truth = FaultProfile.generate(5e-3, 1)
    chip = SimulatedChip(truth, create_fault("flip-to-1"), seed=3)
    diag = diagnose(chip, runs=2, columns=4096)
    check = compare_to_truth(diag, truth)
    # 640 PEs, each inside its exact 95 % interval with probability >= 0.95: the number
    # outside is at most Binomial(640, 0.05), mean 32, sd 5.5.
    assert check["pes"] == 640 and (1 - check["ci_coverage"]) * 640 <= 32 + 4 * 5.5
    assert check["spearman"] > 0.8
    # More probes, smaller error.
    more = compare_to_truth(diagnose(chip, runs=8, columns=4096), truth)
    assert more["mean_abs_error"] < check["mean_abs_error"]


def test_unobserved_threads_and_saved_profile(tmp_path):
    # 16 of 32 threads per SM are used: those are probed twice, the others never.
    mapping = GpuTiles(n_sms=4, pes_per_sm=32, block_height=16)
    truth = FaultProfile.generate(0.01, 2, mapping.pe_shape)
    diag = diagnose(SimulatedChip(truth, create_fault("bitflip"), mapping, 0), 1, 512)
    assert diag.observed[:, :16].all() and not diag.observed[:, 16:].any()
    assert (diag.trials[:, :16] == 1024).all() and (diag.trials[:, 16:] == 0).all()
    assert (diag.rates[:, 16:] == 0).all() and (diag.high[:, 16:] == 1).all()
    path = diag.save(tmp_path / "est.json")
    loaded = FaultProfile.load(path)
    assert np.array_equal(loaded.rates, diag.rates)
    with pytest.raises(HaschedError):
        diag.save(tmp_path / "est.npy")
    with pytest.raises(HaschedError):
        diagnose(SimulatedChip(truth, create_fault("bitflip"), mapping), 0, 10)
    with pytest.raises(HaschedError, match="output site"):  # a systolic row mixes PEs
        diagnose(SimulatedChip(FaultProfile.generate(0.01, 2, (4, 4)),
                               create_fault("bitflip", site="product"), Systolic(rows=4, cols=4)),
                 1, 8)
    with pytest.raises(HaschedError, match="transient"):
        SimulatedChip(truth, None, mapping)
