"""The faulty tiled GEMM: ``out = W @ X`` with errors in the partial products.

A *partial product* is one tile's contribution to one output element: for weight row
``r``, K-block ``k`` and output column ``c``,
``pp[r, k, c] = sum_{j in block k} W[r, j] * X[j, c]`` (see :mod:`hasched.sim.hardware` for
which PE computes it). Each partial product is hit independently with the rate of its PE;
a hit replaces it by ``error_model.corrupt(pp)``. The output is the sum of the (possibly
corrupted) partial products over ``k``.

Two exact implementations of the same distribution:

* **dense**: materialises every partial product and a Bernoulli mask; its cost does not
  depend on the rate, so it is the choice for rates of 0.1-0.5.
* **sparse**: draws the hit positions per (row, K-block) directly (geometric gaps, or a
  binomial count and a uniform subset), recomputes just those partial products and adds
  ``corrupt(pp) - pp`` to the clean product. At rates of 1e-3 it touches a few hundredths of
  a percent of the partial products.

Both take a leading population dimension ``P``: ``rates`` is ``(P, R, n_k)`` (one schedule /
repeat each), and ``X`` is either shared ``(B, K, C)`` or one per member ``(P, B, K, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hasched.errors import HaschedError
from hasched.sim.faults import ErrorModel
from hasched.sim.hardware import Tiling

__all__ = [
    "SAMPLER_VERSION",
    "ErrorSites",
    "SPARSE_MEAN_RATE",
    "choose_mode",
    "partial_products",
    "sample_sites",
    "sites_from_mask",
    "apply_sites",
    "dense_faulty_gemm",
    "faulty_gemm",
]

# Bumped whenever the same seed would draw different error instances; stores that resume
# runs (sensitivity campaigns) record it so that they never mix draws of two versions.
SAMPLER_VERSION = 2

# Below this mean rate the sparse path is faster: it spends ~block_width MACs plus some
# indexing per hit, the dense path one random number and one select per partial product.
SPARSE_MEAN_RATE = 0.02


@dataclass(frozen=True)
class ErrorSites:
    """Positions of corrupted partial products (one entry per hit, all LongTensor[E]).

    Attributes:
        p: Population member. b: Sample (image). r: Weight row. k: K-block. c: Output column.
    """

    p: torch.Tensor
    b: torch.Tensor
    r: torch.Tensor
    k: torch.Tensor
    c: torch.Tensor

    def __len__(self) -> int:
        return int(self.p.numel())


def _blocks(w: torch.Tensor, x: torch.Tensor, tiling: Tiling) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pads K to whole blocks: ``w -> (R, n_k, bw)``, ``x -> (..., B, n_k, bw, C)``."""
    pad = tiling.k_padded - tiling.k
    if pad:
        w = F.pad(w, (0, pad))
        x = F.pad(x, (0, 0, 0, pad))
    n_k, bw = tiling.n_k, tiling.block_width
    return w.reshape(w.shape[0], n_k, bw), x.reshape(*x.shape[:-2], n_k, bw, x.shape[-1])


def partial_products(w: torch.Tensor, x: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """All partial products of ``w @ x``.

    Args:
        w: ``(R, K)`` weights.
        x: ``(..., B, K, C)`` inputs.

    Returns:
        ``(..., B, n_k, R, C)``.
    """
    wb, xb = _blocks(w, x, tiling)  # (R, n_k, bw), (..., B, n_k, bw, C)
    return torch.matmul(wb.transpose(0, 1), xb)  # (n_k, R, bw) @ (..., n_k, bw, C)


def choose_mode(rates: torch.Tensor, mode: str = "auto") -> str:
    """Resolves ``"auto"`` to ``"sparse"`` or ``"dense"`` from the mean rate."""
    if mode not in ("auto", "dense", "sparse"):
        raise HaschedError(f"unknown injection mode {mode!r}; use auto, dense or sparse")
    if mode != "auto":
        return mode
    return "sparse" if float(rates.mean()) < SPARSE_MEAN_RATE else "dense"


def _uniform_subsets(
    counts: torch.Tensor, n: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For location ``l``, ``counts[l]`` distinct uniform positions in ``[0, n)``.

    Drawn with replacement and re-drawn where they collide: the procedure is symmetric in
    the positions, so every subset of the given size is equally likely.
    """
    dev = counts.device
    loc = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts)  # (E,)
    pos = torch.randint(0, n, loc.shape, generator=generator, device=dev)
    while loc.numel() > 1:
        key, order = torch.sort(loc * n + pos, stable=True)
        dup = key[1:] == key[:-1]
        if not bool(dup.any()):
            break
        redo = order[1:][dup]
        pos[redo] = torch.randint(0, n, redo.shape, generator=generator, device=dev)
    return loc, pos


def _geometric_positions(
    p: torch.Tensor, n: int, generator: torch.Generator | None, slack: float = 6.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit positions of independent Bernoulli(p[l]) trials ``0..n-1`` per location ``l``.

    Successive gaps are Geometric(p), so positions come out distinct and sorted with no
    sort at all; this is the fast path for locations with many expected hits. Enough gaps
    for ``mean + slack * sqrt(mean)`` hits are drawn at once; the rare location that needs
    more continues from its last position until it passes ``n``.
    """
    dev = p.device
    idx = (p > 0).nonzero().squeeze(1)  # a zero rate never hits
    last = torch.full(p.shape, -1, dtype=torch.long, device=dev)
    locs, poss = [], []
    while idx.numel():
        pi = p[idx].double()
        mean = (n - 1 - last[idx]).clamp(min=0).double() * pi
        m = torch.ceil(mean + slack * mean.sqrt() + 2).long().clamp(min=1)  # (L,)
        loc = torch.repeat_interleave(idx, m)  # (G,)
        u = 1.0 - torch.rand(loc.shape, generator=generator, device=dev, dtype=torch.float64)
        gap = torch.floor(torch.log(u) / torch.log1p(-p[loc].double())).long() + 1  # >= 1
        cs = gap.cumsum(0)
        seg_end = m.cumsum(0)
        before = torch.cat([cs.new_zeros(1), cs[seg_end[:-1] - 1]])  # cumsum up to segment
        pos = cs - torch.repeat_interleave(before, m) + torch.repeat_interleave(last[idx], m)
        ok = pos < n
        locs.append(loc[ok])
        poss.append(pos[ok])
        tail = pos[seg_end - 1]  # last drawn position of every location
        more = tail < n
        last[idx[more]] = tail[more]
        idx = idx[more]
    return torch.cat(locs), torch.cat(poss)


def sample_sites(
    rates: torch.Tensor, n_samples: int, n_cols: int, generator: torch.Generator | None
) -> ErrorSites:
    """Draws which partial products are hit, exactly as independent Bernoulli trials.

    Every (member, row, K-block) location has ``n = n_samples * n_cols`` partial products,
    each hit with the location's rate. Locations expecting many hits get their positions
    from geometric gaps (:func:`_geometric_positions`); the others get a Binomial(n, rate)
    count and a uniform subset (:func:`_uniform_subsets`). Both are exact.

    Args:
        rates: ``(P, R, n_k)`` per-row rates.
        n_samples: Samples ``B``; ``n_cols``: output columns per sample ``C``.
    """
    P, R, n_k = rates.shape
    n = n_samples * n_cols
    flat = rates.reshape(-1)
    many = flat * n >= 8.0
    parts = []
    if bool(many.any()):
        sel = many.nonzero().squeeze(1)
        loc, pos = _geometric_positions(flat[sel], n, generator)
        parts.append((sel[loc], pos))
    if not bool(many.all()):
        sel = (~many).nonzero().squeeze(1)
        p = flat[sel]
        counts = torch.binomial(torch.full_like(p, float(n)), p, generator=generator).long()
        loc, pos = _uniform_subsets(counts, n, generator)
        parts.append((sel[loc], pos))
    loc = torch.cat([x[0] for x in parts])
    pos = torch.cat([x[1] for x in parts])
    p, rest = loc // (R * n_k), loc % (R * n_k)
    return ErrorSites(p=p, b=pos // n_cols, r=rest // n_k, k=rest % n_k, c=pos % n_cols)


def sites_from_mask(mask: torch.Tensor) -> ErrorSites:
    """Converts a dense hit mask ``(P, B, n_k, R, C)`` into :class:`ErrorSites`."""
    p, b, k, r, c = mask.nonzero(as_tuple=True)
    return ErrorSites(p=p, b=b, r=r, k=k, c=c)


def apply_sites(
    w: torch.Tensor,
    x: torch.Tensor,
    tiling: Tiling,
    sites: ErrorSites,
    error_model: ErrorModel,
    generator: torch.Generator | None,
    clean: torch.Tensor,
) -> torch.Tensor:
    """Adds ``corrupt(pp) - pp`` at ``sites`` to the clean product.

    Args:
        w: ``(R, K)``. x: ``(B, K, C)`` shared or ``(P, B, K, C)`` per member.
        clean: ``(P or 1, B, R, C)`` clean product (``w @ x``).

    Returns:
        ``(P, B, R, C)`` with ``P`` the population size of ``sites``' owner (``clean`` is
        expanded to it by the caller when needed).
    """
    wb, xb = _blocks(w, x, tiling)  # (R, n_k, bw), (..., B, n_k, bw, C)
    if xb.dim() == 4:
        xs = xb[sites.b, sites.k, :, sites.c]  # (E, bw)
    else:
        xs = xb[sites.p, sites.b, sites.k, :, sites.c]
    pp = (wb[sites.r, sites.k] * xs).sum(-1)  # (E,)
    delta = error_model.corrupt(pp, generator) - pp
    out = clean.clone()
    out.index_put_((sites.p, sites.b, sites.r, sites.c), delta, accumulate=True)
    return out


def dense_faulty_gemm(
    w: torch.Tensor,
    x: torch.Tensor,
    tiling: Tiling,
    mask: torch.Tensor,
    error_model: ErrorModel,
    generator: torch.Generator | None,
    u01: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sums all partial products after corrupting those selected by ``mask``.

    Args:
        mask: ``(P, B, n_k, R, C)`` bool.
        u01: Optional uniforms of ``mask``'s shape that supply the error model's randomness
            (:meth:`ErrorModel.corrupt_u`); otherwise it draws from ``generator``.

    Returns:
        ``(P, B, R, C)``.
    """
    pp = partial_products(w, x, tiling)  # (1 or P, B, n_k, R, C)
    if x.dim() == 3:
        pp = pp[None]
    pp = pp.expand(mask.shape)
    if u01 is not None:
        bad = error_model.corrupt_u(pp, u01)
    else:
        bad = error_model.corrupt(pp, generator)
    return torch.where(mask, bad, pp).sum(2)


def faulty_gemm(
    w: torch.Tensor,
    x: torch.Tensor,
    tiling: Tiling,
    rates: torch.Tensor,
    error_model: ErrorModel,
    generator: torch.Generator | None,
    mode: str = "auto",
) -> torch.Tensor:
    """``w @ x`` on the faulty accelerator for a population of rate maps.

    Args:
        w: ``(R, K)`` weights (already on x's device).
        x: ``(B, K, C)`` input shared by the population, or ``(P, B, K, C)``.
        tiling: The layer's tiling.
        rates: ``(P, R, n_k)`` rate of every (row, K-block) for each member.
        error_model: What a hit does.
        generator: Source of every random draw.
        mode: ``"auto"``, ``"dense"`` or ``"sparse"``.

    Returns:
        ``(P, B, R, C)``; without faults equal to ``w @ x`` up to float rounding.
    """
    P, R, n_k = rates.shape
    if w.shape != (tiling.rows, tiling.k) or x.shape[-2] != tiling.k:
        raise HaschedError(f"GEMM shapes {tuple(w.shape)} @ {tuple(x.shape)} do not match "
                           f"the tiling ({tiling.rows} x {tiling.k})")
    if x.dim() == 4 and x.shape[0] != P:
        raise HaschedError(f"per-member input has {x.shape[0]} members, rates have {P}")
    B, C = x.shape[-3], x.shape[-1]
    rates = rates.to(device=x.device, dtype=torch.float32)
    if choose_mode(rates, mode) == "sparse":
        clean = torch.matmul(w, x)  # (B or P, ..., R, C)
        clean = (clean[None] if x.dim() == 3 else clean).expand(P, B, R, C)
        sites = sample_sites(rates, B, C, generator)
        return apply_sites(w, x, tiling, sites, error_model, generator, clean)
    r = rates.transpose(1, 2)[:, None, :, :, None]  # (P, 1, n_k, R, 1)
    u = torch.rand((P, B, n_k, R, C), generator=generator, device=x.device)
    # Given a hit (u < rate), u / rate is uniform on [0, 1): it also picks the bit.
    u01 = (u / r.clamp(min=1e-30)).clamp_(max=1.0)
    return dense_faulty_gemm(w, x, tiling, u < r, error_model, generator, u01)
