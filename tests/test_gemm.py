"""The faulty tiled GEMM against a slow loop oracle and binomial bounds."""

from __future__ import annotations

import pytest
import torch

from hasched.errors import HaschedError
from hasched.sim.faults import ExponentBitError, create_error_model
from hasched.sim.gemm import (
    _geometric_positions,
    _uniform_subsets,
    apply_sites,
    dense_faulty_gemm,
    faulty_gemm,
    sample_sites,
    sites_from_mask,
)
from hasched.sim.hardware import (
    AcceleratorConfig,
    FaultProfile,
    layer_tiling,
    row_rates,
    slot_rates,
)

ACC = AcceleratorConfig(n_sms=3, pes_per_sm=8, block_height=8, dense_block_width=4)


def oracle(w, x, tiling, mask, corrupt):
    """Tiles, PEs and an explicit mask, one partial product at a time."""
    P, B, n_k, R, C = mask.shape
    out = torch.zeros(P, B, R, C, dtype=torch.float64)
    for p in range(P):
        for b in range(B):
            for r in range(R):
                for c in range(C):
                    acc = 0.0
                    for k in range(n_k):
                        pp = torch.zeros((), dtype=torch.float32)
                        for j in range(k * tiling.block_width,
                                       min((k + 1) * tiling.block_width, tiling.k)):
                            pp = pp + w[r, j] * x[b, j, c]
                        if mask[p, b, k, r, c]:
                            pp = corrupt(pp.reshape(1))[0]
                        acc += float(pp)
                    out[p, b, r, c] = acc
    return out


@pytest.mark.parametrize("R,K,C", [(13, 10, 3), (8, 4, 1), (9, 17, 2)])
def test_dense_and_sparse_match_the_loop_oracle(R, K, C):
    g = torch.Generator().manual_seed(R * K)
    w, x = torch.randn(R, K, generator=g), torch.randn(2, K, C, generator=g)
    t = layer_tiling(R, K, ACC)
    mask = torch.rand(3, 2, t.n_k, R, C, generator=g) < 0.3
    em = ExponentBitError("flip-to-1", low_bit=26, high_bit=26)  # deterministic
    ref = oracle(w, x, t, mask, lambda v: em.corrupt(v, None))
    dense = dense_faulty_gemm(w, x, t, mask, em, None)
    fused = dense_faulty_gemm(w, x, t, mask, em, None, torch.rand(mask.shape, generator=g))
    clean = torch.matmul(w, x)[None].expand(3, -1, -1, -1)
    sparse = apply_sites(w, x, t, sites_from_mask(mask), em, None, clean)
    scale = ref.abs().max()
    assert torch.allclose(dense.double(), ref, atol=1e-5 * scale, rtol=1e-5)
    assert torch.allclose(fused.double(), ref, atol=1e-5 * scale, rtol=1e-5)
    assert torch.allclose(sparse.double(), ref, atol=1e-5 * scale, rtol=1e-5)
    assert mask.any()  # the comparison exercised corrupted partial products


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("R,K,C", [(37, 45, 7), (10, 3, 1), (33, 64, 5)])
def test_zero_rates_give_the_clean_product(mode, R, K, C):
    w, x = torch.randn(R, K), torch.randn(4, K, C)
    t = layer_tiling(R, K, ACC)
    out = faulty_gemm(w, x, t, torch.zeros(2, R, t.n_k), create_error_model("bitflip"),
                      torch.Generator().manual_seed(0), mode)
    assert out.shape == (2, 4, R, C)
    assert torch.allclose(out, torch.matmul(w, x).expand(2, -1, -1, -1), atol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_hit_frequency_per_row_within_binomial_bounds(mode):
    """Ones @ ones with 'zero' errors: an output is 0 exactly when its one partial product
    was hit, so counting zeros counts hits per row; each must be Binomial(n, rate)."""
    R, K, B, C = 24, 4, 50, 40  # K = one block: one partial product per output
    t = layer_tiling(R, K, ACC)
    rates = torch.linspace(0.0, 0.3, R)[None, :, None].repeat(2, 1, 1)  # (2, R, 1)
    g = torch.Generator().manual_seed(1)
    out = faulty_gemm(torch.ones(R, K), torch.ones(B, K, C), t, rates,
                      create_error_model("zero"), g, mode)
    hits = (out == 0).sum(dim=(1, 3)).double()  # (P, R)
    n = B * C
    mu = n * rates[..., 0].double()
    sd = (mu * (1 - rates[..., 0].double())).sqrt()
    assert ((hits - mu).abs() <= 5 * sd + 1e-9).all()
    assert hits[:, 0].eq(0).all()  # rate 0 never hits
    assert ((out == 0) | (out == K)).all()


def test_padding_never_receives_an_error():
    """Only the threads that no real row uses are faulty: no output may change."""
    acc = AcceleratorConfig(n_sms=2, pes_per_sm=16, block_height=16)
    R, K = 20, 6  # row blocks of 16 and 4 (+12 padding threads), one K-block each
    rates = torch.zeros(2, 16, dtype=torch.float64)
    rates[1, 4:] = 1.0  # SM 1 runs row block 1; its threads 4..15 are padding
    t = layer_tiling(R, K, acc, kernel_area=K)
    sr = slot_rates(FaultProfile(rates=rates.numpy()), t, acc)
    assert sr.sum() == 0
    w, x = torch.randn(R, K), torch.randn(3, K, 5)
    out = faulty_gemm(w, x, t, sr[None], create_error_model("zero"), None, "dense")
    assert torch.allclose(out[0], torch.matmul(w, x), atol=1e-6)


def test_schedule_moves_a_rows_errors_to_its_slot():
    R, K = 8, 4
    t = layer_tiling(R, K, ACC)
    sr = torch.zeros(R, 1)
    sr[0] = 1.0  # only slot 0 is faulty
    perm = torch.tensor([[5, 0, 1, 2, 3, 4, 6, 7]])  # slot 0 computes row 5
    out = faulty_gemm(torch.ones(R, K), torch.ones(2, K, 3), t, row_rates(sr, perm),
                      create_error_model("zero"), None, "dense")
    assert (out[0, :, 5] == 0).all()
    assert (out[0, :, [0, 1, 2, 3, 4, 6, 7]] == K).all()


def test_permuting_rates_equals_permuting_weights_and_unpermuting_outputs():
    """The paper's HAS: W[perm] on identity-order PEs, outputs un-permuted afterwards."""
    R, K = 16, 8
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(R, K, generator=g), torch.randn(2, K, 3, generator=g)
    t = layer_tiling(R, K, ACC)
    sr = (torch.rand(R, t.n_k, generator=g) < 0.5).float()  # deterministic: rate 0 or 1
    perm = torch.randperm(R, generator=g)[None]
    em = create_error_model("tf32")
    ours = faulty_gemm(w, x, t, row_rates(sr, perm), em, None, "dense")[0]
    physical = faulty_gemm(w[perm[0]], x, t, sr[None], em, None, "dense")[0]
    unpermuted = torch.empty_like(physical)
    unpermuted[:, perm[0]] = physical
    assert torch.equal(ours, unpermuted)
    assert not torch.equal(ours, faulty_gemm(w, x, t, sr[None], em, None, "dense")[0])


def test_per_member_inputs():
    R, K = 8, 4
    t = layer_tiling(R, K, ACC)
    w, x = torch.randn(R, K), torch.randn(3, 2, K, 5)
    out = faulty_gemm(w, x, t, torch.zeros(3, R, 1), create_error_model("zero"), None)
    assert torch.allclose(out, torch.matmul(w, x), atol=1e-6)
    with pytest.raises(HaschedError):
        faulty_gemm(w, x, t, torch.zeros(2, R, 1), create_error_model("zero"), None)


def test_same_seed_same_errors_different_seed_different():
    R, K = 16, 8
    t = layer_tiling(R, K, ACC)
    w, x = torch.randn(R, K), torch.randn(4, K, 9)
    rates = torch.full((2, R, t.n_k), 0.05)
    for mode in ("dense", "sparse"):
        em = create_error_model("bitflip")
        a = faulty_gemm(w, x, t, rates, em, torch.Generator().manual_seed(1), mode)
        b = faulty_gemm(w, x, t, rates, em, torch.Generator().manual_seed(1), mode)
        c = faulty_gemm(w, x, t, rates, em, torch.Generator().manual_seed(2), mode)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_sparse_sampler_counts_are_binomial_and_distinct():
    g = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.0, 1e-4, 2e-3, 0.05, 0.5, 1.0]).reshape(1, 6, 1)
    B, C = 30, 200
    n = B * C
    counts = torch.zeros(6, dtype=torch.float64)
    trials = 40
    for _ in range(trials):
        s = sample_sites(rates, B, C, g)
        key = s.r * n + s.b * C + s.c
        assert key.unique().numel() == len(s)  # no partial product is hit twice
        assert s.b.max() < B and s.c.max() < C
        counts += torch.bincount(s.r, minlength=6).double()
    p = rates.reshape(-1).double()
    mu, sd = trials * n * p, (trials * n * p * (1 - p)).sqrt()
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
