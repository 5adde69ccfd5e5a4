"""Faulty layers in any PyTorch model: residual blocks, transformers, Conv1d, groups,
Linear on sequences, functional weight use, metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hasched.errors import HaschedError
from hasched.sim.evaluator import FaultyEvaluator
from hasched.sim.faults import create_fault
from hasched.sim.layers import inject_faults, weight_layer_names
from hasched.sim.mapping import GpuTiles, Systolic
from hasched.sim.profile import FaultProfile

MAP = GpuTiles(n_sms=4, pes_per_sm=8, block_height=8, dense_block_width=8)


def prof(rate: float, mapping=MAP) -> FaultProfile:
    return FaultProfile.generate(rate, 2, mapping.pe_shape)


class Block(nn.Module):
    """A torchvision-style basic block: the faulty conv sits inside a residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def resnetish() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), Block(4), Block(4),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # x: (B, T, 6)
        return self.head(self.enc(self.embed(x)).mean(1))


def labels_of(model, x):
    with torch.no_grad():
        return model(x).argmax(-1)


# sets the top exponent bit: a hit makes the value huge, so predictions must change
HUGE = dict(low_bit=30, high_bit=30)


def acc_at(model, x, y, layers, rate, repeats=2, mapping=MAP, fault="bitflip", **kw):
    ev = FaultyEvaluator(model, x, y, layers, create_fault(fault, **kw), prof(rate, mapping),
                         mapping=mapping)
    return ev, ev.accuracy(repeats=repeats, generator=torch.Generator().manual_seed(0))


def test_residual_block_with_a_nested_faulty_layer():
    m, x = resnetish(), torch.rand(24, 1, 8, 8)
    y = labels_of(m, x)
    ev, a0 = acc_at(m, x, y, ["2.conv1", "3.conv2"], 0.0, repeats=3)
    assert ev.last_path == "graph" and a0.eq(1.0).all()
    _, a1 = acc_at(m, x, y, ["2.conv1", "3.conv2"], 0.05, repeats=3, fault="flip-to-1",
                   **HUGE)
    assert a1.shape == (1, 3) and (a1 < 1.0).all()


def test_rate_zero_is_the_clean_model_bit_for_bit():
    m, x = resnetish(), torch.rand(6, 1, 8, 8)
    faulty, st = inject_faults(m, ["0", "2.conv2", "6"], MAP,
                               torch.zeros(MAP.n_pes, dtype=torch.float64),
                               create_fault("bitflip"))
    st.configure(None, repeats=2)
    st.expanded = True  # the caller folds the population into the batch
    with torch.no_grad():
        out = faulty(x.repeat(2, 1, 1, 1))
        assert torch.equal(out, m(x).repeat(2, 1))


def test_transformer_encoder_linears_are_really_faulted():
    m, x = TinyEncoder().eval(), torch.randn(16, 5, 6)
    y = labels_of(m, x)
    layers = ["enc.linear1", "enc.linear2", "head"]
    assert "enc.self_attn.out_proj" not in weight_layer_names(m)
    ev, a0 = acc_at(m, x, y, layers, 0.0)
    assert a0.eq(1.0).all()
    always = FaultProfile(rates=torch.ones(MAP.pe_shape).numpy())
    ev = FaultyEvaluator(m, x, y, layers, create_fault("zero"), always, mapping=MAP)
    a1 = ev.accuracy(repeats=2)  # every partial product lost
    with torch.no_grad():
        ref = m.head.bias.expand(16, -1).argmax(-1)  # head outputs its bias alone
    assert a1.eq(float((ref == y).double().mean())).all()


def test_functional_weight_use_is_refused_or_caught():
    m = TinyEncoder().eval()
    with pytest.raises(HaschedError, match="functionally"):
        inject_faults(m, ["enc.self_attn.out_proj"], MAP, torch.zeros(MAP.n_pes),
                      create_fault("zero"))

    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return F.linear(x, self.fc.weight, self.fc.bias)  # never calls self.fc

    x = torch.randn(8, 4)
    with pytest.raises(HaschedError, match="not called"):
        FaultyEvaluator(Sneaky().eval(), x, torch.zeros(8, dtype=torch.long), ["fc"],
                        create_fault("zero"), prof(0.1), mapping=MAP)


def test_unsupported_module_types_are_named():
    m = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(HaschedError, match="Embedding.*supported: Linear"):
        inject_faults(m, ["0"], MAP, torch.zeros(MAP.n_pes), create_fault("zero"))


def test_linear_on_sequences_faults_every_position():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5, 3)).eval()
    x = torch.randn(20, 5, 6)  # (B, T, C): the first Linear runs on every position
    y = labels_of(m, x)
    ev, a0 = acc_at(m, x, y, ["0"], 0.0)
    assert a0.eq(1.0).all() and ev.state.layers["0"].faults is not None
    # rate 1, 'zero': every position's output is its bias
    faulty, st = inject_faults(m, ["0"], MAP, torch.ones(MAP.n_pes, dtype=torch.float64),
                               create_fault("zero"))
    st.configure(None, 1)
    with torch.no_grad():
        out = faulty[0](x)
    assert torch.equal(out, m[0].bias.expand(20, 5, 8))


@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 6, 3, padding=1, stride=2),
    nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2),
    nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),  # depthwise
    nn.Conv2d(4, 6, (2, 3), stride=(2, 1), padding="same" if False else 0),
])
def test_convolutions_prune_exactly_under_dead_pes(conv):
    """'dead' at the product site on a systolic array == zeroing the mapped weights."""
    torch.manual_seed(4)
    conv = conv.eval()
    x = torch.randn(3, 4, 7) if isinstance(conv, nn.Conv1d) else torch.randn(3, 4, 7, 7)
    sa = Systolic(4, 4)
    chip = create_fault("dead", site="product").sample_chip(sa.pe_shape, 0.3, 5)
    rates = torch.from_numpy(chip.faulty.reshape(-1) * 1.0)
    from hasched.sim.faults import ChipFault

    faulty, st = inject_faults(nn.Sequential(conv), ["0"], sa, rates, ChipFault(chip))
    st.configure(None, 1)
    with torch.no_grad():
        out = faulty(x)
    R = conv.out_channels
    K = conv.weight[0].numel()
    keep = torch.tensor([[not chip.faulty[r % 4, j % 4] for j in range(K)] for r in range(R)])
    w = conv.weight * keep.reshape(conv.weight.shape)
    with torch.no_grad():
        pruned = conv._conv_forward(x, w, conv.bias)
    assert torch.allclose(out, pruned, atol=1e-5)
    assert not torch.allclose(out, conv(x), atol=1e-3)


def test_metrics_top5_and_sdc():
    m, x = resnetish(), torch.rand(30, 1, 8, 8)
    y = (labels_of(m, x) + 1) % 5  # wrong on purpose: top-1 is 0, top-5 (of 5) is 1
    for metric, clean in (("top1", 0.0), ("top5", 1.0), ("sdc1", 0.0)):
        ev = FaultyEvaluator(m, x, y, ["0"], create_fault("bitflip"), prof(0.0), mapping=MAP,
                             metric=metric)
        assert ev.clean_accuracy == clean
    ev = FaultyEvaluator(m, x, y, ["0"], create_fault("flip-to-1", **HUGE), prof(0.05),
                         mapping=MAP, metric="sdc1")
    sdc = ev.accuracy(repeats=2, generator=torch.Generator().manual_seed(1))
    assert (sdc > 0).all()  # predictions changed against the fault-free run
    custom = FaultyEvaluator(m, x, y, ["0"], create_fault("zero"), prof(0.0), mapping=MAP,
                             metric=lambda logits, labels, clean: logits[:, 0] * 0 + 0.25)
    assert custom.accuracy(repeats=1).eq(0.25).all()
