"""The reuse engine: quantised inputs, cached per stream, and exact delta updates.

Frames of ``S`` streams (sequences) run in lockstep: ``engine.step(x)`` takes frame ``t`` of
every stream, ``(S, ...)``. Every accelerated layer (``nn.Linear``, ``nn.Conv1d``,
``nn.Conv2d``) quantises its input per neuron (:mod:`hasched.reuse.quant`) and caches, per
stream, the previous quantised input ``x_hat_{t-1}`` and its output ``y_{t-1}`` (float64).
On a *delta frame* it multiplies only the inputs whose code changed::

    y_t = y_{t-1} + W[:, changed] . (x_hat_t - x_hat_{t-1})[changed]

and for a convolution the same delta goes through the convolution: every changed input
element ``(c, h, w)`` is multiplied with the weights of the (output position, tap) pairs
that read it (no bias; the bias is in ``y_{t-1}``). The first frame, and every ``refresh``
frames if asked, is a *dense frame*: the layer runs on ``x_hat_t`` as the original module,
which resets any rounding drift of the accumulator.

**How the engine attaches to a model.** Like :func:`hasched.sim.layers.inject_faults`, it
copies the model (sharing its parameters) and swaps the named modules for reuse layers.
Forward hooks could quantise inputs, but they cannot skip the module's own dense product,
so the measured wall-clock would include the work reuse saves; the swapped module does
only the delta work.

**MAC accounting** (per layer, all frames): ``macs_dense`` is what a dense accelerator
does, ``macs_done`` what the engine did. A Linear frame costs ``positions * K * R`` dense
and ``changed * R`` on a delta frame. A convolution's dense cost counts the products with
real inputs only, ``(C_out/groups) * sum over input elements of uses(element)``, where
``uses`` is the number of (output position, tap) pairs reading the element (zero-padding
taps, whose operand is a constant 0, are not counted: a reuse accelerator has no reason
to compute them, and counting them would flatter the savings); a delta frame costs
``(C_out/groups) * sum over changed elements of uses(element)``.

**Exactness.** A delta is a difference of two quantised float32 values (exact in float64:
both lie on one grid whose exponent spread is ~``bits`` bits) times float32 weights,
accumulated in float64. So ``y_t`` equals the quantised model's output up to float64
rounding (about ``2^-53`` relative per update) plus the float32 rounding of the dense frame
it started from; with integer-valued weights and inputs it is exact (all partial sums are
integers below ``2^53``), and with ``refresh=1`` every frame is the quantised model itself.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from hasched.errors import HaschedError
from hasched.reuse.quant import LayerQuantizer, check_layers

__all__ = ["LayerStats", "ReuseState", "ReuseEngine", "ConvUses", "conv_uses", "MODES",
           "KERNELS"]

MODES = ("delta", "quant", "fp32")
KERNELS = ("sparse", "dense")
_CHUNK = 1 << 22  # elements of one temporary in the convolution scatter


@dataclass
class LayerStats:
    """Counters of one layer over the frames run since the last :meth:`ReuseEngine.reset`."""

    frames_dense: int = 0
    frames_delta: int = 0
    inputs_delta: int = 0  # input elements seen on delta frames
    inputs_changed: int = 0  # of those, the ones whose code changed
    macs_done: int = 0
    macs_dense: int = 0

    @property
    def reuse_rate(self) -> float:
        """Share of input elements unchanged on delta frames (NaN without delta frames)."""
        return 1.0 - self.inputs_changed / self.inputs_delta if self.inputs_delta else float(
            "nan")

    @property
    def mac_savings(self) -> float:
        return 1.0 - self.macs_done / self.macs_dense if self.macs_dense else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "reuse_rate": self.reuse_rate, "mac_savings": self.mac_savings}


@dataclass
class ReuseState:
    """What the reuse layers of one model share.

    Attributes:
        mode: ``delta`` (reuse), ``quant`` (the quantised model, dense, no state) or
            ``fp32`` (the original model).
        refresh: A dense frame every ``refresh`` frames (0: only the first).
        kernel: ``sparse`` (only changed inputs are multiplied) or ``dense`` (the delta is
            multiplied densely; same values up to float64 summation order, for timing).
        frame: Index of the current frame since the last reset.
    """

    mode: str = "delta"
    refresh: int = 0
    kernel: str = "sparse"
    frame: int = 0
    stats: dict[str, LayerStats] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def dense_now(self) -> bool:
        return self.frame == 0 or (self.refresh > 0 and self.frame % self.refresh == 0)


# --------------------------------------------------------------------- convolution uses

@dataclass(frozen=True)
class ConvUses:
    """Which (tap, output position) pairs read each input position of a convolution (CSR).

    Attributes:
        ptr: ``(H*W + 1,)`` offsets into ``tap``/``out`` per input position ``h*W + w``.
        tap: Kernel tap (PyTorch's ``kh*kw`` order) of each pair. out: Output position.
        count: ``(H*W,)`` pairs per input position (its ``uses``).
        out_hw: Output ``(oh, ow)``.
    """

    ptr: torch.Tensor
    tap: torch.Tensor
    out: torch.Tensor
    count: torch.Tensor
    out_hw: tuple[int, int]


def _geometry(conv: nn.Module) -> tuple[tuple[int, int], ...]:
    one = isinstance(conv, nn.Conv1d)
    two = (lambda v: (1, v[0])) if one else (lambda v: tuple(v))
    return two(conv.kernel_size), two(conv.stride), two(conv.dilation)


def conv_uses(conv: nn.Module, in_hw: tuple[int, ...]) -> ConvUses:
    """The input-to-output map of ``conv`` for inputs of spatial size ``in_hw``.

    Any padding (numbers, ``same``, ``valid``) and padding mode: the index image is padded
    the way the module pads its input, so a reflected or circular copy counts as a use of
    the element it copies.
    """
    H, W = (1, in_hw[0]) if len(in_hw) == 1 else in_hw
    (kh, kw), stride, dilation = _geometry(conv)
    idx = torch.arange(H * W, dtype=torch.float64).reshape(1, 1, H, W)
    pads = list(conv._reversed_padding_repeated_twice)
    pads = pads + [0, 0] if len(pads) == 2 else pads
    if any(pads):
        if conv.padding_mode == "zeros":
            idx = F.pad(idx, pads, value=-1.0)
        else:
            idx = F.pad(idx, pads, mode=conv.padding_mode)
    cols = F.unfold(idx, (kh, kw), dilation=dilation, stride=stride)[0].long()  # (taps, O)
    oh = (idx.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (idx.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    valid = cols >= 0
    tap, out = valid.nonzero(as_tuple=True)
    src = cols[valid]
    order = torch.argsort(src, stable=True)
    count = torch.bincount(src, minlength=H * W)
    ptr = torch.zeros(H * W + 1, dtype=torch.long)
    ptr[1:] = count.cumsum(0)
    return ConvUses(ptr, tap[order], out[order], count, (oh, ow))


# ------------------------------------------------------------------------- reuse layers

class _ReuseLayer(nn.Module):
    """Shared machinery: quantise, decide dense or delta, keep the stream cache."""

    def __init__(self, orig: nn.Module, name: str, quant: LayerQuantizer,
                 state: ReuseState) -> None:
        super().__init__()
        self.orig, self.layer_name, self.quant, self.state = orig, name, quant, state
        self.prev_x: torch.Tensor | None = None  # float64 quantised input of the last frame
        self.acc: torch.Tensor | None = None  # float64 output of the last frame
        state.stats[name] = LayerStats()

    def reset(self) -> None:
        self.prev_x = self.acc = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        st.calls[self.layer_name] = st.calls.get(self.layer_name, 0) + 1
        if st.mode == "fp32":
            return self.orig(x)
        xq = self.quant(x)  # float32 on the quantisation grid
        if st.mode == "quant":
            return self.orig(xq)
        stats = st.stats[self.layer_name]
        x64 = xq.double()
        if self.prev_x is not None and self.prev_x.shape != x64.shape:
            raise HaschedError(f"layer {self.layer_name}: input {tuple(x.shape)} differs "
                               f"from the last frame's {tuple(self.prev_x.shape)}; call "
                               "reset() before a new set of streams")
        if self.prev_x is None or st.dense_now():
            y = self.orig(xq)
            self.acc = self._to_acc(y)
            stats.frames_dense += 1
            stats.macs_done += self.dense_macs(x64)
        else:
            changed = x64 != self.prev_x  # equal codes give equal values, so this is exact
            stats.frames_delta += 1
            stats.inputs_delta += changed.numel()
            stats.inputs_changed += int(changed.sum())
            stats.macs_done += self._delta(x64 - self.prev_x, changed)
            y = None
        stats.macs_dense += self.dense_macs(x64)
        self.prev_x = x64
        return y if y is not None else self._from_acc(x)

    def dense_macs(self, x: torch.Tensor) -> int:
        raise NotImplementedError

    def _to_acc(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _from_acc(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _delta(self, d: torch.Tensor, changed: torch.Tensor) -> int:
        raise NotImplementedError


class ReuseLinear(_ReuseLayer):
    """``nn.Linear`` with reuse; inputs ``(N, ..., K)``, each leading position a stream row."""

    def __init__(self, orig: nn.Linear, name: str, quant: LayerQuantizer,
                 state: ReuseState) -> None:
        super().__init__(orig, name, quant, state)
        self.w64t = orig.weight.detach().double().t().contiguous()  # (K, R)

    def dense_macs(self, x: torch.Tensor) -> int:
        return x.numel() * self.orig.out_features

    def _to_acc(self, y: torch.Tensor) -> torch.Tensor:
        return y.detach().double().reshape(-1, self.orig.out_features)  # (M, R)

    def _from_acc(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.float().reshape(*x.shape[:-1], self.orig.out_features)

    def _delta(self, d: torch.Tensor, changed: torch.Tensor) -> int:
        K = self.orig.in_features
        d, changed = d.reshape(-1, K), changed.reshape(-1, K)  # (M, K)
        if self.state.kernel == "dense":
            self.acc += d @ self.w64t
            return int(changed.sum()) * self.orig.out_features
        idx = changed.nonzero().t()  # (2, E): stream row, input feature
        if idx.shape[1]:
            sp = torch.sparse_coo_tensor(idx, d[idx[0], idx[1]], d.shape,
                                         is_coalesced=True, check_invariants=False)
            self.acc += torch.sparse.mm(sp, self.w64t)
        return int(idx.shape[1]) * self.orig.out_features


class ReuseConv(_ReuseLayer):
    """``nn.Conv2d`` / ``nn.Conv1d`` with reuse (any padding, stride, dilation, groups)."""

    def __init__(self, orig: nn.Module, name: str, quant: LayerQuantizer,
                 state: ReuseState) -> None:
        super().__init__(orig, name, quant, state)
        G, cout, cin = orig.groups, orig.out_channels, orig.in_channels
        self.co_g, self.ci_g = cout // G, cin // G
        taps = orig.weight[0, 0].numel()
        w = orig.weight.detach().double().reshape(G, self.co_g, self.ci_g, taps)
        self.wc = w.permute(0, 2, 3, 1).reshape(cin, taps, self.co_g).contiguous()
        self.uses: ConvUses | None = None
        self._uses_hw: tuple[int, ...] = ()

    def _as2d(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, None, :] if isinstance(self.orig, nn.Conv1d) else x

    def _map(self, x: torch.Tensor) -> ConvUses:
        hw = tuple(x.shape[2:])
        if self.uses is None or self._uses_hw != hw:
            self.uses, self._uses_hw = conv_uses(self.orig, hw), hw
        return self.uses

    def dense_macs(self, x: torch.Tensor) -> int:
        return int(self._map(x).count.sum()) * x.shape[0] * self.orig.in_channels * self.co_g

    def _to_acc(self, y: torch.Tensor) -> torch.Tensor:
        y = self._as2d(y.detach().double())  # (S, Cout, oh, ow)
        return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1]).contiguous()

    def _from_acc(self, x: torch.Tensor) -> torch.Tensor:
        oh, ow = self._map(x).out_hw
        y = self.acc.reshape(x.shape[0], oh, ow, -1).permute(0, 3, 1, 2).float()
        return y[:, :, 0, :] if isinstance(self.orig, nn.Conv1d) else y

    def _delta(self, d: torch.Tensor, changed: torch.Tensor) -> int:
        uses = self._map(d)
        if self.state.kernel == "dense":
            y = self.orig._conv_forward(d, self.orig.weight.double(), None)
            self.acc += self._to_acc(y)
            return self._delta_macs(changed, uses)
        d4, ch4 = self._as2d(d), self._as2d(changed)
        s, c, h, w = ch4.nonzero(as_tuple=True)  # (E,) each
        if s.numel() == 0:
            return 0
        hw = h * d4.shape[3] + w
        vals = d4[s, c, h, w]
        cnt = uses.count[hw]
        n_out, G = uses.out_hw[0] * uses.out_hw[1], self.orig.groups
        acc = self.acc.view(-1, self.co_g)  # (S*n_out*G, Co/G)
        step = max(1, _CHUNK // max(1, self.co_g * int(cnt.max())))
        for i in range(0, s.numel(), step):
            sl = slice(i, i + step)
            n = cnt[sl]
            rep = torch.repeat_interleave(torch.arange(n.numel()), n)  # pair -> element
            first = torch.cumsum(n, 0) - n
            pair = uses.ptr[hw[sl]][rep] + torch.arange(rep.numel()) - first[rep]
            tap, out = uses.tap[pair], uses.out[pair]
            ce = c[sl][rep]
            contrib = vals[sl][rep, None] * self.wc[ce, tap]  # (U, Co/G)
            row = (s[sl][rep] * n_out + out) * G + ce // self.ci_g
            acc.index_add_(0, row, contrib)
        return int(cnt.sum()) * self.co_g

    def _delta_macs(self, changed: torch.Tensor, uses: ConvUses) -> int:
        ch4 = self._as2d(changed)
        per_pos = ch4.sum((0, 1)).reshape(-1).long()  # changed elements per position
        return int((per_pos * uses.count).sum()) * self.co_g


# ------------------------------------------------------------------------------ the engine

_LAYER_TYPES = ((nn.Linear, ReuseLinear), (nn.Conv1d, ReuseConv), (nn.Conv2d, ReuseConv))


class ReuseEngine:
    """A model whose Linear/Conv layers reuse the previous frame's products.

    Args:
        model: Any ``nn.Module`` (run in eval mode; its parameters are shared, not copied).
        quantizers: Layer name -> :class:`LayerQuantizer` (the layers that reuse).
        refresh: A dense frame every ``refresh`` frames (0: only the first).
        kernel: ``sparse`` or ``dense`` delta products (see :class:`ReuseState`).
    """

    def __init__(self, model: nn.Module, quantizers: dict[str, LayerQuantizer],
                 refresh: int = 0, kernel: str = "sparse") -> None:
        if refresh < 0 or kernel not in KERNELS:
            raise HaschedError(f"refresh must be >= 0 and kernel one of {KERNELS}")
        layers = check_layers(model, quantizers)
        memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        self.model = copy.deepcopy(model, memo).eval()  # new containers, shared tensors
        self.state = ReuseState(refresh=refresh, kernel=kernel)
        self.layers: dict[str, _ReuseLayer] = {}
        for name in layers:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            orig = getattr(parent, child)
            cls = next(c for t, c in _LAYER_TYPES if isinstance(orig, t))
            new = cls(orig, name, quantizers[name], self.state)
            setattr(parent, child, new)
            self.layers[name] = new

    @property
    def stats(self) -> dict[str, LayerStats]:
        return self.state.stats

    def reset(self, mode: str = "delta") -> None:
        """Forgets every stream and counter; the next frame is a new frame 0."""
        if mode not in MODES:
            raise HaschedError(f"mode must be one of {MODES}, got {mode!r}")
        self.state.mode, self.state.frame = mode, 0
        for name, layer in self.layers.items():
            layer.reset()
            self.state.stats[name] = LayerStats()

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Frame ``t`` of every stream: ``(S, ...)`` -> the model's output."""
        self.state.calls.clear()
        out = self.model(x)
        if self.state.frame == 0:
            missing = [n for n in self.layers if not self.state.calls.get(n)]
            if missing:
                raise HaschedError(f"layer(s) {', '.join(missing)} were not called in a "
                                   "forward pass (their parent uses the weights directly)")
        self.state.frame += 1
        return out

    @torch.no_grad()
    def run(self, frames: torch.Tensor, mode: str = "delta") -> tuple[torch.Tensor, float]:
        """All frames of ``S`` streams, from a reset: ``(S, L, ...)`` -> ``((S, L, out),
        seconds)``; ``seconds`` is the wall-clock of the forward passes alone."""
        self.reset(mode)
        outs, seconds = [], 0.0
        for t in range(frames.shape[1]):
            x = frames[:, t].contiguous()
            t0 = time.perf_counter()
            outs.append(self.step(x))
            seconds += time.perf_counter() - t0
        return torch.stack(outs, 1), seconds

    def totals(self) -> LayerStats:
        """All layers' counters summed."""
        tot = LayerStats()
        for s in self.stats.values():
            for k in ("frames_dense", "frames_delta", "inputs_delta", "inputs_changed",
                      "macs_done", "macs_dense"):
                setattr(tot, k, getattr(tot, k) + getattr(s, k))
        return tot
