"""The faulty GEMM as a plain function: ``W @ X`` on a mapping with faults.

:func:`faulty_matmul` is what the faulty layers compute, without a module around it: handy
for studying one GEMM, and the level at which the tests compare every path against loop
oracles.

Example:
    >>> import torch
    >>> from hasched.sim.mapping import GpuTiles
    >>> from hasched.sim.faults import create_fault
    >>> w, x = torch.randn(10, 64), torch.randn(4, 64, 3)       # (R, K), (B, K, C)
    >>> rates = torch.full((GpuTiles().n_pes,), 0.1, dtype=torch.float64)
    >>> out = faulty_matmul(w, x, GpuTiles(), rates, create_fault("zero"), repeats=2,
    ...                     generator=torch.Generator().manual_seed(0))
    >>> out.shape                                                 # (P, B, R, C)
    torch.Size([2, 4, 10, 3])
"""

from __future__ import annotations

import torch

from hasched.errors import HaschedError
from hasched.sim.arithmetic import Arithmetic, Fp32
from hasched.sim.faults import FaultModel
from hasched.sim.gemm import DenseOut, LayerFaults, faulty_gemm
from hasched.sim.layers import row_rates
from hasched.sim.mapping import GemmShape, Mapping
from hasched.sim.operands import MatrixInput

__all__ = ["MatrixInput", "faulty_matmul", "layer_faults"]


def layer_faults(w: torch.Tensor, mapping: Mapping, fault: FaultModel, *,
                 rates: torch.Tensor | None = None, slot_rates: torch.Tensor | None = None,
                 arith: Arithmetic | None = None, in_absmax: float | None = None,
                 perms: torch.Tensor | None = None, repeats: int = 1,
                 shape: GemmShape | None = None) -> LayerFaults:
    """The :class:`LayerFaults` of a bare GEMM.

    Args:
        w: ``(R, K)`` weights. mapping: Placement. fault: What a hit does.
        rates: ``(n_pes,)`` per-PE hit probability; or ``slot_rates``: per slot location
            (``plan.site_pes(site).shape``), for tests that place faults directly.
        arith: Arithmetic (fp32 default). in_absmax: int8 activation range.
        perms: ``(P, R)`` schedules. repeats: Error instances per schedule.
        shape: GEMM geometry (default: a dense layer ``(R, K)``).
    """
    shape = shape or GemmShape(w.shape[0], w.shape[1])
    plan = mapping.plan(shape)
    site = mapping.check_site(fault.site)
    la = (arith or Fp32()).layer(w, in_absmax)
    la.map_weights(plan.k_perm, plan.k_padded)
    la.to(w.device)
    pes = plan.site_pes(site).to(w.device)
    if slot_rates is None:
        if rates is None or rates.numel() != mapping.n_pes:
            raise HaschedError(f"need rates for the mapping's {mapping.n_pes} PEs")
        slot_rates = rates.to(w.device, torch.float64)[pes]
    slot_rates = slot_rates.to(w.device, torch.float64).expand(pes.shape)
    P = 1 if perms is None else perms.shape[0]
    r = row_rates(slot_rates, perms).expand(P, *pes.shape).repeat_interleave(repeats, 0)
    pe = None if not fault.uses_pe else row_rates(pes, perms).expand(
        P, *pes.shape).repeat_interleave(repeats, 0)
    return LayerFaults(plan, la, fault, site, r, pe)


def faulty_matmul(w: torch.Tensor, x: torch.Tensor, mapping: Mapping, rates: torch.Tensor | None,
                  fault: FaultModel, *, slot_rates: torch.Tensor | None = None,
                  arith: Arithmetic | None = None, in_absmax: float | None = None,
                  perms: torch.Tensor | None = None, repeats: int = 1,
                  generator: torch.Generator | None = None, mode: str = "auto") -> torch.Tensor:
    """``W @ X`` for a population on the faulty accelerator.

    Args:
        w: ``(R, K)``. x: ``(B, K, C)`` shared, or ``(P, B, K, C)`` one per member.
        Others: see :func:`layer_faults`; ``generator`` is the source of every draw.

    Returns:
        ``(P, B, R, C)`` accumulator values (float32 for fp32; the exact integer sums as
        float64 for int8, before dequantisation).
    """
    fa = layer_faults(w, mapping, fault, rates=rates, slot_rates=slot_rates, arith=arith,
                      in_absmax=in_absmax, perms=perms, repeats=repeats)
    P = fa.population
    per_member = x.dim() == 4
    if per_member and x.shape[0] != P:
        raise HaschedError(f"per-member input has {x.shape[0]} members, the population {P}")
    xq = fa.arith.quantize(x) if fa.arith.is_int else x
    x3 = xq.reshape(-1, *xq.shape[-2:])  # (N, K, C)
    view = MatrixInput(x3, P if per_member else 1)
    if fa.arith.is_int:
        clean = fa.arith.matmul(fa.arith.w, x3)  # (N, R, C) exact
    else:
        clean = torch.matmul(w, x3)
    B = view.n_samples
    out = clean.reshape(-1, B, *clean.shape[1:]).expand(P, -1, -1, -1).clone()
    res = faulty_gemm(fa, view, generator, mode)
    acc = out.double()
    if isinstance(res, DenseOut):
        new = acc + res.delta
        if res.full is not None:
            new = torch.where(res.full, res.delta, new)
        acc = torch.where(res.hit, new, acc)
    else:
        idx = (res.p, res.b, res.r, res.c)
        new = acc[idx] + res.delta
        if res.full is not None:
            new = torch.where(res.full, res.delta, new)
        acc[idx] = new
    return acc if fa.arith.is_int else acc.float()
