"""Mappings (which PE computes which partial product), fault profiles and chip maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hasched.errors import HaschedError
from hasched.sim.layers import row_rates
from hasched.sim.mapping import GemmShape, GpuTiles, Systolic, create_mapping
from hasched.sim.profile import ChipMap, FaultProfile
from hasched.study.scenario import parse_mapping


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


def test_profile_shape_must_fit_the_mapping():
    with pytest.raises(HaschedError, match="shape"):
        FaultProfile.generate(0.1, 1, GpuTiles(n_sms=10).pe_shape).check(GpuTiles().pe_shape)
    assert FaultProfile.generate(0.1, 1, Systolic(8, 4).pe_shape).shape == (8, 4)


@pytest.mark.parametrize("suffix", [".npy", ".json"])
def test_profile_roundtrip(tmp_path, suffix):
    p = FaultProfile.generate(0.2, 3)
    q = FaultProfile.load(p.save(tmp_path / f"prof{suffix}"))
    assert np.array_equal(p.rates, q.rates)


def test_malformed_profile_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"rates": [[0.1, 2.0]]}))
    (tmp_path / "c.npy").write_bytes(b"garbage")
    (tmp_path / "d.json").write_text(json.dumps({"rates": [[0.1, True]]}))
    for name in ("a.json", "b.json", "c.npy", "d.json", "missing.npy"):
        with pytest.raises(HaschedError):
            FaultProfile.load(tmp_path / name)


def test_fr_max_out_of_range():
    with pytest.raises(HaschedError):
        FaultProfile.generate(1.5, 1)


def test_gpu_tiles_by_hand():
    m = GpuTiles(n_sms=5)
    plan = m.plan(GemmShape(64, 100))  # 2 row blocks, 4 K-blocks of 32
    assert (plan.chain, plan.n_chains, plan.k_padded) == (32, 4, 128)
    # slot 33: row block 1, thread 1; K-block 2 -> SM (1*4 + 2) % 5 = 1 -> PE 1*32 + 1.
    assert plan.pe_chain[33, 2] == 33
    assert plan.pe_chain[0, 3] == 96  # slot 0, K-block 3 -> SM 3, thread 0
    assert (plan.pe_pos[33, 2] == 33).all()  # one thread computes its whole block
    # A convolution's K-block is one input channel's kh*kw window.
    assert m.plan(GemmShape(32, 512, taps=16, channels=32)).n_chains == 32
    # The 10-row output layer is one tile of 10 threads (authors' code).
    assert m.plan(GemmShape(10, 64)).pe_chain[:, 0].tolist() == list(range(10))


def test_c0_of_mnist32_is_one_tile_on_sm0():
    plan = GpuTiles().plan(GemmShape(32, 16, taps=16, channels=1))
    assert plan.pe_chain.shape == (32, 1)
    assert plan.pe_chain[:, 0].tolist() == list(range(32))  # SM 0's 32 PEs


def test_systolic_by_hand():
    m = Systolic(4, 3)
    plan = m.plan(GemmShape(10, 7))  # chains of 3 columns; 3 chains (last padded)
    assert (plan.chain, plan.n_chains, plan.k_padded) == (3, 3, 9)
    assert plan.pe_chain is None
    assert plan.pe_pos.shape == (10, 1, 3)  # every K-tile reuses the same PEs
    # W[r, j] sits on PE (r mod 4, j mod 3) = (r mod 4) * 3 + j mod 3
    for r in range(10):
        for j in range(9):
            assert plan.pe_pos[r, 0, j % 3] == (r % 4) * 3 + j % 3
    assert m.check_site("auto") == "product"
    with pytest.raises(HaschedError, match="supports fault sites"):
        m.check_site("output")


def test_hwc_order_by_hand():
    # a 2-channel 2x2 kernel: PyTorch order (c, kh, kw) = 0..7; hwc puts taps outermost
    plan = GpuTiles(k_order="hwc").plan(GemmShape(4, 8, taps=4, channels=2))
    assert plan.k_perm.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert GpuTiles().plan(GemmShape(4, 8, taps=4, channels=2)).k_perm is None


def test_mapping_specs_parse_and_round_trip():
    for spec in ("gpu-tiles", "gpu-tiles:sms=10", "systolic:16x16", "systolic:8x4,k_order=hwc"):
        name, params = parse_mapping(spec)
        m = create_mapping(name, **dict(params))
        assert m.spec() == spec
    with pytest.raises(HaschedError):
        parse_mapping("systolic:16")
    with pytest.raises(HaschedError, match="unknown mapping"):
        create_mapping("torus")
    with pytest.raises(HaschedError):
        GpuTiles(block_height=64)


def test_row_rates_follow_the_schedule():
    sr = torch.arange(6, dtype=torch.float32).reshape(3, 2)  # slot s has rates (2s, 2s+1)
    perms = torch.tensor([[2, 0, 1], [0, 1, 2]])  # member 0: slot 0 computes row 2, ...
    rr = row_rates(sr, perms)
    assert torch.equal(rr[0], sr[[1, 2, 0]])  # row 0 sits in slot 1, row 1 in 2, row 2 in 0
    assert torch.equal(rr[1], sr)
    assert torch.equal(row_rates(sr, None)[0], sr)
    sr3 = torch.arange(12.0).reshape(3, 1, 4)  # per (slot, chain, position)
    assert torch.equal(row_rates(sr3, perms)[0], sr3[[1, 2, 0]])


@pytest.mark.parametrize("suffix", [".json", ".npy"])
def test_chip_map_roundtrip(tmp_path, suffix):
    chip = ChipMap.sample((16, 16), 0.1, 5, bit="random", value="random")
    assert int(chip.faulty.sum()) == 26
    assert chip.bit[chip.faulty].min() >= 0 and chip.bit[chip.faulty].max() <= 15
    back = ChipMap.load(chip.save(tmp_path / f"c{suffix}"))
    for f in ("kind", "bit", "value"):
        assert np.array_equal(getattr(chip, f), getattr(back, f))


def test_malformed_chip_files(tmp_path):
    good = ChipMap.sample((4, 4), 0.25, 1).to_dict()
    cases = {
        "garbage.json": "{",
        "list.json": "[1, 2]",
        "foreign.json": json.dumps({"kind": "fault-profile", "rates": [[0.1]]}),
        "floats.json": json.dumps({**good, "bit": [[0.5] * 4] * 4}),
        "shape.json": json.dumps({**good, "value": [[0] * 3] * 4}),
        "code.json": json.dumps({**good, "fault": [[7] * 4] * 4}),
        "value.json": json.dumps({**good, "value": [[2] * 4] * 4}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(HaschedError, match="chip map"):
            ChipMap.load(tmp_path / name)
    with pytest.raises(HaschedError, match="not found"):
        ChipMap.load(tmp_path / "missing.json")


@pytest.mark.parametrize("mapping", ["gpu-tiles", "systolic:4x4"])
def test_both_k_orders_give_identical_clean_int8_outputs(mapping):
    """The reduction order only says which PE sums which product: a fault-free int8
    accelerator (exact integer sums) gives the same outputs in either order, through a
    multi-channel conv and the flattened dense layer after it."""
    import torch.nn as nn

    from hasched.sim.arithmetic import Int8
    from hasched.sim.faults import create_fault
    from hasched.sim.layers import inject_faults

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 4 * 4, 7)).eval()
    x = torch.randn(6, 3, 6, 6)
    outs = []
    for order in ("chw", "hwc"):
        m = GpuTiles(k_order=order) if mapping == "gpu-tiles" else Systolic(4, 4,
                                                                             k_order=order)
        rates = torch.zeros(m.pe_shape).reshape(-1)
        faulty, st = inject_faults(model, ["0", "3"], m, rates, create_fault("bitflip"),
                                   Int8("exact"), in_absmax={"0": 4.0, "3": 4.0},
                                   spatial={"3": (5, 4, 4)})
        st.configure(None, 1)
        with torch.no_grad():
            outs.append(faulty(x))
    assert torch.equal(outs[0], outs[1])
