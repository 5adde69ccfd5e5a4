"""Faulty layers in whole models, the evaluator and its incremental engine."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

import hasched.sim.gemm as gemm_mod
import hasched.sim.incremental as inc_mod
from hasched.errors import HaschedError
from hasched.sim.evaluator import EvalConfig, FaultyEvaluator, summarize
from hasched.sim.faults import BitError
from hasched.sim.faults import create_fault as create_error_model
from hasched.sim.layers import inject_faults, weight_layer_names
from hasched.sim.mapping import GpuTiles
from hasched.sim.profile import FaultProfile

ACC = GpuTiles(n_sms=4, pes_per_sm=8, block_height=8, dense_block_width=8)


def rates_of(prof: FaultProfile) -> torch.Tensor:
    return torch.from_numpy(prof.flat_rates().copy())


def small_cnn(seed: int = 0) -> nn.Sequential:
    """mnist32-cnn in miniature: conv, relu, pool, flatten, linears."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(OrderedDict(
        c0=nn.Conv2d(1, 8, 3), c0_relu=nn.ReLU(), pool0=nn.MaxPool2d(2), flatten=nn.Flatten(),
        h0=nn.Linear(8 * 4 * 4, 24), h0_relu=nn.ReLU(), h1=nn.Linear(24, 16), h1_relu=nn.ReLU(),
        op=nn.Linear(16, 5)))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def data(n: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 10, 10, generator=g)
    x[:, :, :3] = 0  # a background of exact zeros, like MNIST
    return x


def profile(rate: float) -> FaultProfile:
    return FaultProfile.generate(rate, 3, ACC.pe_shape)


@pytest.mark.parametrize("layers", [["c0"], ["h0"], ["op"], ["c0", "h1"], ["h0", "op"]])
def test_zero_faults_equal_clean_model(layers):
    m, x = small_cnn(), data()
    faulty, st = inject_faults(m, layers, ACC, rates_of(profile(0.0)),
                               create_error_model("bitflip"),
                               generator=torch.Generator().manual_seed(0))
    st.configure(None, repeats=3)
    st.expanded = False
    out = faulty(x)
    assert out.shape == (3 * 40, 5)
    assert torch.equal(out, m(x).repeat(3, 1))  # rate 0 is the clean model, bit for bit
    assert all(p is q for p, q in zip(m.parameters(), faulty.parameters(), strict=True))


def test_unknown_layer_and_bad_schedule():
    m = small_cnn()
    with pytest.raises(HaschedError, match="unknown layer"):
        inject_faults(m, ["h9"], ACC, rates_of(profile(0.1)), create_error_model("zero"))
    _, st = inject_faults(m, ["h0"], ACC, rates_of(profile(0.1)), create_error_model("zero"))
    with pytest.raises(HaschedError, match="permutation"):
        st.configure({"h0": torch.zeros(1, 24, dtype=torch.long)})
    with pytest.raises(HaschedError):
        st.configure({"h1": torch.arange(16)[None]})
    assert weight_layer_names(m) == ["c0", "h0", "h1", "op"]


def test_any_model_not_only_sequential():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.a(x)) + self.b(x))

    torch.manual_seed(0)
    m = Branchy().eval()
    x = torch.randn(30, 6)
    y = m(x).argmax(-1)
    ev = FaultyEvaluator(m, x, y, ["a", "head"], create_error_model("zero"), profile(0.0),
                         mapping=ACC)
    assert ev.accuracy(repeats=2).eq(1.0).all()
    # Every partial product of `a` lost: exactly the model with a's weights zeroed.
    always = FaultProfile(rates=np.ones(ACC.pe_shape))
    ev = FaultyEvaluator(m, x, y, ["a"], create_error_model("zero"), always, mapping=ACC)
    zeroed = copy.deepcopy(m)  # the evaluator caches clean outputs: leave m as it was
    with torch.no_grad():
        zeroed.a.weight.zero_()
        expected = float((zeroed(x).argmax(-1) == y).double().mean())
    assert expected < 1.0
    assert ev.accuracy(repeats=2).eq(expected).all()


def _fixed_sites(monkeypatch):
    """Both paths draw hit sites from one recorded list of per-call draws."""
    calls = []
    real = gemm_mod.sample_hits

    def recording(fa, n_samples, n_cols, generator):
        s = real(fa, n_samples, n_cols, generator)
        calls.append(s)
        return s

    def replay(fa, n_samples, n_cols, generator):
        return calls.pop(0)

    return calls, recording, replay


@pytest.mark.parametrize("layer", ["c0", "h0", "op"])
def test_incremental_equals_plain_path_on_the_same_error_instances(monkeypatch, layer):
    m, x = small_cnn(), data(60)
    y = torch.randint(0, 5, (60,), generator=torch.Generator().manual_seed(9))
    em = BitError("flip-to-1", low_bit=27, high_bit=27)  # deterministic given sites
    cfg = dict(mode="sparse", memory_mb=4096, max_hits=10**9)  # one chunk on both paths
    inc = FaultyEvaluator(m, x, y, [layer], em, profile(0.02),
        mapping=ACC, config=EvalConfig(**cfg))
    plain = FaultyEvaluator(m, x, y, [layer], em, profile(0.02), mapping=ACC,
                            config=EvalConfig(incremental=False, **cfg))
    calls, recording, replay = _fixed_sites(monkeypatch)
    perms = {layer: torch.stack([torch.randperm(inc.rows[layer],
                                                generator=torch.Generator().manual_seed(i))
                                 for i in range(4)])}
    monkeypatch.setattr(inc_mod, "sample_hits", recording)
    a = inc.correct(perms, repeats=2, generator=torch.Generator().manual_seed(5))
    assert inc.last_path == "incremental" and len(calls) == 1 and len(calls[0]) > 0
    monkeypatch.setattr(gemm_mod, "sample_hits", replay)
    b = plain.correct(perms, repeats=2, generator=torch.Generator().manual_seed(5))
    assert plain.last_path == "dense-suffix"
    assert torch.equal(a, b)
    assert (a < int(inc.clean_score.sum())).any()  # the errors did change predictions


def test_incremental_with_a_later_faulty_layer(monkeypatch):
    m, x = small_cnn(), data(30)
    y = m(x).argmax(-1)
    em = create_error_model("tf32")
    cfg = dict(mode="sparse", memory_mb=4096, max_hits=10**9)
    inc = FaultyEvaluator(m, x, y, ["c0", "h1"], em, profile(0.01),
        mapping=ACC, config=EvalConfig(**cfg))
    a = inc.correct(None, repeats=3, generator=torch.Generator().manual_seed(1))
    assert inc.last_path == "incremental" and a.shape == (1, 3)
    z = FaultyEvaluator(m, x, y, ["c0", "h1"], em, profile(0.0),
        mapping=ACC, config=EvalConfig(**cfg))
    assert z.accuracy(None, repeats=2).eq(1.0).all()


def test_sparse_and_dense_paths_give_the_same_accuracy_distribution():
    """Independent draws on both paths: means agree within sampling error."""
    m, x = small_cnn(), data(50)
    y = m(x).argmax(-1)
    em = create_error_model("flip-to-1")
    acc = {}
    for mode in ("sparse", "dense"):
        ev = FaultyEvaluator(m, x, y, ["c0"], em, profile(0.01), mapping=ACC,
                             config=EvalConfig(mode=mode))
        acc[mode] = ev.accuracy(None, repeats=300, generator=torch.Generator().manual_seed(7))
    a, b = acc["sparse"].reshape(-1), acc["dense"].reshape(-1)
    se = (a.var() / a.numel() + b.var() / b.numel()).sqrt()
    assert a.mean() < 0.999  # errors matter at this rate
    assert (a.mean() - b.mean()).abs() < 5 * se


def test_population_members_are_independent_and_seeded():
    m, x = small_cnn(), data(40)
    y = m(x).argmax(-1)
    ev = FaultyEvaluator(m, x, y, ["c0"], create_error_model("bitflip"), profile(0.05),
                         mapping=ACC)
    perms = {"c0": torch.stack([torch.arange(8), torch.arange(8).flip(0)])}
    a = ev.correct(perms, 3, torch.Generator().manual_seed(1))
    b = ev.correct(perms, 3, torch.Generator().manual_seed(1))
    c = ev.correct(perms, 3, torch.Generator().manual_seed(2))
    assert a.shape == (2, 3) and torch.equal(a, b) and not torch.equal(a, c)


def test_summarize_by_hand():
    s = summarize([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(0.2)
    half = 4.303 * 0.2 / 3**0.5
    assert s["ci95"] == pytest.approx([0.7 - half, 0.7 + half])
