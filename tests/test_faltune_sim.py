"""Simulator additions for the Fal-reTune study: the closed-form stuck-at on integer words,
pinned int8 weight scales, and the PE of every weight (against loop oracles)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.sim.arithmetic import PINNED_SCALE_ATTR, Int8, Word, pin_int8_scales
from hasched.sim.fap import apply_masks, faulty_weight_masks, weight_pes
from hasched.sim.faults import ChipFault, create_fault
from hasched.sim.layers import inject_faults
from hasched.sim.mapping import GpuTiles, Systolic
from hasched.sim.profile import ChipMap


def stuck_oracle(v: int, kind: int, bit: int, val: int, width: int) -> int:
    """What a faulty PE makes of ``v`` on a ``width``-bit word, by hand (wraps like the
    hardware register)."""
    u = v & ((1 << width) - 1)
    if kind == 2:
        return 0
    if kind == 1:
        u = u | (1 << bit) if val else u & ~(1 << bit)
    return u - (1 << width) if u >= 1 << (width - 1) else u


def random_chip(n: int, width: int, seed: int) -> ChipMap:
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, (1, n))
    bit = rng.integers(0, width, (1, n))
    bit[0, :4] = width - 1  # always exercise the sign bit
    return ChipMap(kind, bit, rng.integers(0, 2, (1, n)))


@pytest.mark.parametrize("width", [16, 32])
def test_closed_form_stuck_at_matches_the_bit_oracle(width):
    g = torch.Generator().manual_seed(width)
    chip = random_chip(12, width, width)
    half = 1 << (width - 1)
    vals = torch.cat([torch.randint(-half, half, (3000,), generator=g, dtype=torch.long),
                      torch.tensor([-half, half - 1, 0, -1, 1])]).double()
    pe = torch.randint(0, 12, vals.shape, generator=g)
    out = ChipFault(chip).corrupt(vals, Word("int", width), pe, None, None)
    ref = [stuck_oracle(int(v), int(chip.kind[0, p]), int(chip.bit[0, p]),
                        int(chip.value[0, p]), width) for v, p in zip(vals, pe, strict=True)]
    assert out.dtype == torch.float64 and out.tolist() == ref


def test_closed_form_on_broadcast_pes_and_out_of_range_values():
    chip = random_chip(6, 16, 3)
    vals = torch.arange(-300, 300, dtype=torch.float64).reshape(2, 3, 100)  # (n, F, C)
    pe = torch.tensor([1, 4, 5])[None, :, None].expand(2, 3, 100)  # broadcast, stride 0
    out = ChipFault(chip).corrupt(vals, Word("int", 16), pe, None, None)
    ref = torch.tensor([[[stuck_oracle(int(vals[i, f, c]), *(int(a[0, pe[i, f, c]])
                                       for a in (chip.kind, chip.bit, chip.value)), 16)
                          for c in range(100)] for f in range(3)] for i in range(2)],
                       dtype=torch.float64)
    assert torch.equal(out, ref)
    big = torch.tensor([40000.0, -40000.0])  # outside 16 bits: wraps, as the register does
    p = torch.tensor([0, 1])
    out = ChipFault(chip).corrupt(big, Word("int", 16), p, None, None)
    assert out.tolist() == [stuck_oracle(int(v), *(int(a[0, q]) for a in
                                                   (chip.kind, chip.bit, chip.value)), 16)
                            for v, q in zip(big, p, strict=True)]


def test_pinned_scales_keep_edited_weights_on_their_grid():
    w = torch.tensor([[1.0, -0.5, 0.25], [2.0, 1.0, -1.0]])
    s = torch.tensor([1.0 / 127, 2.0 / 127], dtype=torch.float64)
    la = Int8().layer(w * torch.tensor([[0.0, 1, 1], [1, 1, 1]]), 1.0, s)  # max of row 0 pruned
    assert la.w.tolist() == [[0, -64, 32], [127, 64, -64]]  # round(w / s), the old scale
    unpinned = Int8().layer(w * torch.tensor([[0.0, 1, 1], [1, 1, 1]]), 1.0)
    assert unpinned.w[0].tolist() == [0, -127, 64]  # re-quantised: another grid
    with pytest.raises(HaschedError, match="pinned"):
        Int8().layer(w, 1.0, torch.ones(3, dtype=torch.float64))


def test_pruning_with_pinned_scales_equals_dead_pes_in_int8():
    """Zeroing the weights on faulty PEs (pinned scales) == dead PEs at the product site."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8)).eval()
    x = torch.randn(5, 12)
    sa = Systolic(4, 3)
    chip = create_fault("dead", site="product").sample_chip(sa.pe_shape, 0.4, 3)
    rates = torch.from_numpy(chip.faulty.reshape(-1) * 1.0)
    arith = Int8("drum4")
    absmax = {"0": float(x.abs().max())}
    faulty, st0 = inject_faults(model, ["0"], sa, rates, ChipFault(chip), arith,
                                in_absmax=absmax)
    st0.configure()
    pruned = __import__("copy").deepcopy(model)
    pin_int8_scales(pruned[0])
    apply_masks(pruned, faulty_weight_masks(pruned, ["0"], sa, chip))
    healthy = ChipMap(np.zeros_like(chip.kind), chip.bit, chip.value, site="product")
    clean, st = inject_faults(pruned, ["0"], sa, torch.zeros(sa.n_pes), ChipFault(healthy),
                              arith, in_absmax=absmax)
    st.configure()
    with torch.no_grad():  # the same integers; float32 rounding of the two paths may differ
        assert torch.allclose(faulty(x), clean(x), rtol=0, atol=1e-6)
    assert getattr(pruned[0], PINNED_SCALE_ATTR).shape == (8,)


@pytest.mark.parametrize("mapping", [Systolic(4, 3), Systolic(3, 5, k_order="hwc"),
                                     GpuTiles(n_sms=2, pes_per_sm=4, block_height=4,
                                              dense_block_width=3)])
def test_weight_pes_against_a_loop(mapping):
    conv = nn.Conv2d(2, 6, 2)  # K = 2 channels x 4 taps
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    pes = weight_pes(conv, mapping, perm)
    taps, ch = 4, 2
    for r in range(6):
        slot = int((perm == r).nonzero())
        for c in range(ch):
            for t in range(taps):
                j = c * taps + t  # PyTorch order
                q = t * ch + c if mapping.k_order == "hwc" else j  # position in mapping order
                if isinstance(mapping, Systolic):
                    want = (slot % mapping.rows) * mapping.cols + q % mapping.cols
                else:
                    n_k = 2  # a conv's K-block is one channel's taps (4 of 8)
                    sm = ((slot // 4) * n_k + q // taps) % mapping.n_sms
                    want = sm * mapping.pes_per_sm + slot % 4
                assert int(pes[r, c, t // 2, t % 2]) == want
