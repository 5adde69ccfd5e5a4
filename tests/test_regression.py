"""gpu-tiles numbers are pinned: the same seeds give the correct counts the first engine
(before mappings, arithmetics and fault sites were generalised) gave, on both paths."""

from __future__ import annotations

import pytest
import torch

from hasched.sim.evaluator import EvalConfig, FaultyEvaluator
from hasched.sim.faults import create_fault
from hasched.sim.profile import FaultProfile
from random_cnn import random_cnn

# (layers, error, FR_max, path) -> correct counts [[identity r0, r1], [shuffled r0, r1]]
# of 300 synthetic images (200 agree with the clean model), measured with hasched 0.1.0.
PINNED = [
    ("c0", "flip-to-1", 5e-3, "incremental", [[167, 160], [123, 109]]),
    ("c0", "bitflip", 2e-3, "incremental", [[176, 179], [157, 148]]),
    ("h0", "flip-to-1", 5e-3, "incremental", [[141, 134], [138, 136]]),
    ("h2,op", "bf16", 0.5, "dense-suffix", [[197, 198], [199, 199]]),
    ("op", "zero", 0.5, "dense-suffix", [[121, 124], [150, 152]]),
    ("h2", "flip-to-0", 0.5, "dense-suffix", [[116, 107], [111, 111]]),
    ("c0", "zero", 0.3, "dense-suffix", [[140, 144], [143, 141]]),
    ("c0", "flip-to-1", 5e-3, "plain", [[170, 167], [114, 120]]),
    ("c0", "bitflip", 2e-3, "plain", [[184, 183], [154, 158]]),
    ("h0", "flip-to-1", 5e-3, "plain", [[137, 145], [142, 146]]),
]


@pytest.fixture(scope="module")
def setup():
    return random_cnn(300, flip_every=3)


@pytest.mark.parametrize("layers,error,fr,path,counts", PINNED)
def test_gpu_tiles_numbers_are_unchanged(setup, layers, error, fr, path, counts):
    m, x, y = setup
    ls = layers.split(",")
    # Each case asks for its path (the cost model may now pick another one for the same
    # scenario) and, on the incremental path, for one chunk of 300 images as in the first
    # engine: chunk boundaries are part of the draws, and default chunks are now bounded by
    # memory.
    inc = path == "incremental"
    cfg = EvalConfig(incremental=inc, memory_mb=2048 if inc else EvalConfig.memory_mb)
    ev = FaultyEvaluator(m, x, y, ls, create_fault(error), FaultProfile.generate(fr, 1),
                         config=cfg)
    perms = {n: torch.stack([torch.arange(r), torch.randperm(
        r, generator=torch.Generator().manual_seed(5))]) for n, r in ev.rows.items()}
    got = ev.correct(perms, repeats=2, generator=torch.Generator().manual_seed(7))
    assert int((ev.clean_pred == y).sum()) == 200
    assert got.tolist() == counts
    assert ev.last_path == ("dense-suffix" if path == "plain" else path)
