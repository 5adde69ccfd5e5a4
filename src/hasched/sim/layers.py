"""Faulty layers, swapped into any PyTorch model by layer name.

:func:`inject_faults` copies a model and replaces the named ``nn.Linear`` / ``nn.Conv2d``
modules by :class:`FaultyLinear` / :class:`FaultyConv2d`, which run their GEMM on the
simulated accelerator (:mod:`hasched.sim.gemm`). One implementation serves every model and
every layer; nothing is specific to the paper's two CNNs.

**Population layout.** A population of ``P`` rate maps (schedules x repeats) is folded into
the batch: member ``p`` owns rows ``p*B .. p*B+B-1``. The first faulty layer that runs
receives the plain batch ``(B, ...)`` and returns ``(P*B, ...)``; later faulty layers see
the folded batch and give member ``p``'s block its own rates. Layers in between only have to
act per sample (true for convolutions, activations, pooling, eval-mode dropout/batch-norm).
For a model whose branches could meet a faulty layer's output before being expanded, the
caller expands the model input instead (``FaultState.expanded = True``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from hasched.errors import HaschedError
from hasched.sim.faults import ErrorModel
from hasched.sim.gemm import faulty_gemm
from hasched.sim.hardware import (
    AcceleratorConfig,
    FaultProfile,
    Tiling,
    layer_tiling,
    row_rates,
    slot_rates,
)

__all__ = [
    "FaultState",
    "FaultyLinear",
    "FaultyConv2d",
    "inject_faults",
    "weight_layer_names",
    "faulty_layers",
]


@dataclass
class FaultState:
    """What all faulty layers of one model share during a forward pass.

    Attributes:
        enabled: ``False`` runs every faulty layer as its clean original.
        generator: Source of all error draws (explicit; never the global RNG).
        mode: Injection mode for :func:`hasched.sim.gemm.faulty_gemm`.
        expanded: Whether the batch already carries the population dimension.
        population: Members currently configured (``rates.shape[0]`` of every layer).
    """

    enabled: bool = True
    generator: torch.Generator | None = None
    mode: str = "auto"
    expanded: bool = False
    population: int = 1
    layers: dict[str, _FaultyBase] = field(default_factory=dict)

    def configure(
        self, perms: dict[str, torch.Tensor] | None = None, repeats: int = 1
    ) -> int:
        """Sets every layer's per-member rates from schedules; returns ``P * repeats``.

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
            perm = perms.get(name)
            if perm is not None:
                _check_perms(perm, layer.tiling.rows, name)
            rates = row_rates(layer.slot_rate, perm)  # (1 or P, R, n_k)
            layer.rates = rates.expand(P, -1, -1).repeat_interleave(repeats, dim=0)
        self.population = P * repeats
        return self.population

    def configure_rates(self, rates: dict[str, torch.Tensor], repeats: int = 1) -> int:
        """Sets every layer's per-member rates directly; returns ``P * repeats``.

        Unlike :meth:`configure`, the rates need not come from the profile: a model-aware
        searcher can probe what one weight row costs at a chosen rate with every other row
        clean (see :class:`hasched.search.core.problem.ModelAwareProblem`).

        Args:
            rates: Layer name -> ``Tensor[P, rows, n_k]`` rate of every (weight row,
                K-block) per member, in [0, 1]; layers not named keep their identity-order
                profile rates. All entries need the same ``P``.
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
            r = rates.get(name)
            if r is None:
                r = layer.slot_rate[None].expand(P, -1, -1)
            elif tuple(r.shape[1:]) != tuple(layer.slot_rate.shape):
                raise HaschedError(f"layer {name}: rates must be (P, {layer.tiling.rows}, "
                                   f"{layer.tiling.n_k}), got {tuple(r.shape)}")
            elif not bool(((r >= 0) & (r <= 1)).all()):
                raise HaschedError(f"layer {name}: rates must lie in [0, 1]")
            r = r.to(device=layer.slot_rate.device, dtype=layer.slot_rate.dtype)
            layer.rates = r.repeat_interleave(repeats, dim=0)
        self.population = P * repeats
        return self.population


def _check_perms(perm: torch.Tensor, rows: int, name: str) -> None:
    if perm.dim() != 2 or perm.shape[1] != rows:
        raise HaschedError(f"layer {name}: schedule must be (P, {rows}), got {tuple(perm.shape)}")
    ok = torch.sort(perm, dim=1).values == torch.arange(rows, device=perm.device)
    if not bool(ok.all()):
        raise HaschedError(f"layer {name}: schedule is not a permutation of 0..{rows - 1}")


class _FaultyBase(nn.Module):
    """Shared state of a faulty Linear / Conv2d."""

    def __init__(
        self,
        name: str,
        tiling: Tiling,
        error_model: ErrorModel,
        profile: FaultProfile,
        accel: AcceleratorConfig,
        state: FaultState,
    ) -> None:
        super().__init__()
        self.layer_name = name
        self.tiling = tiling
        self.error_model = error_model
        self.state = state
        self.slot_rate = slot_rates(profile, tiling, accel)  # (rows, n_k)
        self.rates = self.slot_rate[None]  # (P, rows, n_k)

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``weight @ x`` for the population.

        Args:
            x: ``(N, K, C)`` in GEMM layout; ``N = B`` before the batch is expanded,
                ``N = P * B`` after.

        Returns:
            ``(P * B, R, C)``.
        """
        st = self.state
        P = self.rates.shape[0]
        if st.expanded:
            if x.shape[0] % P:
                raise HaschedError(f"layer {self.layer_name}: batch {x.shape[0]} is not a "
                                   f"multiple of the population {P}")
            x = x.reshape(P, x.shape[0] // P, *x.shape[1:])  # (P, B, K, C)
        out = faulty_gemm(weight, x, self.tiling, self.rates, self.error_model,
                          st.generator, st.mode)  # (P, B, R, C)
        st.expanded = True
        return out.reshape(-1, *out.shape[2:])


class FaultyLinear(_FaultyBase):
    """``nn.Linear`` whose matrix product runs on the faulty accelerator.

    The GEMM is ``W (out, in) @ X (in, N)``: one output column per sample.
    """

    def __init__(self, linear: nn.Linear, name: str, error_model: ErrorModel,
                 profile: FaultProfile, accel: AcceleratorConfig, state: FaultState) -> None:
        tiling = layer_tiling(linear.out_features, linear.in_features, accel)
        super().__init__(name, tiling, error_model, profile, accel, state)
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.state.enabled:
            return F.linear(x, self.weight, self.bias)
        if x.dim() != 2:
            raise HaschedError(f"layer {self.layer_name}: faulty Linear expects (N, features)")
        # The samples are the GEMM's columns: one (K, B) block per member.
        P = self.rates.shape[0] if self.state.expanded else 1
        xg = x.reshape(P, x.shape[0] // P, -1).transpose(1, 2)  # (P, K, B)
        out = self._gemm(xg, self.weight)  # (P', R, B)
        out = out.transpose(1, 2).reshape(-1, self.tiling.rows)  # (P'*B, R)
        return out if self.bias is None else out + self.bias


class FaultyConv2d(_FaultyBase):
    """``nn.Conv2d`` lowered to im2col + GEMM on the faulty accelerator."""

    def __init__(self, conv: nn.Conv2d, name: str, error_model: ErrorModel,
                 profile: FaultProfile, accel: AcceleratorConfig, state: FaultState) -> None:
        if conv.groups != 1:
            raise HaschedError(f"layer {name}: grouped convolutions are not supported yet")
        if conv.padding_mode != "zeros":
            raise HaschedError(f"layer {name}: padding_mode {conv.padding_mode!r} not supported")
        kh, kw = conv.kernel_size
        tiling = layer_tiling(conv.out_channels, conv.in_channels * kh * kw, accel, kh * kw)
        super().__init__(name, tiling, error_model, profile, accel, state)
        self.conv = conv
        self.weight = conv.weight
        self.bias = conv.bias

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if c.padding == "valid":
            return x
        pads: list[int] = []
        for i in (1, 0):  # F.pad wants the last dim first
            k, d = c.kernel_size[i], c.dilation[i]
            if c.padding == "same":
                total = d * (k - 1)  # PyTorch/TF 'same': the extra pixel goes right/bottom
                pads += [total // 2, total - total // 2]
            else:
                pads += [c.padding[i], c.padding[i]]
        return F.pad(x, pads) if any(pads) else x

    def im2col(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``(N, Cin, H, W) -> (N, Cin*kh*kw, oh*ow)`` in ``F.unfold``'s order.

        Built from strided views: ``F.unfold`` is ~30x slower on CPU for these shapes.
        """
        c = self.conv
        x = self._pad(x)
        (kh, kw), (dh, dw), (sh, sw) = c.kernel_size, c.dilation, c.stride
        u = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        u = u[..., ::dh, ::dw]  # (N, Cin, oh, ow, kh, kw)
        N, _, oh, ow = u.shape[:4]
        return u.permute(0, 1, 4, 5, 2, 3).reshape(N, self.tiling.k, oh * ow), oh, ow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.state.enabled:
            return self.conv(x)
        cols, oh, ow = self.im2col(x)  # (N, K, L)
        out = self._gemm(cols, self.weight.reshape(self.tiling.rows, -1))  # (P*B, R, L)
        out = out.reshape(out.shape[0], self.tiling.rows, oh, ow)
        return out if self.bias is None else out + self.bias[:, None, None]


def weight_layer_names(model: nn.Module) -> list[str]:
    """Names of a model's ``nn.Linear`` / ``nn.Conv2d`` modules in registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def faulty_layers(model: nn.Module) -> dict[str, _FaultyBase]:
    return {m.layer_name: m for m in model.modules() if isinstance(m, _FaultyBase)}


def inject_faults(
    model: nn.Module,
    layers: list[str],
    profile: FaultProfile,
    error_model: ErrorModel,
    accel: AcceleratorConfig | None = None,
    generator: torch.Generator | None = None,
    mode: str = "auto",
) -> tuple[nn.Module, FaultState]:
    """Returns a copy of ``model`` whose ``layers`` run on the faulty accelerator.

    The copy shares the original's parameters (no weights are duplicated); the original is
    not modified.

    Args:
        model: Any ``nn.Module``.
        layers: Dotted module names (``"c0"``, ``"features.3"``) of Linear/Conv2d modules.
        profile: Per-PE fault rates.
        error_model: What a hit does to a partial product.
        accel: Geometry; defaults to :class:`AcceleratorConfig()`.
        generator: Source of error draws; a ``FaultState`` field, replaceable later.
        mode: ``"auto"``, ``"dense"`` or ``"sparse"`` injection.
    """
    accel = accel or AcceleratorConfig()
    profile.check(accel)
    known = weight_layer_names(model)
    if not layers:
        raise HaschedError("no faulty layer given")
    for name in layers:
        if name not in known:
            raise HaschedError(f"unknown layer {name!r}; this model's layers: {', '.join(known)}")
    if len(set(layers)) != len(layers):
        raise HaschedError(f"layer listed twice: {layers}")
    # Shallow-copy module containers but share parameters and buffers.
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    faulty = copy.deepcopy(model, memo)
    state = FaultState(generator=generator, mode=mode)
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = faulty.get_submodule(parent_name) if parent_name else faulty
        orig = getattr(parent, child)
        cls = FaultyLinear if isinstance(orig, nn.Linear) else FaultyConv2d
        new = cls(orig, name, error_model, profile, accel, state)
        setattr(parent, child, new)
        state.layers[name] = new
    return faulty, state
