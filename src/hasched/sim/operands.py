"""Operand views: which input values feed each chain of a faulty GEMM.

A faulty GEMM needs, for every hit, the inputs of that hit's chain (the L products one PE
or one accumulator chain computes), and for the dense and permanent paths all chains'
inputs of a block of samples. One view per kind of layer provides both in the mapping's
reduction order: :class:`LinearInput` (``nn.Linear``, any leading dimensions),
:class:`ConvInput` (a padded convolution input, im2col on the fly from strided views) and
:class:`MatrixInput` (a plain ``(N, K, C)`` matrix per sample, for
:mod:`hasched.sim.functional`). Every sparse path gathers through :func:`flat_gather`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hasched.errors import HaschedError
from hasched.sim.mapping import GemmShape, LayerPlan

__all__ = ["ConvInput", "LinearInput", "MatrixInput", "flat_gather", "gemm_shape_of", "k_offsets"]


def gemm_shape_of(module: nn.Module, spatial: tuple[int, int, int] | None = None) -> GemmShape:
    """The GEMM of a Linear or convolution (per group).

    Args:
        module: ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``.
        spatial: For a Linear fed by a flattened ``(C, H, W)`` map, that shape.
    """
    if isinstance(module, nn.Linear):
        R, K = module.out_features, module.in_features
        if spatial is not None:
            c, h, w = spatial
            return GemmShape(R, K, taps=h * w, channels=c, spatial_input=True)
        return GemmShape(R, K)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        taps = int(torch.tensor(module.kernel_size).prod())
        cg = module.in_channels // module.groups
        return GemmShape(module.out_channels, cg * taps, taps=taps, channels=cg)
    raise HaschedError(f"{type(module).__name__} has no GEMM hasched can map")


class LinearInput:
    """GEMM input of a Linear layer: ``x (N, T, K)``; column ``c`` is position ``t``."""

    def __init__(self, x: torch.Tensor, P: int) -> None:
        self.x, self.P = x, P
        self.n_samples = x.shape[0] // P
        self.n_cols = x.shape[1]
        self.per_member = P != 1
        self.samples_last = True  # dense draws in (P, 1, n_k, R, B) order, as always

    def gather(self, h, plan: LayerPlan) -> torch.Tensor:
        """Inputs of each hit's chain: ``(E, L)`` (see :func:`flat_gather`)."""
        n = (h.p * self.n_samples + h.b) if self.per_member else h.b
        T, K = self.x.shape[1:]
        return flat_gather(self.x, (n * T + h.c) * K, k_offsets(plan, 1), h.k, plan)

    def blocks(self, plan: LayerPlan) -> torch.Tensor:
        """All chains' inputs ``(N, 1, n_c, L, T)``."""
        x = self.x.transpose(1, 2)  # (N, K, T)
        return _chain_blocks(x[:, None], plan)

    def blocks_for(self, plan: LayerPlan, p: int, b0: int, n: int) -> torch.Tensor:
        """Chains' inputs of member ``p``'s samples ``b0 .. b0+n-1``: ``(n, 1, n_c, L, T)``."""
        i0 = p * self.n_samples + b0 if self.per_member else b0
        return _chain_blocks(self.x[i0:i0 + n].transpose(1, 2)[:, None], plan)


class ConvInput:
    """GEMM input of a convolution: the padded input ``(N, Cin, Hp, Wp)``."""

    def __init__(self, xp: torch.Tensor, geometry, groups: int, P: int) -> None:
        self.xp, self.groups, self.P = xp, groups, P
        (self.kh, self.kw), (self.sh, self.sw), (self.dh, self.dw) = geometry
        self.oh = (xp.shape[2] - self.dh * (self.kh - 1) - 1) // self.sh + 1
        self.ow = (xp.shape[3] - self.dw * (self.kw - 1) - 1) // self.sw + 1
        self.n_samples = xp.shape[0] // P
        self.n_cols = self.oh * self.ow
        self.per_member = P != 1

    def gather(self, h, plan: LayerPlan) -> torch.Tensor:
        """Inputs of each hit's chain: ``(E, L)`` (see :func:`flat_gather`)."""
        Cp, Hp, Wp = self.xp.shape[1:]
        cg = Cp // self.groups
        n = (h.p * self.n_samples + h.b) if self.per_member else h.b
        base = (n * Cp + (h.r * self.groups // plan.rows) * cg) * (Hp * Wp) + (
            (h.c // self.ow) * self.sh * Wp + (h.c % self.ow) * self.sw)  # (E,)
        key = (plan.k, plan.k_padded, Hp, Wp)
        if getattr(self, "_off_key", None) != key:
            taps = self.kh * self.kw

            def offset(kk: torch.Tensor) -> torch.Tensor:
                i, j = (kk % taps) // self.kw, kk % self.kw
                return (kk // taps) * (Hp * Wp) + i * self.dh * Wp + j * self.dw

            self._off, self._off_key = k_offsets(plan, offset), key
        return flat_gather(self.xp, base, self._off, h.k, plan)

    def cols(self, samples: slice = slice(None)) -> torch.Tensor:
        """im2col in PyTorch's K order: ``(N, G, Cin/G * kh * kw, oh * ow)``.

        Built from strided views: ``F.unfold`` is ~30x slower on CPU for these shapes.
        """
        u = self.xp[samples].unfold(2, self.dh * (self.kh - 1) + 1, self.sh)
        u = u.unfold(3, self.dw * (self.kw - 1) + 1, self.sw)[..., ::self.dh, ::self.dw]
        N, C = u.shape[:2]  # u: (N, Cin, oh, ow, kh, kw)
        u = u.permute(0, 1, 4, 5, 2, 3).reshape(N, self.groups, -1, self.n_cols)
        return u

    def blocks(self, plan: LayerPlan) -> torch.Tensor:
        """All chains' inputs ``(N, G, n_c, L, C)``."""
        return _chain_blocks(self.cols(), plan)

    def blocks_for(self, plan: LayerPlan, p: int, b0: int, n: int) -> torch.Tensor:
        """Chains' inputs of member ``p``'s samples ``b0 .. b0+n-1``: ``(n, G, n_c, L, C)``."""
        i0 = p * self.n_samples + b0 if self.per_member else b0
        return _chain_blocks(self.cols(slice(i0, i0 + n)), plan)


def k_offsets(plan: LayerPlan, offset) -> torch.Tensor:
    """Offset, within one sample's flattened input, of every chain position: ``(n_c, L)``
    (padding positions: -1). ``offset`` maps PyTorch reduction indices to offsets (or is a
    stride)."""
    q = torch.arange(plan.k_padded)
    kk, valid = _pytorch_k(q, plan)
    off = offset(kk) if callable(offset) else kk * offset
    return torch.where(valid, off, -1).reshape(plan.n_chains, plan.chain)


def flat_gather(x: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor,
                chains: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """``x.flat[base + offsets[chain]]`` for every hit: its chain's inputs, ``(E, L)``.

    One row gather of the offsets and one flat ``index_select`` (int32 indices where they
    fit): the hot path of every sparse evaluation. Padding positions read a zero.
    """
    flat = x.reshape(-1)
    off = offsets.to(base.device)[chains]  # (E, L)
    pad = plan.k_padded > plan.k
    if pad:
        flat = torch.cat([flat, flat.new_zeros(1)])
    small = flat.numel() < 2**31
    idx = base.to(torch.int32)[:, None] + off.to(torch.int32) if small else \
        base[:, None] + off
    if pad:
        idx = torch.where(off < 0, flat.numel() - 1, idx)
    return flat.index_select(0, idx.reshape(-1)).reshape(idx.shape)


def _pytorch_k(q: torch.Tensor, plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Mapping-order positions -> PyTorch reduction indices and a not-padding mask."""
    valid = q < plan.k
    qc = q.clamp(max=plan.k - 1)
    kk = qc if plan.k_perm is None else plan.k_perm.to(q.device)[qc]
    return kk, valid


def _chain_blocks(x: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """``(N, G, K, C)`` in PyTorch order -> ``(N, G, n_c, L, C)`` in mapping order, padded."""
    if plan.k_perm is not None:
        x = x[:, :, plan.k_perm.to(x.device)]
    x = F.pad(x, (0, 0, 0, plan.k_padded - plan.k))
    return x.reshape(*x.shape[:2], plan.n_chains, plan.chain, x.shape[-1])


class MatrixInput:
    """A GEMM input given as a matrix per sample: ``x (N, K, C)``."""

    samples_last = False

    def __init__(self, x: torch.Tensor, P: int) -> None:
        self.x, self.P = x, P
        self.n_samples, self.n_cols = x.shape[0] // P, x.shape[2]
        self.per_member = P != 1

    def gather(self, h, plan: LayerPlan) -> torch.Tensor:
        n = (h.p * self.n_samples + h.b) if self.per_member else h.b
        K, C = self.x.shape[1:]
        return flat_gather(self.x, n * K * C + h.c, k_offsets(plan, C), h.k, plan)

    def _chains(self, x: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
        if plan.k_perm is not None:
            x = x[:, plan.k_perm.to(x.device)]
        x = F.pad(x, (0, 0, 0, plan.k_padded - plan.k))
        return x.reshape(x.shape[0], 1, plan.n_chains, plan.chain, x.shape[-1])

    def blocks(self, plan: LayerPlan) -> torch.Tensor:
        return self._chains(self.x, plan)

    def blocks_for(self, plan: LayerPlan, p: int, b0: int, n: int) -> torch.Tensor:
        i0 = p * self.n_samples + b0 if self.per_member else b0
        return self._chains(self.x[i0:i0 + n], plan)
