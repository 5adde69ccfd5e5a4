"""Fault profiles and the tile -> PE mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hasched.errors import HaschedError
from hasched.sim.hardware import (
    AcceleratorConfig,
    FaultProfile,
    layer_tiling,
    row_rates,
    slot_pe_index,
    slot_rates,
)


def test_profile_is_uniform_draw_from_default_rng():
    p = FaultProfile.generate(5e-3, 7)
    ref = np.random.default_rng(7).uniform(0.0, 5e-3, size=(20, 32))
    assert np.array_equal(p.rates, ref)
    assert p.rates.max() <= 5e-3 and p.rates.min() >= 0
    assert not np.array_equal(p.rates, FaultProfile.generate(5e-3, 8).rates)


@pytest.mark.parametrize("bad", [np.full((20, 32), np.nan), np.full((20, 32), -0.1),
                                 np.full((20, 32), 1.5), np.zeros(640)])
def test_profile_validation(bad):
    with pytest.raises(HaschedError):
        FaultProfile(rates=bad)


def test_profile_shape_must_fit_accelerator():
    with pytest.raises(HaschedError, match="shape"):
        FaultProfile.generate(0.1, 1, AcceleratorConfig(n_sms=10)).check(AcceleratorConfig())


@pytest.mark.parametrize("suffix", [".npy", ".json"])
def test_profile_roundtrip(tmp_path, suffix):
    p = FaultProfile.generate(0.2, 3)
    q = FaultProfile.load(p.save(tmp_path / f"prof{suffix}"))
    assert np.array_equal(p.rates, q.rates)


def test_malformed_profile_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"rates": [[0.1, 2.0]]}))
    (tmp_path / "c.npy").write_bytes(b"garbage")
    for name in ("a.json", "b.json", "c.npy", "missing.npy"):
        with pytest.raises(HaschedError):
            FaultProfile.load(tmp_path / name)


def test_fr_max_out_of_range():
    with pytest.raises(HaschedError):
        FaultProfile.generate(1.5, 1)


def test_tile_mapping_by_hand():
    acc = AcceleratorConfig(n_sms=5)
    t = layer_tiling(64, 100, acc)  # 2 row blocks, 4 K-blocks of 32
    assert (t.block_height, t.block_width, t.n_r, t.n_k) == (32, 32, 2, 4)
    pe = slot_pe_index(t, acc)
    # slot 33: row block 1, thread 1; K-block 2 -> SM (1*4 + 2) % 5 = 1 -> PE 1*32 + 1.
    assert pe[33, 2] == 33
    # slot 0, K-block 3 -> SM 3, thread 0.
    assert pe[0, 3] == 96
    # A convolution's K-block is one input channel's kh*kw window.
    assert layer_tiling(32, 512, acc, kernel_area=16).n_k == 32
    # The 10-row output layer is one tile of 10 threads (authors' code).
    assert layer_tiling(10, 64, acc).block_height == 10


def test_c0_of_mnist32_is_one_tile_on_sm0():
    acc = AcceleratorConfig()
    prof = FaultProfile.generate(5e-3, 1)
    sr = slot_rates(prof, layer_tiling(32, 16, acc, 16), acc)
    assert sr.shape == (32, 1)
    assert torch.equal(sr[:, 0], torch.tensor(prof.rates[0], dtype=torch.float32))


def test_row_rates_follow_the_schedule():
    sr = torch.arange(6, dtype=torch.float32).reshape(3, 2)  # slot s has rates (2s, 2s+1)
    perms = torch.tensor([[2, 0, 1], [0, 1, 2]])  # member 0: slot 0 computes row 2, ...
    rr = row_rates(sr, perms)
    assert torch.equal(rr[0], sr[[1, 2, 0]])  # row 0 sits in slot 1, row 1 in 2, row 2 in 0
    assert torch.equal(rr[1], sr)
    assert torch.equal(row_rates(sr, None)[0], sr)
