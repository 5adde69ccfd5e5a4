"""The reuse engine: exact against the quantised model, MACs counted by hand, any module."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.reuse.engine import ReuseEngine, conv_uses
from hasched.reuse.quant import LayerQuantizer, LayerSpec, calibrate, neuron_axis, uniform_bits


def _moving(S: int, L: int, shape: tuple[int, ...], g: torch.Generator,
            levels: int | None = None) -> torch.Tensor:
    """``(S, L, *shape)`` frames where a few elements change from frame to frame."""
    x = torch.rand(S, *shape, generator=g)
    frames = []
    for _ in range(L):
        mask = torch.rand(x.shape, generator=g) < 0.2
        x = torch.where(mask, torch.rand(x.shape, generator=g), x)
        frames.append(x.clone())
    out = torch.stack(frames, 1)
    return torch.floor(out * levels) if levels else out


def _net(g: torch.Generator, integer: bool = False) -> nn.Module:
    torch.manual_seed(0)  # module construction only; weights are replaced below
    net = nn.Sequential(OrderedDict([
        ("c0", nn.Conv2d(2, 4, 3, padding=1)), ("r0", nn.ReLU()),
        ("c1", nn.Conv2d(4, 4, 2, stride=2, dilation=1, groups=2, padding=1,
                         padding_mode="reflect")), ("r1", nn.ReLU()),
        ("flat", nn.Flatten()), ("h0", nn.Linear(4 * 4 * 4, 8)), ("r2", nn.ReLU()),
        ("op", nn.Linear(8, 3))])).eval()
    for p in net.parameters():
        with torch.no_grad():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).float() if integer
                    else torch.randn(p.shape, generator=g) * 0.5)
    return net


def _engine(net, specs, bits, **kw) -> ReuseEngine:
    mods = dict(net.named_modules())
    q = {n: LayerQuantizer(s, bits[n], neuron_axis(mods[n])) for n, s in specs.items()}
    return ReuseEngine(net, q, **kw)


def _quantised_reference(net, specs, bits, frames) -> torch.Tensor:
    """The quantised model by forward pre-hooks on the original modules (another path)."""
    mods = dict(net.named_modules())
    handles = []
    for n, s in specs.items():
        q = LayerQuantizer(s, bits[n], neuron_axis(mods[n]))
        handles.append(mods[n].register_forward_pre_hook(lambda m, a, q=q: (q(a[0]),)))
    try:
        with torch.no_grad():
            return torch.stack([net(frames[:, t]) for t in range(frames.shape[1])], 1)
    finally:
        for h in handles:
            h.remove()


def test_refresh_every_frame_equals_the_quantised_model():
    g = torch.Generator().manual_seed(1)
    net = _net(g)
    frames = _moving(5, 6, (2, 7, 7), g)
    specs = calibrate(net, ["c0", "c1", "h0", "op"], frames.reshape(-1, 2, 7, 7))
    bits = {n: torch.randint(2, 7, (s.neurons,), generator=g) for n, s in specs.items()}
    eng = _engine(net, specs, bits, refresh=1)
    out, _ = eng.run(frames, "delta")
    assert torch.equal(out, _quantised_reference(net, specs, bits, frames))
    assert all(s.frames_delta == 0 for s in eng.stats.values())


def test_delta_is_exact_for_integer_weights_and_inputs():
    g = torch.Generator().manual_seed(2)
    net = _net(g, integer=True)
    frames = _moving(4, 8, (2, 7, 7), g, levels=8)  # integers 0..7
    # step = hi / (2^(b-1) - 1) = 1: every code is the integer value itself.
    specs = {n: LayerSpec(n, "x", s, 127.0, True) for n, s in
             (("c0", 2), ("c1", 4), ("h0", 64), ("op", 8))}
    bits = uniform_bits(specs, 8)
    for kernel in ("sparse", "dense"):
        eng = _engine(net, specs, bits, kernel=kernel)
        out, _ = eng.run(frames, "delta")
        assert torch.equal(out, _quantised_reference(net, specs, bits, frames))
        assert all(s.frames_delta == 7 for s in eng.stats.values())
        assert 0.1 < eng.stats["c0"].reuse_rate < 0.95  # the delta path was exercised


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_delta_error_is_within_the_float32_bound(layer):
    """Real weights: ``y_t`` differs from the float32 quantised layer only by rounding.

    Bound per output (u = 2^-24, n = products summed + 1): the dense float32 frames, the
    starting one and the reference, are each off by at most n u (|W| |x_hat| + |b|); the
    float64 deltas add at most L n 2^-53 (|W| |dx|) per frame; the final cast u |y|.
    """
    g = torch.Generator().manual_seed(3)
    if layer == "linear":
        mod, shape = nn.Linear(40, 6), (3, 40)  # leading positions: (N, T, K)
    else:
        mod, shape = nn.Conv2d(3, 5, 3, padding=1), (3, 6, 6)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    net = nn.Sequential(OrderedDict([("m", mod)])).eval()
    frames = _moving(4, 10, shape, g)
    specs = calibrate(net, ["m"], frames.reshape(-1, *shape))
    bits = {"m": torch.randint(3, 9, (specs["m"].neurons,), generator=g)}
    eng = _engine(net, specs, bits)
    out, _ = eng.run(frames, "delta")
    ref = _quantised_reference(net, specs, bits, frames)
    q = eng.layers["m"].quant
    absmod = nn.Sequential(OrderedDict([("m", type(mod)(*(
        (40, 6) if layer == "linear" else (3, 5, 3)), **({} if layer == "linear" else {
            "padding": 1})))]))
    with torch.no_grad():
        absmod.m.weight.copy_(mod.weight.abs())
        absmod.m.bias.copy_(mod.bias.abs())
        mag = torch.stack([absmod(q(frames[:, t]).abs()) for t in range(10)], 1).double()
    n = (40 if layer == "linear" else 27) + 1
    bound = 2 * n * 2**-24 * mag.amax(1, keepdim=True) + 10 * n * 2**-53 * mag.amax(
        1, keepdim=True) * 2 + 2**-24 * ref.abs().double()
    assert ((out.double() - ref.double()).abs() <= bound).all()
    assert eng.stats["m"].frames_delta == 9 and eng.stats["m"].inputs_changed > 0


def test_macs_by_hand_linear():
    lin = nn.Linear(4, 3)
    net = nn.Sequential(OrderedDict([("l", lin)])).eval()
    spec = {"l": LayerSpec("l", "linear", 4, 15.0, False)}  # 4 bits: step 1
    eng = _engine(net, spec, uniform_bits(spec, 4))
    f0 = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    f1 = torch.tensor([[1.0, 5.0, 3.0, 0.0]])  # two inputs changed
    f2 = torch.tensor([[1.2, 5.0, 3.0, 0.0]])  # 1.2 rounds to code 1: nothing changed
    eng.run(torch.stack([f0, f1, f2], 1))
    st = eng.stats["l"]
    assert (st.macs_done, st.macs_dense) == (12 + 2 * 3 + 0, 3 * 12)
    assert (st.inputs_delta, st.inputs_changed) == (8, 2)
    assert st.reuse_rate == 0.75 and st.mac_savings == 0.5


def test_macs_by_hand_conv():
    conv = nn.Conv2d(1, 2, 2)  # 3x3 input -> 2x2 output
    uses = conv_uses(conv, (3, 3))
    assert uses.count.reshape(3, 3).tolist() == [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    assert conv_uses(nn.Conv2d(1, 1, 2, padding=1), (3, 3)).count.tolist() == [4] * 9
    reflect = conv_uses(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), (3, 3))
    assert int(reflect.count.sum()) == 9 * 9  # no zero taps: every tap reads an input
    # Reflected rows/cols read sources [1, 0, 1, 2, 1]; the 3 windows per axis read source
    # 0 twice, 1 five times, 2 twice; in 2-D the counts multiply.
    assert reflect.count.reshape(3, 3).tolist() == [[4, 10, 4], [10, 25, 10], [4, 10, 4]]
    net = nn.Sequential(OrderedDict([("c", conv)])).eval()
    spec = {"c": LayerSpec("c", "conv", 1, 15.0, False)}
    eng = _engine(net, spec, uniform_bits(spec, 4))
    f0 = torch.zeros(1, 1, 1, 3, 3)
    f1 = f0.clone()
    f1[0, 0, 0, 1, 1] = 5.0  # the centre: read by 4 (tap, output) pairs
    f2 = f1.clone()
    f2[0, 0, 0, 0, 0] = 3.0  # a corner: read once
    eng.run(torch.cat([f0, f1, f2], 1))
    st = eng.stats["c"]
    assert (st.macs_dense, st.macs_done) == (3 * 16 * 2, 16 * 2 + 4 * 2 + 1 * 2)


def test_any_module_residual_and_conv1d():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Conv1d(3, 3, 3, padding=1)
            self.head = nn.Linear(3 * 5, 2)

        def forward(self, x):
            y = torch.relu(self.inner(x)) + x  # residual: the skip sees the same batch
            return self.head(y.flatten(1))

    g = torch.Generator().manual_seed(4)
    net = Block().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())
    frames = _moving(3, 5, (3, 5), g, levels=6)
    specs = {"inner": LayerSpec("inner", "conv", 3, 127.0, True),
             "head": LayerSpec("head", "linear", 15, 127.0, True)}
    bits = uniform_bits(specs, 8)
    out, _ = _engine(net, specs, bits).run(frames)
    assert torch.equal(out, _quantised_reference(net, specs, bits, frames))


def test_bad_use_is_refused():
    net = nn.Sequential(OrderedDict([("l", nn.Linear(4, 3))])).eval()
    spec = {"l": LayerSpec("l", "linear", 4, 1.0, False)}
    eng = _engine(net, spec, uniform_bits(spec, 4))
    eng.step(torch.rand(2, 4))
    with pytest.raises(HaschedError, match="reset"):
        eng.step(torch.rand(3, 4))
    with pytest.raises(HaschedError, match="unknown layer"):
        ReuseEngine(net, {"x": LayerQuantizer(spec["l"], torch.full((4,), 4), -1)})
    with pytest.raises(HaschedError, match="bits must be in 2"):
        LayerQuantizer(LayerSpec("l", "linear", 4, 1.0, True), torch.full((4,), 1), -1)
    with pytest.raises(HaschedError, match="bit widths for 4"):
        LayerQuantizer(spec["l"], torch.full((3,), 4), -1)


def test_quantiser_codes_by_hand():
    q = LayerQuantizer(LayerSpec("l", "linear", 2, 3.0, False), torch.tensor([2, 1]), -1)
    x = torch.tensor([[0.4, 0.4], [1.6, 1.6], [7.0, -1.0]])
    # bits 2: step 1, codes 0..3; bits 1: step 3, codes 0..1
    assert q.codes(x).tolist() == [[0, 0], [2, 1], [3, 0]]
    assert q(x).tolist() == [[0, 0], [2, 3], [3, 0]]
    s = LayerQuantizer(LayerSpec("l", "linear", 1, 2.0, True), torch.tensor([3]), -1)
    assert s.codes(torch.tensor([[-5.0], [-0.6], [0.3]])).tolist() == [[-3], [-1], [0]]  # step 2/3
