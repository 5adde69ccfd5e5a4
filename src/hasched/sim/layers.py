"""Faulty layers, swapped into any PyTorch model by layer name.

:func:`inject_faults` copies a model (sharing its parameters) and replaces the named modules
by faulty versions chosen by module type from :data:`FAULTY_LAYERS`: ``nn.Linear`` (any
leading dimensions: ``(N, ..., K)``; every position is an output column of the GEMM),
``nn.Conv2d`` and ``nn.Conv1d`` (any stride, dilation, padding and padding mode, groups,
depthwise; lowered to im2col). Modules that apply weights functionally
(``nn.MultiheadAttention`` reads ``out_proj.weight`` directly) are refused with a clear
error, and after injection :meth:`FaultState.check_called` proves that every faulty layer
actually runs in a forward pass, so a fused fast path can never silently skip the faults.

A faulty layer has three modes (:class:`FaultState`):

* ``enabled = False``: the original module (the fp32 reference);
* ``enabled``, ``faults_on = False``: the accelerator's arithmetic without faults (for fp32
  identical to the original; for int8 the quantised layer);
* ``enabled`` and ``faults_on``: faults at the PEs the mapping assigns.

**Population layout.** ``P`` members (schedules x repeats) are folded into the batch: member
``p`` owns rows ``p*B .. p*B+B-1``. The first faulty layer that runs receives the plain
batch ``(B, ...)`` and returns ``(P*B, ...)``; later faulty layers see the folded batch. When
the first faulty layer sits inside a block (e.g. a residual block), the caller expands the
model input instead (``FaultState.expanded = True``) so that every branch sees the fold.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from hasched.errors import HaschedError
from hasched.registry import Registry
from hasched.sim.arithmetic import PINNED_SCALE_ATTR, Arithmetic, Fp32, LayerArith
from hasched.sim.faults import FaultModel
from hasched.sim.gemm import DenseOut, LayerFaults, SparseOut, faulty_gemm
from hasched.sim.mapping import GemmShape, LayerPlan, Mapping
from hasched.sim.operands import ConvInput, LinearInput, gemm_shape_of
from hasched.sim.profile import FaultProfile

__all__ = [
    "FAULTY_LAYERS",
    "FaultState",
    "FaultyLayer",
    "FaultyLinear",
    "FaultyConv",
    "inject_faults",
    "weight_layer_names",
    "faulty_layers",
    "row_rates",
    "gemm_shape_of",
]

FAULTY_LAYERS: Registry[type] = Registry("faulty layer type")
# Modules that use their children's weights functionally: faulting those children would
# change nothing, so it is refused.
_FUNCTIONAL = (nn.MultiheadAttention,)
_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class FaultState:
    """What all faulty layers of one model share during a forward pass.

    Attributes:
        enabled: ``False`` runs every faulty layer as its original module.
        faults_on: ``False`` runs the accelerator's arithmetic without faults.
        generator: Source of all error draws (explicit; never the global RNG).
        mode: Injection mode (``auto``, ``dense``, ``sparse``).
        expanded: Whether the batch already carries the population dimension.
        population: Members currently configured.
        calls: Forward calls per faulty layer (see :meth:`check_called`).
    """

    enabled: bool = True
    faults_on: bool = True
    generator: torch.Generator | None = None
    mode: str = "auto"
    expanded: bool = False
    population: int = 1
    layers: dict[str, FaultyLayer] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)

    def configure(self, perms: dict[str, torch.Tensor] | None = None, repeats: int = 1) -> int:
        """Sets every layer's per-member faults from schedules; returns ``P * repeats``.

        Args:
            perms: Layer name -> ``LongTensor[P, rows]`` (``perm[slot] = row``); layers
                not named run in identity order. All entries need the same ``P``.
            repeats: Independent error instances per schedule; member index is
                ``p * repeats + repeat``.
        """
        perms = perms or {}
        unknown = set(perms) - set(self.layers)
        if unknown:
            raise HaschedError(f"schedule names layers that are not faulty: {sorted(unknown)}")
        sizes = {int(v.shape[0]) for v in perms.values()}
        if len(sizes) > 1:
            raise HaschedError(f"schedules have different population sizes: {sorted(sizes)}")
        P = sizes.pop() if sizes else 1
        for name, layer in self.layers.items():
            layer.configure(perms.get(name), P, repeats)
        self.population = P * repeats
        return self.population

    def configure_rates(self, rates: dict[str, torch.Tensor], repeats: int = 1) -> int:
        """Sets every layer's per-member rates directly; returns ``P * repeats``.

        Unlike :meth:`configure`, the rates need not come from the profile: a model-aware
        searcher can probe what one weight row costs at a chosen rate with every other row
        clean (see :class:`hasched.search.core.problem.ModelAwareProblem`). Transient
        faults only: a chip map's faults are where its faulty PEs are.

        Args:
            rates: Layer name -> ``Tensor[P, *slot_rate.shape]`` hit probability of every
                (weight row, site) per member, in [0, 1]; layers not named keep their
                identity-order rates. All entries need the same ``P``.
            repeats: Independent error instances per member.
        """
        unknown = set(rates) - set(self.layers)
        if unknown:
            raise HaschedError(f"rates name layers that are not faulty: {sorted(unknown)}")
        sizes = {int(v.shape[0]) for v in rates.values()}
        if len(sizes) != 1:
            raise HaschedError(f"rate maps need one population size, got {sorted(sizes)}")
        P = sizes.pop()
        for name, layer in self.layers.items():
            layer.configure_rates(rates.get(name), P, repeats)
        self.population = P * repeats
        return self.population

    def check_called(self, run) -> None:
        """Runs ``run()`` (a forward pass) and raises if a faulty layer was not called."""
        self.calls.clear()
        run()
        missing = [n for n in self.layers if self.calls[n] == 0]
        if missing:
            raise HaschedError(
                f"faulty layer(s) {', '.join(missing)} were not called in a forward pass: "
                "their parent uses the weights directly (e.g. a fused fast path or "
                "F.linear(x, self.layer.weight)); faults there would be silently lost")


def row_rates(slot_values: torch.Tensor, perms: torch.Tensor | None) -> torch.Tensor:
    """Moves per-slot values onto weight rows under schedules ``perms``.

    A schedule only decides which PEs compute a row, so permuting the per-slot fault data
    is exactly equivalent to permuting the weight rows before the GEMM and un-permuting its
    outputs afterwards, and it lets a population share one set of clean partial products.

    Args:
        slot_values: ``(rows, ...)`` per slot.
        perms: ``(P, rows)`` with ``perms[p, s] = row``, or ``None`` for the identity.

    Returns:
        ``(P, rows, ...)`` per weight row (``P = 1`` for ``None``).
    """
    if perms is None:
        return slot_values[None]
    P, n = perms.shape
    if n != slot_values.shape[0]:
        raise HaschedError(f"schedule has {n} entries, the layer has {slot_values.shape[0]} rows")
    src = slot_values.to(perms.device)[None].expand(P, *slot_values.shape)
    idx = perms.reshape(P, n, *([1] * (slot_values.dim() - 1))).expand_as(src)
    return torch.empty_like(src).scatter_(1, idx, src)  # out[p, perms[p, s]] = slot[s]


def _check_perms(perm: torch.Tensor, rows: int, name: str) -> None:
    if perm.dim() != 2 or perm.shape[1] != rows:
        raise HaschedError(f"layer {name}: schedule must be (P, {rows}), got {tuple(perm.shape)}")
    ok = torch.sort(perm, dim=1).values == torch.arange(rows, device=perm.device)
    if not bool(ok.all()):
        raise HaschedError(f"layer {name}: schedule is not a permutation of 0..{rows - 1}")


class FaultyLayer(nn.Module):
    """Shared machinery of faulty layers: fault data per slot, population, composition.

    Subclasses define ``gemm_shape``, ``_input_view`` and ``_clean``.
    """

    def __init__(self, orig: nn.Module, name: str, mapping: Mapping, arith: Arithmetic,
                 model: FaultModel, rates: torch.Tensor, state: FaultState,
                 in_absmax: float | None, spatial: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.orig, self.layer_name, self.state, self.model = orig, name, state, model
        self.weight, self.bias = orig.weight, orig.bias
        self.spatial = spatial
        shape = self.gemm_shape()
        self.plan: LayerPlan = mapping.plan(shape)
        self.site = mapping.check_site(model.site)
        self.arith: LayerArith = arith.layer(self.weight.reshape(shape.rows, -1), in_absmax,
                                             getattr(orig, PINNED_SCALE_ATTR, None))
        self.arith.map_weights(self.plan.k_perm, self.plan.k_padded)
        dev = self.weight.device
        pes = self.plan.site_pes(self.site).to(dev)  # (rows, n_c', L')
        self.slot_rate = rates.to(dev)[pes]  # (rows, n_c', L') float64 per slot
        self.slot_pe = pes if model.uses_pe else None
        self.faults: LayerFaults | None = None

    @property
    def rows(self) -> int:
        return self.plan.rows

    def gemm_shape(self) -> GemmShape:
        raise NotImplementedError

    def slot_exposure(self) -> torch.Tensor:
        """Summed hit probability of every slot over its chains and positions: ``(rows,)``."""
        reps = (self.plan.n_chains // self.slot_rate.shape[1]) * (
            (self.plan.chain // self.slot_rate.shape[2]) if self.site != "output" else 1)
        return self.slot_rate.sum((1, 2)) * reps

    def configure(self, perm: torch.Tensor | None, P: int, repeats: int) -> None:
        if perm is not None:
            _check_perms(perm, self.rows, self.layer_name)
        rates = row_rates(self.slot_rate, perm).expand(P, *self.slot_rate.shape)
        pes = None if self.slot_pe is None else row_rates(self.slot_pe, perm).expand(
            P, *self.slot_pe.shape).repeat_interleave(repeats, 0)
        self.faults = LayerFaults(self.plan, self.arith, self.model, self.site,
                                  rates.repeat_interleave(repeats, 0), pes, self.groups)

    def configure_rates(self, rates: torch.Tensor | None, P: int, repeats: int) -> None:
        """Per-member rates given directly (see :meth:`FaultState.configure_rates`)."""
        if self.slot_pe is not None or self.model.permanent:
            raise HaschedError(f"layer {self.layer_name}: rate maps need a transient fault "
                               "model (a chip's faults are fixed to its faulty PEs)")
        if rates is None:
            rates = self.slot_rate.expand(P, *self.slot_rate.shape)
        elif tuple(rates.shape[1:]) != tuple(self.slot_rate.shape):
            raise HaschedError(f"layer {self.layer_name}: rates must be (P, "
                               f"{', '.join(map(str, self.slot_rate.shape))}), got "
                               f"{tuple(rates.shape)}")
        elif not bool(((rates >= 0) & (rates <= 1)).all()):
            raise HaschedError(f"layer {self.layer_name}: rates must lie in [0, 1]")
        rates = rates.to(device=self.slot_rate.device, dtype=self.slot_rate.dtype)
        self.faults = LayerFaults(self.plan, self.arith, self.model, self.site,
                                  rates.repeat_interleave(repeats, 0), None, self.groups)

    groups = 1

    def to_device(self, device: torch.device) -> None:
        self.arith.to(device)
        self.slot_rate = self.slot_rate.to(device)
        if self.slot_pe is not None:
            self.slot_pe = self.slot_pe.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if not st.enabled:
            return self.orig(x)
        st.calls[self.layer_name] += 1
        clean = self._clean(x)  # (N, R, C) float32 with bias, the accelerator fault-free
        if not st.faults_on:
            return self._unfold(clean, x)
        fa = self.faults
        P = fa.population
        if st.expanded and x.shape[0] % P:
            raise HaschedError(f"layer {self.layer_name}: batch {x.shape[0]} is not a "
                               f"multiple of the population {P}")
        xv = self._input_view(x, P if st.expanded else 1)
        res = faulty_gemm(fa, xv, st.generator, st.mode)
        out = clean if st.expanded else clean.repeat(P, 1, 1)  # (P*B, R, C)
        out = self.apply_changes(out, res, xv.n_samples)
        st.expanded = True
        return self._unfold(out, x)

    def apply_changes(self, out: torch.Tensor, res: SparseOut | DenseOut, B: int
                      ) -> torch.Tensor:
        """Writes faulty values into the fault-free output ``(P*B, R, C)`` (in place)."""
        if isinstance(res, DenseOut):
            P = res.delta.shape[0]
            o = out.reshape(P, B, *out.shape[1:])
            new = self._faulty_values(o, res.delta, None, res.full)
            o.copy_(torch.where(res.hit, new, o))
            return out
        n = res.p * B + res.b
        cur = out[n, res.r, res.c]
        out[n, res.r, res.c] = self._faulty_values(cur, res.delta, res.r, res.full)
        return out

    def _faulty_values(self, clean: torch.Tensor, delta: torch.Tensor,
                       rows: torch.Tensor | None, full: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Output values with ``delta`` added to their accumulator (float32); where
        ``full``, ``delta`` is the new accumulator itself (plus the bias)."""
        if not self.arith.is_int:
            new = (clean.double() + delta).float()
            if full is None:
                return new
            if rows is None:  # dense (P, B, R, C)
                bias = 0.0 if self.bias is None else self.bias.double().reshape(1, 1, -1, 1)
            else:
                bias = 0.0 if self.bias is None else self.bias.double()[rows]
            return torch.where(full, (delta + bias).float(), new)
        ar = self.arith
        if rows is None:  # dense (P, B, R, C): rows are dim 2
            scale = (ar.s_w.double() * ar.s_x).reshape(1, 1, -1, 1)
        else:
            scale = ar.s_w.double()[rows] * ar.s_x
        return (clean.double() + delta * scale).float()

    def _unfold(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@FAULTY_LAYERS.register("Linear")
class FaultyLinear(FaultyLayer):
    """``nn.Linear`` on the accelerator: ``W (R, K) @ X (K, T)`` per sample, ``T`` positions."""

    def gemm_shape(self) -> GemmShape:
        return gemm_shape_of(self.orig, self.spatial)

    def _x3(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, K)

    def _clean(self, x: torch.Tensor) -> torch.Tensor:
        if not self.arith.is_int:
            return self.orig(x).reshape(x.shape[0], -1, self.rows).transpose(1, 2)
        xq = self.arith.quantize(self._x3(x)).transpose(1, 2)  # (N, K, T)
        acc = self.arith.matmul(self.arith.w, xq)  # (N, R, T) float64, exact
        out = self.arith.dequantize(acc, 1)
        return out if self.bias is None else out + self.bias[:, None]

    def _input_view(self, x: torch.Tensor, P: int) -> LinearInput:
        return LinearInput(self.arith.quantize(self._x3(x)), P)

    def _unfold(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out.transpose(1, 2).reshape(out.shape[0], *x.shape[1:-1], self.rows)


@FAULTY_LAYERS.register("Conv2d")
@FAULTY_LAYERS.register("Conv1d")
class FaultyConv(FaultyLayer):
    """``nn.Conv2d`` / ``nn.Conv1d`` lowered to im2col + GEMM (groups: block-diagonal)."""

    @property
    def groups(self) -> int:  # type: ignore[override]
        return self.orig.groups

    def gemm_shape(self) -> GemmShape:
        return gemm_shape_of(self.orig)

    def _as2d(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, None, :] if isinstance(self.orig, nn.Conv1d) else x

    def _geometry(self) -> tuple[tuple[int, int], ...]:
        c = self.orig
        two = (lambda v: (1, v[0])) if isinstance(c, nn.Conv1d) else (lambda v: tuple(v))
        return two(c.kernel_size), two(c.stride), two(c.dilation)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pads ``(N, C, H, W)`` as the module would (any padding mode, 'same' too)."""
        c = self.orig
        (kh, kw), _, (dh, dw) = self._geometry()
        if c.padding == "valid":
            return x
        if c.padding == "same":
            pads = []
            for k, d in ((kw, dw), (kh, dh)):  # F.pad wants the last dim first
                total = d * (k - 1)  # PyTorch 'same': the extra pixel goes right/bottom
                pads += [total // 2, total - total // 2]
        else:
            p = (0, c.padding[0]) if isinstance(c, nn.Conv1d) else c.padding
            pads = [p[1], p[1], p[0], p[0]]
        if not any(pads):
            return x
        mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
        return F.pad(x, pads, mode=mode)

    def _clean(self, x: torch.Tensor) -> torch.Tensor:
        if not self.arith.is_int:
            y = self._as2d(self.orig(x))
            return y.reshape(y.shape[0], self.rows, -1)
        view = self._input_view(x, 1)
        cols = view.cols()  # (N, G, Kg, C) PyTorch K order
        G = self.groups
        w = self.arith.w.reshape(G, self.rows // G, -1)  # (G, R/G, Kg)
        acc = self.arith.matmul(w, cols)  # (N, G, R/G, C)
        out = self.arith.dequantize(acc.reshape(acc.shape[0], self.rows, -1), 1)
        return out if self.bias is None else out + self.bias[:, None]

    def _input_view(self, x: torch.Tensor, P: int) -> ConvInput:
        xp = self._pad(self.arith.quantize(self._as2d(x)))
        return ConvInput(xp, self._geometry(), self.groups, P)

    def _unfold(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self._geometry()
        xp_h, xp_w = self._padded_hw(x)
        oh = (xp_h - dh * (kh - 1) - 1) // sh + 1
        ow = (xp_w - dw * (kw - 1) - 1) // sw + 1
        y = out.reshape(out.shape[0], self.rows, oh, ow)
        return y[:, :, 0, :] if isinstance(self.orig, nn.Conv1d) else y

    def _padded_hw(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = self._as2d(x[:1, :1]).shape[-2:]
        xp = self._pad(torch.zeros(1, 1, h, w, device=x.device))
        return xp.shape[-2], xp.shape[-1]


# ------------------------------------------------------------------------------ injection

def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    mods, cur = [], model
    for p in parts[:-1]:
        cur = getattr(cur, p)
        mods.append(cur)
    return mods


def weight_layer_names(model: nn.Module) -> list[str]:
    """Names of the modules that can run on the accelerator, in registration order."""
    return [n for n, m in model.named_modules()
            if n and isinstance(m, _SUPPORTED) and not isinstance(m, FaultyLayer)
            and not any(isinstance(a, _FUNCTIONAL) for a in _ancestors(model, n))]


def _layer_class(model: nn.Module, name: str) -> type:
    mods = dict(model.named_modules())
    if name not in mods or not name:
        known = weight_layer_names(model)
        raise HaschedError(f"unknown layer {name!r}; this model's layers: {', '.join(known)}")
    for a in _ancestors(model, name):
        if isinstance(a, _FUNCTIONAL):
            raise HaschedError(
                f"layer {name!r} belongs to a {type(a).__name__}, which applies its weights "
                "functionally (F.multi_head_attention_forward reads out_proj.weight): "
                "faults there would be silently lost; build attention from nn.Linear modules "
                "(q, k, v, out projections) to fault it")
    m = mods[name]
    for cls in type(m).__mro__:
        if cls.__name__ in FAULTY_LAYERS and cls.__module__.startswith("torch.nn"):
            return FAULTY_LAYERS.get(cls.__name__)
    raise HaschedError(f"layer {name!r} is a {type(m).__name__}, which hasched cannot run on "
                       f"the accelerator; supported: {', '.join(FAULTY_LAYERS.names())}")


def faulty_layers(model: nn.Module) -> dict[str, FaultyLayer]:
    return {m.layer_name: m for m in model.modules() if isinstance(m, FaultyLayer)}


def inject_faults(model: nn.Module, layers: list[str], mapping: Mapping, rates: torch.Tensor,
                  fault_model: FaultModel, arith: Arithmetic | None = None, *,
                  in_absmax: dict[str, float] | None = None,
                  spatial: dict[str, tuple[int, int, int]] | None = None,
                  generator: torch.Generator | None = None, mode: str = "auto"
                  ) -> tuple[nn.Module, FaultState]:
    """Returns a copy of ``model`` whose ``layers`` run on the simulated accelerator.

    The copy shares the original's parameters (no weights are duplicated); the original is
    not modified.

    Args:
        model: Any ``nn.Module``.
        layers: Dotted module names (``"c0"``, ``"layer1.0.conv1"``).
        mapping: Where partial products run.
        rates: ``(n_pes,)`` float64 hit probability per PE (transient rates, or 1 on the
            faulty PEs of a chip).
        fault_model: What a hit does.
        arith: Datapath arithmetic (default fp32).
        in_absmax: Per layer, ``max |input|`` on calibration data (int8).
        spatial: Per Linear layer fed by a flattened ``(C, H, W)`` map, that shape (used by
            the ``hwc`` K order).
        generator: Source of error draws (a :class:`FaultState` field, replaceable later).
        mode: ``auto``, ``dense`` or ``sparse`` injection.
    """
    arith = arith or Fp32()
    if not layers:
        raise HaschedError("no faulty layer given")
    if len(set(layers)) != len(layers):
        raise HaschedError(f"layer listed twice: {layers}")
    if rates.numel() != mapping.n_pes:
        raise HaschedError(f"fault data covers {rates.numel()} PEs, the mapping has "
                           f"{mapping.n_pes}")
    classes = {name: _layer_class(model, name) for name in layers}
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    faulty = copy.deepcopy(model, memo)  # new containers, shared parameters and buffers
    state = FaultState(generator=generator, mode=mode)
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = faulty.get_submodule(parent_name) if parent_name else faulty
        orig = getattr(parent, child)
        new = classes[name](orig, name, mapping, arith, fault_model, rates.double(), state,
                            (in_absmax or {}).get(name), (spatial or {}).get(name))
        fault_model_check(new)
        # PyTorch's fused fast paths (e.g. TransformerEncoderLayer in eval mode) read child
        # weights directly unless a child has hooks: this no-op hook keeps the layer called.
        new.register_forward_pre_hook(_keep_unfused)
        setattr(parent, child, new)
        state.layers[name] = new
    return faulty, state


def _keep_unfused(module: nn.Module, args: tuple) -> None:
    return None


def fault_model_check(layer: FaultyLayer) -> None:
    """The fault model must be able to act on the words at the layer's fault site."""
    layer.model.check_word(layer.arith.word(layer.site))


def profile_rates(profile: FaultProfile) -> torch.Tensor:
    """Flat float64 per-PE rates of a transient profile."""
    return torch.from_numpy(profile.flat_rates().copy())
