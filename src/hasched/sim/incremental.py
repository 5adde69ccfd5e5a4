"""Incremental (delta) evaluation: pay only for what the errors change.

At sparse rates a faulty layer's output differs from the clean one in a few dozen values
per image. This engine

1. samples the hit partial products of the *first* faulty layer directly
   (:func:`hasched.sim.gemm.sample_sites`) and recomputes only those, from the cached clean
   input of that layer;
2. carries the faulty activation as *clean + a sparse set of changed values* through
   elementwise activations, dropout/identity, flatten and non-overlapping max-pooling,
   recomputing only the affected elements/windows and dropping those that end up unchanged;
3. at the first linear layer (or any module it cannot keep sparse) turns the change into
   dense rows: ``clean_out[b] + W[:, changed] @ delta`` for the affected images only, and
   runs the rest of the network normally on those rows;
4. leaves every other image with its cached clean prediction.

It is exact up to float rounding: the same partial products are corrupted the same way as
on the dense path, only the arithmetic on unchanged values is skipped. Models must be
``nn.Sequential`` (as the registry's are); :class:`hasched.sim.evaluator.FaultyEvaluator` falls
back to the plain path otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hasched.sim.gemm import ErrorSites, sample_sites
from hasched.sim.layers import FaultState, FaultyLinear, _FaultyBase

__all__ = ["IncrementalEngine", "Sparse"]

# Modules that act elementwise in eval mode: a changed input changes only that output.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
                nn.Tanh, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Softplus, nn.Mish)


@dataclass
class Sparse:
    """Changed values of an activation: LongTensor m (member), b (image), pos (flat
    per-image index) and the new float values, all ``(E,)`` and unique in (m, b, pos)."""

    m: torch.Tensor
    b: torch.Tensor
    pos: torch.Tensor
    val: torch.Tensor

    def keep(self, mask: torch.Tensor) -> Sparse:
        return Sparse(self.m[mask], self.b[mask], self.pos[mask], self.val[mask])


class IncrementalEngine:
    """Delta evaluation of the faulty suffix of a sequential model.

    Args:
        suffix: The faulty model's modules from the first faulty layer on.
        inputs: ``(N, ...)`` clean input of the first faulty layer (all images).
        state: The faulty layers' shared state (rates per member are read from it).
    """

    def __init__(self, suffix: nn.Sequential, inputs: torch.Tensor, state: FaultState,
                 batch: int = 1024) -> None:
        self.mods = list(suffix)
        self.state = state
        self.first: _FaultyBase = self.mods[0]
        self.inputs = inputs
        # Clean activations after every module (views share storage where possible); the
        # sparse stage gathers from them, the dense stage starts from them.
        st = state
        st.enabled = False
        acts: list[torch.Tensor | None] = [inputs]
        self.acts = acts
        with torch.no_grad():
            for mod in self.mods:
                prev = acts[-1]
                if isinstance(mod, _ELEMENTWISE) and not isinstance(mod, nn.Identity):
                    acts.append(None)  # recomputed from its input on demand: saves memory
                    continue
                src = prev if prev is not None else self._materialize(len(acts) - 1)
                acts.append(torch.cat([mod(src[i:i + batch])
                                       for i in range(0, src.shape[0], batch)]))
        st.enabled = True
        self.later_faulty = any(isinstance(m, _FaultyBase) for m in self.mods[1:])
        # Floats per affected row once the change turns dense (bounds a chunk's memory).
        end = 1
        while end < len(self.mods) and self._sparse_supported(self.mods[end], end):
            end += 1
        if end < len(self.mods) and isinstance(self.mods[end], nn.Linear):
            end += 1
        self.dense_width = max([math.prod(self._shape(j)) for j in range(end, len(acts))]
                               + [1])

    def _materialize(self, level: int) -> torch.Tensor:
        return self.mods[level - 1](self.acts[level - 1]
                                    if self.acts[level - 1] is not None
                                    else self._materialize(level - 1))

    def clean_at(self, level: int, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Clean values of activation ``level`` (input of module ``level``) at (b, pos)."""
        act = self.acts[level]
        if act is None:  # output of an elementwise module: apply it to its input
            return self.mods[level - 1](self.clean_at(level - 1, b, pos))
        return act.reshape(act.shape[0], -1)[b, pos]

    # ----------------------------------------------------------------- first faulty layer
    def _gemm_columns(self, sites: ErrorSites, b0: int) -> torch.Tensor:
        """The ``block_width`` GEMM inputs of every hit partial product: ``(E, bw)``."""
        lay, t = self.first, self.first.tiling
        j = torch.arange(t.block_width, device=sites.k.device)
        kk = sites.k[:, None] * t.block_width + j  # (E, bw) index into K
        valid = kk < t.k
        kk = kk.clamp(max=t.k - 1)
        x = self.inputs
        b = (sites.b + b0)[:, None]
        if isinstance(lay, FaultyLinear):
            cols = x[b, kk]
        else:
            conv = lay.conv
            xp = lay._pad(x)
            (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
            ow = (xp.shape[-1] - dw * (kw - 1) - 1) // sw + 1
            ci, rem = kk // (kh * kw), kk % (kh * kw)
            i, jj = rem // kw, rem % kw
            oh_, ow_ = (sites.c // ow)[:, None], (sites.c % ow)[:, None]
            cols = xp[b, ci, oh_ * sh + i * dh, ow_ * sw + jj * dw]
        return torch.where(valid, cols, torch.zeros((), dtype=cols.dtype, device=cols.device))

    def _first_layer(self, b0: int, nb: int) -> Sparse:
        lay, t = self.first, self.first.tiling
        out = self.acts[1]  # clean output of the faulty layer (with bias)
        per_img = out[0].numel() // t.rows  # output columns per image
        sites = sample_sites(lay.rates, nb, per_img, self.state.generator)
        if t.n_k == 1:
            # One K-block: the partial product is the whole pre-bias output, already cached.
            flat = out.reshape(out.shape[0], t.rows, per_img)
            pp = flat[sites.b + b0, sites.r, sites.c]
            if lay.bias is not None:
                pp = pp - lay.bias[sites.r]
        else:
            w = lay.weight.reshape(t.rows, -1)
            wk = F.pad(w, (0, t.k_padded - t.k)).reshape(t.rows, t.n_k, t.block_width)
            pp = (wk[sites.r, sites.k] * self._gemm_columns(sites, b0)).sum(-1)  # (E,)
        delta = lay.error_model.corrupt(pp, self.state.generator) - pp
        pos = sites.r * per_img + sites.c
        if t.n_k > 1:
            # Hits in different K-blocks of one output element add up.
            key = (sites.p * nb + sites.b) * out[0].numel() + pos
            uk, inv = torch.unique(key, return_inverse=True)
            delta = torch.zeros(uk.shape, dtype=delta.dtype,
                                device=delta.device).index_add_(0, inv, delta)
            mb, pos = uk // out[0].numel(), uk % out[0].numel()
            m, b = mb // nb, mb % nb
        else:
            m, b = sites.p, sites.b
        clean = self.clean_at(1, b + b0, pos)
        val = clean + delta
        # Most hits on a zero partial product (image background) round away completely.
        return Sparse(m, b, pos, val).keep(val != clean)

    # ---------------------------------------------------------------------- sparse stage
    def _maxpool(self, mod: nn.MaxPool2d, level: int, s: Sparse, b0: int) -> Sparse:
        shape = self._shape(level)  # (C, H, W) of the pool's input
        C, H, W = shape
        k = mod.kernel_size if isinstance(mod.kernel_size, int) else mod.kernel_size[0]
        OH, OW = H // k, W // k
        c, hw = s.pos // (H * W), s.pos % (H * W)
        h, w = hw // W, hw % W
        inside = (h // k < OH) & (w // k < OW)  # rows/cols a floor-mode pool drops
        s, c, h, w = s.keep(inside), c[inside], h[inside], w[inside]
        wpos = c * OH * OW + (h // k) * OW + (w // k)
        key = (s.m * self._nb + s.b) * (C * OH * OW) + wpos
        uk, inv = torch.unique(key, return_inverse=True)
        mb, wp = uk // (C * OH * OW), uk % (C * OH * OW)
        um, ub = mb // self._nb, mb % self._nb
        wc, wr = wp // (OH * OW), wp % (OH * OW)
        oy, ox = wr // OW, wr % OW
        dy = torch.arange(k, device=uk.device).repeat_interleave(k)
        dx = torch.arange(k, device=uk.device).repeat(k)
        ipos = (wc[:, None] * H + oy[:, None] * k + dy) * W + ox[:, None] * k + dx  # (U, k*k)
        clean = self.clean_at(level, (ub + b0)[:, None].expand_as(ipos), ipos)
        vals = clean.clone()
        vals[inv, (h % k) * k + (w % k)] = s.val
        new, old = vals.amax(1), clean.amax(1)
        changed = new != old
        return Sparse(um[changed], ub[changed], wp[changed], new[changed])

    def _shape(self, level: int) -> tuple[int, ...]:
        act = self.acts[level]
        while act is None:
            level -= 1
            act = self.acts[level]
        return tuple(act.shape[1:])

    def _sparse_supported(self, mod: nn.Module, level: int) -> bool:
        if isinstance(mod, _FaultyBase):
            return False
        if isinstance(mod, _ELEMENTWISE):
            return True
        if isinstance(mod, nn.Flatten):
            return mod.start_dim == 1 and mod.end_dim == -1
        if isinstance(mod, nn.MaxPool2d):
            k, st = mod.kernel_size, mod.stride
            return (isinstance(k, int) and st == k and mod.padding == 0 and mod.dilation == 1
                    and not mod.ceil_mode and len(self._shape(level)) == 3)
        return False

    # ----------------------------------------------------------------------- the driver
    @torch.no_grad()
    def correct(self, b0: int, nb: int, labels: torch.Tensor, clean_ok: torch.Tensor
                ) -> torch.Tensor:
        """Correct predictions per member for images ``b0 .. b0+nb-1``: ``LongTensor[P]``."""
        self._nb = nb
        P = self.first.rates.shape[0]
        s = self._first_layer(b0, nb)
        level = 1
        while level < len(self.mods) and self._sparse_supported(self.mods[level], level):
            mod = self.mods[level]
            if isinstance(mod, nn.MaxPool2d):
                s = self._maxpool(mod, level, s, b0)
            elif isinstance(mod, _ELEMENTWISE):
                new = mod(s.val)
                s = Sparse(s.m, s.b, s.pos, new).keep(new != mod(self.clean_at(level, s.b + b0,
                                                                              s.pos)))
            level += 1  # Flatten keeps flat per-image positions as they are
        base = int(clean_ok[b0:b0 + nb].sum())
        out = torch.full((P,), base, dtype=torch.long, device=labels.device)
        if self.later_faulty:
            x = self._dense_all(level, s, b0, nb, P)
        else:
            rows = torch.unique(s.m * nb + s.b)  # affected (member, image) pairs
            if rows.numel() == 0:
                return out
            x, level = self._dense_rows(level, s, rows, b0, nb)
        st = self.state
        st.expanded = True
        for mod in self.mods[level:]:
            x = mod(x)
        pred = x.argmax(-1)
        if self.later_faulty:
            ok = (pred.reshape(P, nb) == labels[b0:b0 + nb]).long().sum(1)
            return ok
        rm, rb = rows // nb, rows % nb
        gain = (pred == labels[rb + b0]).long() - clean_ok[rb + b0].long()
        return out.index_add_(0, rm, gain)

    def _dense_rows(self, level: int, s: Sparse, rows: torch.Tensor, b0: int, nb: int
                    ) -> tuple[torch.Tensor, int]:
        """Faulty activation of the affected rows only, and the level it belongs to.

        At a clean linear layer the product is taken incrementally (its output level is
        returned); otherwise the changed values are written into clean rows at ``level``.
        """
        row_of = torch.searchsorted(rows, s.m * nb + s.b)
        rb = rows % nb + b0
        mod = self.mods[level] if level < len(self.mods) else None
        if isinstance(mod, nn.Linear) and not isinstance(mod, _FaultyBase):
            # clean_out + W[:, changed] @ delta, as one sparse x dense product.
            delta = s.val - self.clean_at(level, s.b + b0, s.pos)  # (E,)
            order = None
            if row_of.numel() > 1 and not bool((row_of[1:] >= row_of[:-1]).all()):
                order = torch.argsort(row_of, stable=True)
                row_of, delta, pos = row_of[order], delta[order], s.pos[order]
            else:
                pos = s.pos
            counts = torch.bincount(row_of, minlength=rows.numel())
            offsets = torch.cumsum(counts, 0) - counts
            # sum_j W[:, pos_j] * delta_j per row, without an (E, out) temporary.
            y = F.embedding_bag(pos, self._wt(mod), offsets, mode="sum",
                                per_sample_weights=delta)  # (rows, out)
            return self.acts[level + 1][rb] + y, level + 1
        x = self._full_act(level, rb).clone()
        x.reshape(x.shape[0], -1)[row_of, s.pos] = s.val
        return x, level

    def _dense_all(self, level: int, s: Sparse, b0: int, nb: int, P: int) -> torch.Tensor:
        """Activation ``level`` for every (member, image) in population-major order."""
        base = self._full_act(level, torch.arange(b0, b0 + nb, device=s.b.device))
        x = base.repeat(P, *([1] * (base.dim() - 1)))
        x.reshape(x.shape[0], -1)[s.m * nb + s.b, s.pos] = s.val
        return x

    def _wt(self, mod: nn.Linear) -> torch.Tensor:
        """``W.T`` as a contiguous ``(in, out)`` table, cached per layer."""
        cache = self.__dict__.setdefault("_wt_cache", {})
        if id(mod) not in cache:
            cache[id(mod)] = mod.weight.detach().t().contiguous()
        return cache[id(mod)]

    def _full_act(self, level: int, b: torch.Tensor) -> torch.Tensor:
        act = self.acts[level]
        if act is None:
            return self.mods[level - 1](self._full_act(level - 1, b))
        return act[b]

