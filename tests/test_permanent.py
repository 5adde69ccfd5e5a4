"""Permanent faults (chips) on systolic and gpu-tiles mappings against loop oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hasched.sim.arithmetic import Int8, Word
from hasched.sim.faults import ChipFault, create_fault
from hasched.sim.functional import MatrixInput, faulty_matmul, layer_faults
from hasched.sim.gemm import element_deltas, permanent_hits
from hasched.sim.mapping import GemmShape, GpuTiles, Systolic
from hasched.sim.permanent import permanent_deltas
from hasched.sim.profile import ChipMap

SYS = Systolic(4, 3)


def stuck(v: int, bit: int, val: int, width: int) -> int:
    """Two's-complement stuck-at on a ``width``-bit word, by hand."""
    u = v & ((1 << width) - 1)
    u = u | (1 << bit) if val else u & ~(1 << bit)
    return u - (1 << width) if u >= 1 << (width - 1) else u


def chip_for(mapping, seed: int, frac: float = 0.3, **kw) -> ChipMap:
    return create_fault("stuck-at", **kw).sample_chip(mapping.pe_shape, frac, seed)


def ints(*shape, g):
    return torch.randint(-127, 128, shape, generator=g)


def run(w, x, mapping, chip, arith=None, mode="auto", perms=None):
    fault = ChipFault(chip)
    rates = torch.from_numpy(chip.faulty.reshape(-1).astype("float64"))
    kw = {} if arith is None else dict(arith=arith, in_absmax=127.0)
    return faulty_matmul(w, x, mapping, rates, fault, perms=perms, mode=mode, **kw)


def systolic_oracle(wq, xq, chip: ChipMap, site: str):
    """Integer loop: W[r, j] on PE (r mod R, j mod C), chains of C columns per row."""
    R_a, C_a = chip.shape
    rows, K = wq.shape
    B, _, C = xq.shape
    out = torch.zeros(B, rows, C, dtype=torch.long)
    for b in range(B):
        for r in range(rows):
            for c in range(C):
                total = 0
                for t in range(-(-K // C_a)):
                    acc = 0
                    for i in range(C_a):
                        j = t * C_a + i
                        p = int(wq[r, j]) * int(xq[b, j, c]) if j < K else 0
                        a, col = r % R_a, i
                        bad = chip.kind[a, col] == 1
                        bit, val = int(chip.bit[a, col]), int(chip.value[a, col])
                        if site == "product" and bad:
                            p = stuck(p, bit, val, 16)
                        acc += p
                        if site == "accumulator" and bad:
                            acc = stuck(acc, bit, val, 32)
                    total += acc
                out[b, r, c] = total
    return out


@pytest.mark.parametrize("site", ["product", "accumulator"])
def test_systolic_stuck_at_matches_the_loop_oracle(site):
    g = torch.Generator().manual_seed(7)
    wq, xq = ints(6, 8, g=g), ints(2, 8, 3, g=g)  # 2 chains of 3 + a padded one
    chip = chip_for(SYS, 1, 0.4, site=site, low_bit=0, high_bit=14)
    assert chip.faulty.any()
    ref = systolic_oracle(wq, xq, chip, site)
    out = run(wq.float(), xq.float(), SYS, chip, Int8())
    # weights are already integers with |w| <= 127, so int8 PTQ leaves them (scale may
    # differ per row): compare in the integer domain of the *quantised* operands
    la = layer_faults(wq.float(), SYS, ChipFault(chip), arith=Int8(), in_absmax=127.0,
                      rates=torch.zeros(SYS.n_pes)).arith
    wq2 = la.w.long()
    ref = systolic_oracle(wq2, xq, chip, site)
    assert torch.equal(out[0].long(), ref)


def test_gpu_tiles_output_site_stuck_at_matches_the_loop_oracle():
    m = GpuTiles(n_sms=2, pes_per_sm=4, block_height=4, dense_block_width=3)
    g = torch.Generator().manual_seed(3)
    wq, xq = ints(5, 7, g=g), ints(2, 7, 2, g=g)
    chip = chip_for(m, 2, 0.5, low_bit=0, high_bit=20)
    out = run(wq.float(), xq.float(), m, chip, Int8())
    la = layer_faults(wq.float(), m, ChipFault(chip), arith=Int8(), in_absmax=127.0,
                      rates=torch.zeros(m.n_pes)).arith
    w2, plan = la.w.long(), m.plan(GemmShape(5, 7))
    ref = torch.zeros(2, 5, 2, dtype=torch.long)
    for b in range(2):
        for r in range(5):
            for c in range(2):
                for k in range(plan.n_chains):
                    s = sum(int(w2[r, j]) * int(xq[b, j, c])
                            for j in range(3 * k, min(3 * k + 3, 7)))
                    pe = int(plan.pe_chain[r, k])
                    sm, th = divmod(pe, 4)
                    if chip.kind[sm, th] == 1:
                        s = stuck(s, int(chip.bit[sm, th]), int(chip.value[sm, th]), 32)
                    ref[b, r, c] += s
    assert torch.equal(out[0].long(), ref)


@pytest.mark.parametrize("mapping,site", [(SYS, "product"), (SYS, "accumulator"),
                                          (GpuTiles(n_sms=2, pes_per_sm=8, block_height=8,
                                                    dense_block_width=4), "output"),
                                          (GpuTiles(n_sms=2, pes_per_sm=8, block_height=8,
                                                    dense_block_width=4), "accumulator")])
@pytest.mark.parametrize("arith", [None, Int8()])
def test_bulk_path_equals_hit_by_hit_path(mapping, site, arith):
    """The bulk computation of a chip and the hit enumeration agree exactly."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(10, 13, generator=g), torch.randn(3, 13, 4, generator=g)
    chip = chip_for(mapping, 4, 0.3, site=site,
                    high_bit=14 if arith is not None else 30, low_bit=0)
    fault = ChipFault(chip)
    rates = torch.from_numpy(chip.faulty.reshape(-1).astype("float64"))
    kw = {} if arith is None else dict(arith=arith, in_absmax=float(x.abs().max()))
    fa = layer_faults(w, mapping, fault, rates=rates, **kw)
    xq = fa.arith.quantize(x) if fa.arith.is_int else x
    view = MatrixInput(xq, 1)
    clean = (fa.arith.matmul(fa.arith.w, xq) if fa.arith.is_int
             else torch.matmul(w, x)).double()[None]  # (1, B, R, C)
    bulk = permanent_deltas(fa, view)
    a = clean + bulk.delta
    if bulk.full is not None:
        a = torch.where(bulk.full, bulk.delta, a)
    a = torch.where(bulk.hit, a, clean)
    hits = element_deltas(fa, view, permanent_hits(fa, 0, 3, 4), None, 4)
    b = clean.clone()
    idx = (hits.p, hits.b, hits.r, hits.c)
    new = b[idx] + hits.delta
    if hits.full is not None:
        new = torch.where(hits.full, hits.delta, new)
    b[idx] = new
    if arith is None:  # fp32: compare the float32 outputs bit for bit
        a, b = a.float(), b.float()
    assert torch.equal(a, b)
    assert bulk.hit.any()


def test_dead_pes_at_the_product_site_prune_their_weights():
    g = torch.Generator().manual_seed(9)
    w, x = torch.randn(8, 12, generator=g), torch.randn(3, 12, 2, generator=g)
    chip = create_fault("dead", site="product").sample_chip(SYS.pe_shape, 0.25, 1)
    absmax = float(x.abs().max())
    out = run(w, x, SYS, chip, Int8())
    la = layer_faults(w, SYS, ChipFault(chip), arith=Int8(), in_absmax=absmax,
                      rates=torch.zeros(SYS.n_pes)).arith
    keep = torch.tensor([[not chip.faulty[r % 4, j % 3] for j in range(12)] for r in range(8)])
    xq = la.quantize(x)
    ref = torch.einsum("rk,bkc->brc", (la.w * keep).double(), xq.double())
    out = faulty_matmul(w, x, SYS, torch.from_numpy(chip.faulty.reshape(-1) * 1.0),
                        ChipFault(chip), arith=Int8(), in_absmax=absmax)
    assert torch.equal(out[0], ref)


def test_a_chip_with_a_schedule_moves_faults_with_the_rows():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(8, 6, generator=g), torch.randn(2, 6, 3, generator=g)
    chip = chip_for(SYS, 3, 0.3, site="product", low_bit=20, high_bit=28)
    perm = torch.randperm(8, generator=g)[None]
    ours = run(w, x, SYS, chip, perms=perm)[0]
    physical = run(w[perm[0]], x, SYS, chip)[0]
    unpermuted = torch.empty_like(physical)
    unpermuted[:, perm[0]] = physical
    assert torch.allclose(ours, unpermuted, rtol=1e-6, atol=1e-6)
    assert np.any(chip.faulty)
    _ = Word  # (the fault words are covered in test_faults)


@pytest.mark.parametrize("k_order", ["chw", "hwc"])
def test_fap_masks_are_the_weights_dead_pes_drop(k_order):
    """Pruning the masked weights == running the chip with dead PEs (product site)."""
    from hasched.sim.fap import apply_masks, faulty_weight_masks
    from hasched.sim.layers import inject_faults

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(5 * 4 * 4, 7)).eval()
    x = torch.randn(4, 3, 6, 6)
    sa = Systolic(4, 4, k_order=k_order)
    chip = create_fault("dead", site="product").sample_chip(sa.pe_shape, 0.3, 2)
    perms = {"0": torch.randperm(5), "3": torch.randperm(7)}
    masks = faulty_weight_masks(model, ["0", "3"], sa, chip, perms, {"3": (5, 4, 4)})
    assert 0 < int(masks["0"].sum()) < masks["0"].numel()
    rates = torch.from_numpy(chip.faulty.reshape(-1) * 1.0)
    faulty, st = inject_faults(model, ["0", "3"], sa, rates, ChipFault(chip),
                               spatial={"3": (5, 4, 4)})
    st.configure({k: v[None] for k, v in perms.items()}, 1)
    with torch.no_grad():
        out = faulty(x)
        pruned = __import__("copy").deepcopy(model)
        apply_masks(pruned, masks)
        ref = pruned(x)
    assert torch.allclose(out, ref, atol=1e-5)
