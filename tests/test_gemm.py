"""The faulty GEMM against slow loop oracles, binomial bounds and bit-exact path equality."""

from __future__ import annotations

import pytest
import torch

from hasched.errors import HaschedError
from hasched.sim.arithmetic import Word
from hasched.sim.faults import FAULTS, BitError, create_fault
from hasched.sim.functional import faulty_matmul, layer_faults
from hasched.sim.gemm import (
    _dense_uniforms,
    _geometric_positions,
    _sample_trials,
    _uniform_subsets,
)
from hasched.sim.mapping import GpuTiles, Systolic

ACC = GpuTiles(n_sms=3, pes_per_sm=8, block_height=8, dense_block_width=4)
F32 = Word("float32")
TRANSIENT = [n for n in FAULTS.names() if n not in ("stuck-at", "dead")]


def oracle(w, x, chain, hit, corrupt):
    """Chains, hits and corruption one partial product at a time, in float64.

    Args:
        hit: ``(P, B, n_k, R, C)`` bool: chain ``k`` of output ``(b, r, c)`` is hit.
    """
    P, B, n_k, R, C = hit.shape
    K = w.shape[1]
    out = torch.zeros(P, B, R, C, dtype=torch.float64)
    for p in range(P):
        for b in range(B):
            for r in range(R):
                for c in range(C):
                    acc = 0.0
                    for k in range(n_k):
                        pp = sum(float(w[r, j]) * float(x[b, j, c])
                                 for j in range(k * chain, min((k + 1) * chain, K)))
                        pp = torch.tensor([pp], dtype=torch.float32)
                        if hit[p, b, k, r, c]:
                            pp = corrupt(pp)
                        acc += float(pp[0])
                    out[p, b, r, c] = acc
    return out


def dyadic(*shape, g):
    """Values with few mantissa bits: every sum below is exact in float32."""
    return torch.randint(-8, 9, shape, generator=g).float() / 4


@pytest.mark.parametrize("R,K,C", [(13, 10, 3), (8, 4, 1), (9, 17, 2)])
def test_dense_and_sparse_match_the_loop_oracle(R, K, C):
    g = torch.Generator().manual_seed(R * K)
    w, x = dyadic(R, K, g=g), dyadic(2, K, C, g=g)
    n_k = -(-K // 4)
    slot = (torch.rand(R, n_k, 1, generator=g) < 0.4).double()  # rate 0 or 1: fixed hits
    em = BitError("flip-to-1", low_bit=26, high_bit=26)  # deterministic corruption
    hit = slot[None, None, :, :, 0].permute(0, 1, 3, 2).expand(3, 2, n_k, R).bool()
    ref = oracle(w, x, 4, hit[..., None].expand(-1, -1, -1, -1, C),
                 lambda v: em.corrupt(v, F32, None, None, None))
    for mode in ("dense", "sparse"):
        out = faulty_matmul(w, x, ACC, None, em, slot_rates=slot, repeats=3, mode=mode)
        assert torch.equal(out.double(), ref.float().double()), mode
    assert hit.any()  # the comparison exercised corrupted partial products


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("R,K,C", [(37, 45, 7), (10, 3, 1), (33, 64, 5)])
def test_zero_rates_give_the_clean_product_exactly(mode, R, K, C):
    w, x = torch.randn(R, K), torch.randn(4, K, C)
    rates = torch.zeros(ACC.n_pes, dtype=torch.float64)
    out = faulty_matmul(w, x, ACC, rates, create_fault("bitflip"), repeats=2,
                        generator=torch.Generator().manual_seed(0), mode=mode)
    assert out.shape == (2, 4, R, C)
    assert torch.equal(out, torch.matmul(w, x).expand(2, -1, -1, -1))


@pytest.mark.parametrize("name", TRANSIENT)
def test_dense_and_sparse_are_bit_identical_on_the_same_sites(name):
    """Rates of 0 and 1 fix the sites; both paths must then agree to the last bit."""
    g = torch.Generator().manual_seed(11)
    for w, x in ((dyadic(12, 23, g=g), dyadic(3, 23, 5, g=g)),
                 (torch.randn(12, 23, generator=g), torch.randn(3, 23, 5, generator=g))):
        slot = (torch.rand(12, 6, 1, generator=g) < 0.5).double()
        em = create_fault(name) if name not in ("flip-to-0", "flip-to-1", "bitflip") else \
            BitError(name, 27, 27)
        a = faulty_matmul(w, x, ACC, None, em, slot_rates=slot, repeats=2, mode="dense")
        b = faulty_matmul(w, x, ACC, None, em, slot_rates=slot, repeats=2, mode="sparse")
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name


def test_a_lone_chain_keeps_its_corrupted_value_exactly():
    """No cancellation: clean + (corrupt - clean) in float32 would give 0 or stray bits."""
    one = torch.ones(1, 1)
    m = GpuTiles(n_sms=1, pes_per_sm=1, block_height=1)
    rates = torch.ones(1, dtype=torch.float64)
    for mode in ("dense", "sparse"):
        out = faulty_matmul(one, one[None], m, rates, BitError("bitflip", 28, 28), mode=mode)
        assert out.item() == 2.0**-32  # exponent bit 28 of 1.0 flipped
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(16, 4, generator=g), torch.randn(8, 4, 6, generator=g)
        out = faulty_matmul(w, x, GpuTiles(), torch.ones(640, dtype=torch.float64),
                            create_fault("bf16"), mode=mode)
        low = out.view(torch.int32) & 0xFFFF
        assert (low == 0).all()  # every output is its bf16-truncated chain, exactly


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_hit_frequency_per_row_within_binomial_bounds(mode):
    """Ones @ ones with 'zero' errors: an output is 0 exactly when its one partial product
    was hit, so counting zeros counts hits per row; each must be Binomial(n, rate)."""
    R, K, B, C = 24, 4, 50, 40  # K = one block: one partial product per output
    slot = torch.linspace(0.0, 0.3, R)[:, None, None].double()  # (R, 1, 1)
    g = torch.Generator().manual_seed(1)
    out = faulty_matmul(torch.ones(R, K), torch.ones(B, K, C), ACC, None, create_fault("zero"),
                        slot_rates=slot, repeats=2, generator=g, mode=mode)
    hits = (out == 0).sum(dim=(1, 3)).double()  # (P, R)
    n = B * C
    p = slot[:, 0, 0]
    mu, sd = n * p, (n * p * (1 - p)).sqrt()
    assert ((hits - mu).abs() <= 5 * sd + 1e-9).all()
    assert hits[:, 0].eq(0).all()  # rate 0 never hits
    assert ((out == 0) | (out == K)).all()


def test_tiny_rates_are_not_rounded_up():
    """float32 uniforms would turn 1e-7 into 2^-23; the dense path draws float64 then."""
    fa = layer_faults(torch.ones(4, 4), ACC, create_fault("zero"),
                      slot_rates=torch.full((4, 1, 1), 1e-7, dtype=torch.float64))
    hit, _ = _dense_uniforms(fa, 1000, 500, "cpu", torch.Generator().manual_seed(3))
    u = torch.rand((1, 1000, 1, 4, 500), generator=torch.Generator().manual_seed(3),
                   dtype=torch.float64)
    assert torch.equal(hit, u < 1e-7)  # exactly the float64 comparison
    # a sampler-level count: Binomial(n, 1e-7) over 2e9 trials per location
    counts = torch.zeros(8, dtype=torch.float64)
    for i in range(50):
        loc, _ = _sample_trials(torch.full((8,), 1e-7), 2 * 10**9,
                                torch.Generator().manual_seed(i))
        counts += torch.bincount(loc, minlength=8).double()
    mu = 50 * 2e9 * 1e-7
    assert ((counts - mu).abs() <= 5 * mu**0.5).all()


def test_padding_never_receives_an_error():
    """Only the threads that no real row uses are faulty: no output may change."""
    m = GpuTiles(n_sms=2, pes_per_sm=16, block_height=16, dense_block_width=8)
    rates = torch.zeros(2, 16, dtype=torch.float64)
    rates[1, 4:] = 1.0  # SM 1 runs row block 1; its threads 4..15 are padding
    w, x = torch.randn(20, 6), torch.randn(3, 6, 5)  # row blocks of 16 and 4, one K-block
    out = faulty_matmul(w, x, m, rates.reshape(-1), create_fault("zero"), mode="dense")
    assert torch.equal(out[0], torch.matmul(w, x))


def test_schedule_moves_a_rows_errors_to_its_slot():
    R, K = 8, 4
    slot = torch.zeros(R, 1, 1, dtype=torch.float64)
    slot[0] = 1.0  # only slot 0 is faulty
    perm = torch.tensor([[5, 0, 1, 2, 3, 4, 6, 7]])  # slot 0 computes row 5
    out = faulty_matmul(torch.ones(R, K), torch.ones(2, K, 3), ACC, None, create_fault("zero"),
                        slot_rates=slot, perms=perm, mode="dense")
    assert (out[0, :, 5] == 0).all()
    assert (out[0, :, [0, 1, 2, 3, 4, 6, 7]] == K).all()


@pytest.mark.parametrize("mapping", [ACC, Systolic(4, 3)])
def test_permuting_rates_equals_permuting_weights_and_unpermuting_outputs(mapping):
    """The paper's HAS: W[perm] on identity-order PEs, outputs un-permuted afterwards."""
    R, K = 16, 8
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(R, K, generator=g), torch.randn(2, K, 3, generator=g)
    fault = create_fault("tf32") if mapping is ACC else create_fault("zero", site="product")
    pes = layer_faults(w, mapping, fault, rates=torch.zeros(mapping.n_pes)).plan.site_pes(
        mapping.check_site(fault.site))
    slot = (torch.rand(pes.shape, generator=g) < 0.5).double()  # deterministic: 0 or 1
    perm = torch.randperm(R, generator=g)[None]
    ours = faulty_matmul(w, x, mapping, None, fault, slot_rates=slot, perms=perm)[0]
    physical = faulty_matmul(w[perm[0]], x, mapping, None, fault, slot_rates=slot)[0]
    unpermuted = torch.empty_like(physical)
    unpermuted[:, perm[0]] = physical
    assert torch.allclose(ours, unpermuted, atol=1e-6)
    assert not torch.allclose(ours, faulty_matmul(w, x, mapping, None, fault,
                                                  slot_rates=slot)[0], atol=1e-3)


def test_per_member_inputs():
    R, K = 8, 4
    w, x = torch.randn(R, K), torch.randn(3, 2, K, 5)
    zero = torch.zeros(ACC.n_pes)
    out = faulty_matmul(w, x, ACC, zero, create_fault("zero"), repeats=3)
    assert torch.equal(out, torch.matmul(w, x))
    with pytest.raises(HaschedError):
        faulty_matmul(w, x, ACC, zero, create_fault("zero"), repeats=2)


def test_same_seed_same_errors_different_seed_different():
    R, K = 16, 8
    w, x = torch.randn(R, K), torch.randn(4, K, 9)
    rates = torch.full((ACC.n_pes,), 0.05, dtype=torch.float64)
    for mode in ("dense", "sparse"):
        em = create_fault("bitflip")
        a, b, c = (faulty_matmul(w, x, ACC, rates, em, repeats=2, mode=mode,
                                 generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_sparse_sampler_counts_are_binomial_and_distinct():
    g = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.0, 1e-4, 2e-3, 0.05, 0.5, 1.0])
    n = 6000
    counts = torch.zeros(6, dtype=torch.float64)
    trials = 40
    for _ in range(trials):
        loc, pos = _sample_trials(rates, n, g)
        assert (loc * n + pos).unique().numel() == loc.numel()  # nothing is hit twice
        assert pos.max() < n
        counts += torch.bincount(loc, minlength=6).double()
    mu, sd = trials * n * rates.double(), (trials * n * rates * (1 - rates)).double().sqrt()
    assert ((counts - mu).abs() <= 5 * sd + 1e-9).all()


def test_geometric_sampler_continues_when_its_first_draw_is_short():
    g = torch.Generator().manual_seed(2)
    p = torch.tensor([0.3, 0.01, 0.0, 1.0])
    tot = torch.zeros(4)
    for _ in range(100):
        loc, pos = _geometric_positions(p, 1000, g, slack=0.0)  # forces extra rounds
        assert ((pos >= 0) & (pos < 1000)).all()
        assert (loc * 1000 + pos).unique().numel() == loc.numel()
        tot += torch.bincount(loc, minlength=4)
    mu = 100 * 1000 * p.double()
    sd = (mu * (1 - p.double())).sqrt()
    assert ((tot.double() - mu).abs() <= 5 * sd + 1e-9).all()


def test_uniform_subsets_are_distinct_and_uniform():
    g = torch.Generator().manual_seed(4)
    hist = torch.zeros(10)
    counts = torch.tensor([3, 9]).repeat(400)  # 400 independent draws of each subset size
    loc, pos = _uniform_subsets(counts, 10, g)
    for size, par in ((3, 0), (9, 1)):
        sel = loc % 2 == par
        assert torch.bincount(loc[sel]).max() == size
        assert (loc[sel] * 10 + pos[sel]).unique().numel() == sel.sum()  # distinct per draw
    hist += torch.bincount(pos[loc % 2 == 0], minlength=10)
    # each position is in a uniform 3-subset with probability 0.3
    mu, sd = 120.0, (400 * 0.3 * 0.7) ** 0.5
    assert ((hist - mu).abs() <= 5 * sd).all()
