"""Permanent faults, evaluated in bulk: a faulty PE corrupts *every* value it computes.

Drawing hits one by one (as for transient faults) would enumerate ``faulty sites x images
x columns`` entries. Here the faulty (row, chain, position) locations are known in advance,
so each member's output changes are computed for whole image chunks at once:

* ``output`` sites (a faulty PE's whole chain sum, gpu-tiles): the chain values of the
  faulty (row, chain) pairs, corrupted;
* ``product`` sites: the products at faulty (row, position) pairs, corrupted, their change
  added to the output (exact for integer arithmetic; float64 for fp32);
* ``accumulator`` sites: the chain's running sum is corrupted after each faulty position.
  When the faulty positions are the same for all chains of a row (systolic: they depend on
  the array row only), the chain is split into segments at the faulty positions whose sums
  come from batched GEMMs, and only the corruption steps run elementwise; otherwise the
  chain is accumulated position by position.

The result is a :class:`~hasched.sim.gemm.DenseOut` (float64 deltas and a hit mask).
"""

from __future__ import annotations

import torch

from hasched.errors import HaschedError
from hasched.sim.gemm import DenseOut, LayerFaults, _corrupt

__all__ = ["permanent_deltas"]

_CHUNK_ELEMENTS = 1 << 24  # elements of the largest temporary per image chunk


def permanent_deltas(fa: LayerFaults, xv, generator=None) -> DenseOut:
    """Output changes of every member for all samples of ``xv``: ``(P, B, R, C)``."""
    P, B, C, R = fa.population, xv.n_samples, xv.n_cols, fa.plan.rows
    dev = fa.rates.device
    delta = torch.zeros(P, B, R, C, dtype=torch.float64, device=dev)
    chain_level = fa.plan.pe_chain is not None  # one PE computes a whole chain (gpu-tiles)
    if not chain_level and fa.rates.shape[2] != 1:
        raise HaschedError("permanent faults need one PE per chain or the same PEs in every "
                           "chain of a row (gpu-tiles, systolic)")
    for p in range(P):
        bad = fa.rates[p] > 0  # (R, n_c', L')
        if chain_level:  # faulty chains; every position of one is on the faulty PE
            rows, chains = bad.any(2).nonzero(as_tuple=True)
            pos = torch.zeros_like(rows)
        else:
            rows, chains, pos = bad.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        width = fa.plan.k_padded * C * max(1, rows.numel() // max(1, R))
        step = max(1, _CHUNK_ELEMENTS // max(1, width))
        for b0 in range(0, B, step):
            xb = xv.blocks_for(fa.plan, p, b0, min(step, B - b0))  # (n, G, n_c, L, C)
            if chain_level:
                d = _chains(fa, p, xb, rows, chains)
            elif fa.site == "accumulator":
                d = _segments(fa, p, xb, rows, pos)
            else:
                d = _products_per_row(fa, p, xb, rows, pos)
            delta[p, b0:b0 + xb.shape[0]] = d
    hit = delta != 0
    full = None
    if fa.site == "output" and not fa.arith.is_int:
        full = torch.stack([(fa.rates[p] > 0).any(2).sum(1) == fa.plan.n_chains
                            for p in range(P)])[:, None, :, None].expand_as(delta)
        hit = hit | full
    return DenseOut(delta, hit, full)


def _w_chains(fa: LayerFaults) -> torch.Tensor:
    """Weights as ``(R, n_c, L)`` in mapping order."""
    plan = fa.plan
    return fa.arith.w_mapped.reshape(plan.rows, plan.n_chains, plan.chain)


def _group(fa: LayerFaults, rows: torch.Tensor) -> torch.Tensor:
    """Convolution group (input block) each row reads."""
    return rows * fa.groups // fa.plan.rows


def _row_chain_sums(fa: LayerFaults, w: torch.Tensor, xb: torch.Tensor, grp: torch.Tensor,
                    a: int, b: int) -> torch.Tensor:
    """Per row and chain, the exact sum over chain positions ``a..b-1``: ``(n, Rg, n_c, C)``.

    One batched GEMM per convolution group (rows of a group share their inputs).
    """
    n, C = xb.shape[0], xb.shape[-1]
    out = torch.empty(n, grp.numel(), fa.plan.n_chains, C, dtype=torch.float64,
                      device=xb.device)
    groups = _group(fa, grp)
    for g in torch.unique(groups).tolist():
        sel = (groups == g).nonzero().squeeze(1)
        wg = w[grp[sel]][:, :, a:b].transpose(0, 1)  # (n_c, Rs, l)
        res = fa.arith.matmul(wg, xb[:, g, :, a:b])  # (n, n_c, Rs, C)
        out[:, sel] = res.permute(0, 2, 1, 3)
    return out


def _pe(fa: LayerFaults, p: int, rows, chains, pos) -> torch.Tensor | None:
    return None if fa.pes is None else fa.pes[p, rows, chains, pos]


def _chains(fa: LayerFaults, p: int, xb, rows, chains) -> torch.Tensor:
    """Faulty (row, chain) pairs whose every position runs on a faulty PE (gpu-tiles)."""
    ar, n, C = fa.arith, xb.shape[0], xb.shape[-1]
    w = _w_chains(fa)[rows, chains]  # (U, L)
    x = xb[:, _group(fa, rows), chains]  # (n, U, L, C)
    prods = ar.products(w[None, :, :, None], x)  # (n, U, L, C)
    pe = _pe(fa, p, rows, chains, torch.zeros_like(rows))
    pe_e = None if pe is None else pe[None, :, None].expand(n, -1, C)
    v = ar.chain_value(prods.sum(2)).double()  # (n, U, C) clean chain values
    if fa.site == "output":
        new = _corrupt(fa, v, "output", pe_e, None)
    elif fa.site == "product":
        pe_p = None if pe is None else pe[None, :, None, None].expand_as(prods)
        new = v + (_corrupt(fa, prods, "product", pe_p, None) - prods).sum(2)
    else:
        acc = torch.zeros_like(v)
        for i in range(prods.shape[2]):
            acc = _corrupt(fa, ar.chain_value(acc + prods[:, :, i]).double(), "accumulator",
                           pe_e, None)
        new = ar.chain_value(acc).double()
    out = torch.zeros(n, fa.plan.rows, C, dtype=torch.float64, device=v.device)
    out.index_add_(1, rows, new - v)
    if fa.site == "output" and not ar.is_int:  # rows whose every chain is faulty: exact sum
        full = torch.bincount(rows, minlength=fa.plan.rows) == fa.plan.n_chains
        if bool(full.any()):
            total = torch.zeros_like(out).index_add_(1, rows, new)
            out[:, full] = total[:, full]
    return out


def _products_per_row(fa: LayerFaults, p: int, xb, rows, pos) -> torch.Tensor:
    """Faulty (row, position) pairs, the same position in every chain (systolic)."""
    ar, n, C = fa.arith, xb.shape[0], xb.shape[-1]
    w = _w_chains(fa)[rows, :, pos]  # (F, n_c)
    x = xb.permute(1, 3, 0, 2, 4)[_group(fa, rows), pos].transpose(0, 1)  # (n, F, n_c, C)
    prods = ar.products(w[None, :, :, None], x)  # (n, F, n_c, C)
    pe = _pe(fa, p, rows, torch.zeros_like(rows), pos)
    pe_e = None if pe is None else pe[None, :, None, None].expand_as(prods)
    d = (_corrupt(fa, prods, "product", pe_e, None) - prods).sum(2)  # (n, F, C)
    out = torch.zeros(n, fa.plan.rows, C, dtype=torch.float64, device=d.device)
    return out.index_add_(1, rows, d)


def _segments(fa: LayerFaults, p: int, xb, rows, pos) -> torch.Tensor:
    """Accumulator faults at the same positions of every chain of a row (systolic)."""
    ar, plan, n, C = fa.arith, fa.plan, xb.shape[0], xb.shape[-1]
    out = torch.zeros(n, plan.rows, C, dtype=torch.float64, device=xb.device)
    # rows with identical faulty positions share their segment GEMMs
    pattern = torch.zeros(plan.rows, plan.chain, dtype=torch.bool, device=rows.device)
    pattern[rows, pos] = True
    uniq, inv = torch.unique(pattern, dim=0, return_inverse=True)
    w_all = _w_chains(fa)  # (R, n_c, L)
    for g in range(uniq.shape[0]):
        faulty = uniq[g].nonzero().squeeze(1).tolist()
        if not faulty:
            continue
        grp = (inv == g).nonzero().squeeze(1)  # (Rg,)
        bounds = [0] + [i + 1 for i in faulty] + [plan.chain]
        sums = [_row_chain_sums(fa, w_all, xb, grp, a, b) if b > a else None
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # (n, Rg, n_c, C)
        acc = sums[0]
        for s_i, i in enumerate(faulty):
            pe = _pe(fa, p, grp, torch.zeros_like(grp), torch.full_like(grp, i))
            pe_e = None if pe is None else pe[None, :, None, None].expand_as(acc)
            acc = _corrupt(fa, ar.chain_value(acc).double(), "accumulator", pe_e, None)
            if sums[s_i + 1] is not None:
                acc = acc + sums[s_i + 1]
        clean = sum(s for s in sums if s is not None)
        d = (ar.chain_value(acc).double() - ar.chain_value(clean).double()).sum(2)
        out[:, grp] = d
    return out
