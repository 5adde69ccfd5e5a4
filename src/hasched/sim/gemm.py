"""The faulty GEMM: ``out[b, r, c] = sum_j W[r, j] X[b, j, c]`` with faults at PE sites.

The reduction is cut into *chains* by the mapping (:mod:`hasched.sim.mapping`). A fault hits
a chain's partial product (``output`` site), one of its products (``product``) or its
running sum (``accumulator``). Every hit chain's value is recomputed by **one kernel**,
:func:`chain_deltas`, from the layer's operands (:class:`~hasched.sim.arithmetic.LayerArith`):
the sparse path, the permanent-fault path and the incremental engine all call it; the dense
path computes all chains at once by a GEMM and corrupts them with the same fault model.

**Output semantics.** An output element none of whose chains was hit keeps the layer's
fault-free value exactly (for fp32 the layer's own PyTorch result). A hit element becomes
``clean + sum over its hit chains of (faulty chain value - clean chain value)``, accumulated
in float64 (exact for integer arithmetic) and rounded once: this avoids the cancellation of
``clean + (corrupt(pp) - pp)`` in float32 (a bitflip of 1.0 at bit 28 gives 2^-32, not 0),
and dense and sparse agree bit for bit on the same hits.

**Randomness.** Transient hits are independent Bernoulli trials with the PE's rate, drawn
exactly: the dense path compares one uniform per partial product with its rate (float64
uniforms when a rate is below 2^-14, so no rate is rounded by more than 2^-10 relative; the
same uniform, rescaled, picks the bit); the sparse path draws hit positions directly
(geometric gaps or binomial counts). Permanent faults hit every value a faulty PE computes.

All functions take a leading population dimension ``P`` (schedules x repeats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hasched.errors import HaschedError
from hasched.sim.arithmetic import LayerArith
from hasched.sim.costs import sparse_is_cheaper
from hasched.sim.faults import FaultModel
from hasched.sim.mapping import LayerPlan

__all__ = [
    "SAMPLER_VERSION",
    "Hits",
    "LayerFaults",
    "SparseOut",
    "DenseOut",
    "choose_mode",
    "sample_hits",
    "chain_deltas",
    "element_deltas",
    "faulty_gemm",
]

# Bumped whenever the same seed would draw different error instances; stores that resume
# runs (sensitivity campaigns) record it so that they never mix draws of two versions.
SAMPLER_VERSION = 3  # 3: path choice by the cost model, incremental chunks by memory

# Hits processed per kernel call (bounds the gathered (hits, chain) operands).
HIT_CHUNK = 1 << 20
# Below this rate float32 uniforms would round the rate by more than 2^-10 relative.
_FLOAT64_UNIFORMS_BELOW = 2.0**-14


@dataclass(frozen=True)
class Hits:
    """Hit sites, one entry per hit (all ``LongTensor[E]``).

    Attributes:
        p: Member. b: Sample. r: Weight row. c: Output column. k: Chain. q: Position in the
        chain (0 for ``output`` sites). pe: Flat PE index, or ``None`` when the fault model
        does not need it.
    """

    p: torch.Tensor
    b: torch.Tensor
    r: torch.Tensor
    c: torch.Tensor
    k: torch.Tensor
    q: torch.Tensor
    pe: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.p.numel())

    def select(self, idx: torch.Tensor | slice) -> Hits:
        return Hits(*(t[idx] for t in (self.p, self.b, self.r, self.c, self.k, self.q)),
                    None if self.pe is None else self.pe[idx])


@dataclass
class LayerFaults:
    """Everything the faulty GEMM of one layer needs, for one population.

    Attributes:
        plan: The layer's placement on the mapping.
        arith: Operands and product kernel.
        model: The fault model.
        site: Resolved fault site.
        rates: ``(P, R, n_c', L')`` hit probability of each row location (schedules applied;
            ``n_c'`` is 1 or ``n_chains``, ``L'`` is 1 or ``chain``; size-1 axes broadcast).
        pes: Like ``rates``, the flat PE index (only for models that use the PE).
        groups: Convolution groups (rows of group ``g`` read input group ``g``).
    """

    plan: LayerPlan
    arith: LayerArith
    model: FaultModel
    site: str
    rates: torch.Tensor
    pes: torch.Tensor | None
    groups: int = 1

    @property
    def population(self) -> int:
        return int(self.rates.shape[0])

    def expected_hits(self, n_samples: int, n_cols: int) -> float:
        """Mean number of hits for ``n_samples`` samples, all members."""
        reps = (self.plan.n_chains // self.rates.shape[2]) * (
            (self.plan.chain // self.rates.shape[3]) if self.site != "output" else 1)
        # float32, as always: chunk boundaries (hence the draws) depend on this number
        return float(self.rates.float().sum()) * reps * n_samples * n_cols


@dataclass
class SparseOut:
    """Changed output elements: member, sample, row, column and the float64 delta.

    Where ``full`` is set, every chain of the element was hit and ``delta`` holds the new
    accumulator value itself (the sum of its chains' faulty values), which is then exact.
    """

    p: torch.Tensor
    b: torch.Tensor
    r: torch.Tensor
    c: torch.Tensor
    delta: torch.Tensor
    full: torch.Tensor | None = None


@dataclass
class DenseOut:
    """Deltas of all elements ``(P, B, R, C)`` (float64) and which were hit (``full``: as
    in :class:`SparseOut`)."""

    delta: torch.Tensor
    hit: torch.Tensor
    full: torch.Tensor | None = None


def choose_mode(fa: LayerFaults, mode: str = "auto") -> str:
    """``dense``, ``sparse`` or ``permanent`` for this layer and population."""
    if mode not in ("auto", "dense", "sparse"):
        raise HaschedError(f"unknown injection mode {mode!r}; use auto, dense or sparse")
    if fa.model.permanent:
        return "permanent"
    if fa.site != "output":
        return "sparse"  # product/accumulator hits are always drawn as positions
    if mode != "auto":
        return mode
    # The cost model (hasched.sim.costs): a hit gathers its chain, a dense partial product
    # costs one uniform, one select and the fault model.
    return "sparse" if sparse_is_cheaper(float(fa.rates.mean()), fa.plan.chain) else "dense"


# ------------------------------------------------------------------------------ sampling

def _uniform_subsets(counts: torch.Tensor, n: int, generator: torch.Generator | None
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


def _geometric_positions(p: torch.Tensor, n: int, generator: torch.Generator | None,
                         slack: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
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
        lp = torch.log1p(-p[loc].double())
        gap = torch.where(lp == -torch.inf, torch.ones_like(u),  # rate 1: every trial
                          torch.floor(torch.log(u) / lp) + 1).long()  # >= 1
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


def _sample_trials(rates: torch.Tensor, n: int, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit trials of ``n`` Bernoulli(rate) trials at every location: ``(location, trial)``.

    Locations expecting many hits get their positions from geometric gaps; the others get
    a Binomial(n, rate) count and a uniform subset. Both are exact.
    """
    flat = rates.reshape(-1)
    if not bool((flat > 0).any()):  # a fault-free layer (e.g. FR_max 0): nothing to draw
        empty = torch.zeros(0, dtype=torch.long, device=flat.device)
        return empty, empty.clone()
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
    return torch.cat([x[0] for x in parts]), torch.cat([x[1] for x in parts])


def _decode(fa: LayerFaults, loc: torch.Tensor, trial: torch.Tensor, n_samples: int,
            n_cols: int) -> Hits:
    """Location (member, row, chain', pos') and trial (rep, sample, column) -> hit sites."""
    P, R, nc_, L_ = fa.rates.shape
    plan = fa.plan
    rep_l = plan.chain // L_ if fa.site != "output" else 1  # positions covered per location
    p, rest = loc // (R * nc_ * L_), loc % (R * nc_ * L_)
    r, rest = rest // (nc_ * L_), rest % (nc_ * L_)
    k_, q_ = rest // L_, rest % L_
    rep, sc = trial // (n_samples * n_cols), trial % (n_samples * n_cols)
    k = k_ if nc_ > 1 or plan.n_chains == 1 else rep // rep_l
    q = q_ if L_ > 1 or rep_l == 1 else rep % rep_l
    if fa.site == "output":
        q = torch.zeros_like(k)
    pe = None if fa.pes is None else fa.pes[p, r, k_, q_]
    return Hits(p, sc // n_cols, r, sc % n_cols, k, q, pe)


def sample_hits(fa: LayerFaults, n_samples: int, n_cols: int,
                generator: torch.Generator | None) -> Hits:
    """Draws which sites are hit for ``n_samples`` samples of ``n_cols`` columns each.

    Every location of ``fa.rates`` covers ``n_samples * n_cols`` trials times the chains and
    positions its broadcast axes stand for; each trial is hit independently with the rate.
    """
    P, R, nc_, L_ = fa.rates.shape
    reps = (fa.plan.n_chains // nc_) * ((fa.plan.chain // L_) if fa.site != "output" else 1)
    # float32 rates, as the sampler has always drawn them (same seed, same hits)
    loc, trial = _sample_trials(fa.rates.float(), n_samples * n_cols * reps, generator)
    return _decode(fa, loc, trial, n_samples, n_cols)


def permanent_hits(fa: LayerFaults, b0: int, n_samples: int, n_cols: int) -> Hits:
    """Every value a faulty PE computes, for samples ``b0 .. b0 + n_samples - 1``."""
    P, R, nc_, L_ = fa.rates.shape
    reps = (fa.plan.n_chains // nc_) * ((fa.plan.chain // L_) if fa.site != "output" else 1)
    loc = (fa.rates.reshape(-1) > 0).nonzero().squeeze(1)  # (F,) faulty locations
    per = n_samples * n_cols * reps
    trial = torch.arange(per, device=loc.device)
    hits = _decode(fa, loc.repeat_interleave(per), trial.repeat(loc.numel()), n_samples,
                   n_cols)
    return Hits(hits.p, hits.b + b0, hits.r, hits.c, hits.k, hits.q, hits.pe)


# -------------------------------------------------------------------------- the kernel

def _chain_operands(fa: LayerFaults, xv, h: Hits) -> torch.Tensor:
    """Exact float64 products of every position of each hit's chain: ``(E, L)``."""
    plan, L = fa.plan, fa.plan.chain
    w = fa.arith.w_mapped.reshape(plan.rows, plan.n_chains, L)[h.r, h.k]  # (E, L)
    x = xv.gather(h, plan)  # (E, L), zero in the padding
    return fa.arith.products(w, x)


def _corrupt(fa: LayerFaults, v: torch.Tensor, site: str, pe, generator) -> torch.Tensor:
    word = fa.arith.word(site)
    if word.kind == "float32":
        return fa.model.corrupt(v.float(), word, pe, None, generator).double()
    return fa.model.corrupt(v, word, pe, None, generator)


def chain_deltas(fa: LayerFaults, xv, h: Hits, generator: torch.Generator | None
                 ) -> tuple[Hits, torch.Tensor]:
    """The one kernel: faulty minus clean value of every hit chain (float64).

    Args:
        fa: The layer's faults. xv: The layer's input view (``gather``).
        h: Hits; several hits on one chain (product/accumulator sites) are combined.

    Returns:
        ``(chains, delta, new)``: one :class:`Hits` entry per distinct hit chain (its ``q``
        is meaningless), its value's change and its faulty value.
    """
    ar = fa.arith
    if len(h) == 0:
        z = torch.zeros(0, dtype=torch.float64, device=h.p.device)
        return h, z, z
    if fa.site == "output":  # one trial per chain: hits are distinct chains
        prods = _chain_operands(fa, xv, h)
        v = ar.chain_value(prods.sum(-1)).double()  # (E,)
        new = _corrupt(fa, v, "output", h.pe, generator)
        return h, new - v, new
    key = (((h.p * (h.b.max() + 1) + h.b) * fa.plan.rows + h.r) * (h.c.max() + 1) + h.c) \
        * fa.plan.n_chains + h.k
    uk, inv = torch.unique(key, return_inverse=True)  # chains, sorted
    first = torch.full(uk.shape, len(h), dtype=torch.long, device=key.device).scatter_reduce_(
        0, inv, torch.arange(len(h), device=key.device), reduce="amin")
    ch = h.select(first)  # one representative hit per chain
    prods = _chain_operands(fa, xv, ch)  # (U, L)
    s = prods.sum(-1)
    v = ar.chain_value(s).double()
    hit_p = prods[inv, h.q]  # (E,) the hit products
    if fa.site == "product":  # the chain changes by its products' changes, exactly
        bad = _corrupt(fa, hit_p, "product", h.pe, generator)
        d = torch.zeros_like(s).index_add_(0, inv, bad - hit_p)
        return ch, d, v + d
    new = _accumulate(fa, prods, inv, h, generator)
    return ch, new - v, new


def _accumulate(fa: LayerFaults, prods: torch.Tensor, inv: torch.Tensor, h: Hits,
                generator) -> torch.Tensor:
    """Runs each hit chain's accumulator left to right, corrupting it where it was hit.

    The running sum is exact (float64) and rounded to the word (float32 for fp32) where a
    fault reads it; the chain's value is the final sum, rounded likewise.
    """
    ar = fa.arith
    acc = torch.zeros(prods.shape[0], dtype=torch.float64, device=prods.device)
    for i in range(prods.shape[1]):
        acc = acc + prods[:, i]
        at = h.q == i
        if bool(at.any()):
            rows = inv[at]
            pe = None if h.pe is None else h.pe[at]
            acc[rows] = _corrupt(fa, ar.chain_value(acc[rows]).double(), "accumulator", pe,
                                 generator)
    return ar.chain_value(acc).double()


def element_deltas(fa: LayerFaults, xv, h: Hits, generator: torch.Generator | None,
                   n_cols: int) -> SparseOut:
    """Sums chain deltas per output element (member, sample, row, column).

    With float arithmetic, an element all of whose chains were hit gets its new value as
    the sum of the faulty chain values (``full``), exactly as the dense path computes it.
    """
    outs: list[tuple] = []
    for i in range(0, len(h), HIT_CHUNK):
        ch, d, new = chain_deltas(fa, xv, h.select(slice(i, i + HIT_CHUNK)), generator)
        outs.append((ch.p, ch.b, ch.r, ch.c, d, new))
    if not outs:
        z = torch.zeros(0, dtype=torch.long, device=fa.rates.device)
        return SparseOut(z, z, z, z, torch.zeros(0, dtype=torch.float64, device=z.device))
    p, b, r, c, d, new = (torch.cat(t) for t in zip(*outs, strict=True))
    one_chain = fa.site == "output" and fa.plan.n_chains == 1
    if one_chain:  # a hit is its own element: no grouping needed
        full = None if fa.arith.is_int else torch.ones_like(d, dtype=torch.bool)
        return SparseOut(p, b, r, c, d if full is None else new, full)
    R = fa.plan.rows
    nb = int(b.max()) + 1 if b.numel() else 1
    key = ((p * nb + b) * R + r) * n_cols + c
    uk, inv = torch.unique(key, return_inverse=True)
    zeros = torch.zeros(uk.shape, dtype=torch.float64, device=d.device)
    delta = zeros.clone().index_add_(0, inv, d)
    full = None
    if fa.site == "output" and not fa.arith.is_int:
        count = torch.bincount(inv, minlength=uk.numel())
        full = count == fa.plan.n_chains
        delta = torch.where(full, zeros.index_add_(0, inv, new), delta)
    c_, rest = uk % n_cols, uk // n_cols
    r_, rest = rest % R, rest // R
    return SparseOut(rest // nb, rest % nb, r_, c_, delta, full)


# ---------------------------------------------------------------------------- the paths

def _dense_uniforms(fa: LayerFaults, n_samples: int, n_cols: int, device,
                    generator, samples_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit mask and bit-choice uniforms, ``(P, B, n_k, R, C)`` each (output sites).

    ``samples_last`` draws them in ``(P, 1, n_k, R, B)`` order (one column per sample,
    the layout of a dense layer) so that a seed keeps drawing the same instances.
    """
    P, R, n_k = fa.rates.shape[:3]
    pos = fa.rates[fa.rates > 0]
    dtype = torch.float64 if pos.numel() and float(pos.min()) < _FLOAT64_UNIFORMS_BELOW \
        else torch.float32
    r = fa.rates[..., 0].to(device=device, dtype=dtype).transpose(1, 2)[:, None, :, :, None]
    if samples_last and n_cols == 1:
        u = torch.rand((P, 1, n_k, R, n_samples), generator=generator, device=device,
                       dtype=dtype).permute(0, 4, 2, 3, 1)
    else:
        u = torch.rand((P, n_samples, n_k, R, n_cols), generator=generator, device=device,
                       dtype=dtype)
    # Given a hit (u < rate), u / rate is uniform on [0, 1): it also picks the bit.
    return u < r, (u / r.clamp(min=1e-300)).clamp_(max=1.0).float()


def dense_deltas(fa: LayerFaults, xv, generator: torch.Generator | None) -> DenseOut:
    """All partial products by GEMM, a Bernoulli mask, the fault model: ``(P, B, R, C)``."""
    P = fa.population
    xb = xv.blocks(fa.plan)  # (N, G, n_c, L, C)
    N, G, n_c, L, C = xb.shape
    B = N // P if xv.per_member else N
    wb = fa.arith.w_mapped.reshape(G, -1, n_c, L).transpose(1, 2)  # (G, n_c, R/G, L)
    v = fa.arith.block_values(wb, xb)  # (N, G, n_c, R/G, C)
    v = v.permute(0, 2, 1, 3, 4).reshape(N // B, B, n_c, fa.plan.rows, C)  # (1|P, B, n_c, R, C)
    hit, u01 = _dense_uniforms(fa, B, C, xb.device, generator,
                               getattr(xv, "samples_last", False))
    word = fa.arith.word("output")
    vw = v.float() if word.kind == "float32" else v
    delta = fa.model.corrupt(vw.expand(hit.shape), word, None, u01, generator).double()
    full = None
    if word.kind == "float32":  # elements with every chain hit: the sum of the new values
        full = hit.all(2)
        if bool(full.any()):
            new = delta.sum(2)
    delta -= vw
    delta.masked_fill_(~hit, 0.0)
    out = delta.sum(2)  # (P, B, R, C)
    if full is not None and bool(full.any()):
        out = torch.where(full, new, out)
    return DenseOut(out, hit.any(2), full)


def faulty_gemm(fa: LayerFaults, xv, generator: torch.Generator | None, mode: str = "auto"
                ) -> SparseOut | DenseOut:
    """The changes that faults make to one layer's output, for the whole population.

    Args:
        fa: The layer's faults (rates per member already schedule-permuted).
        xv: The layer's input view: ``n_samples``, ``n_cols``, ``per_member``, ``gather``,
            ``blocks``.
        generator: Source of every random draw.
        mode: ``auto``, ``dense`` or ``sparse`` (permanent faults ignore it).

    Returns:
        :class:`SparseOut` (changed elements) or :class:`DenseOut`.
    """
    path = choose_mode(fa, mode)
    B, C = xv.n_samples, xv.n_cols
    if path == "dense":
        return dense_deltas(fa, xv, generator)
    if path == "permanent":
        return _permanent(fa, xv, generator)
    return element_deltas(fa, xv, sample_hits(fa, B, C, generator), generator, C)


def _permanent(fa: LayerFaults, xv, generator) -> DenseOut:
    from hasched.sim.permanent import permanent_deltas

    return permanent_deltas(fa, xv, generator)
