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

from hasched.sim.gemm import element_deltas, permanent_hits, sample_hits
from hasched.sim.layers import FaultState, FaultyLayer

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
        self.first: FaultyLayer = self.mods[0]
        self.inputs = inputs
        # Clean activations after every module (views share storage where possible); the
        # sparse stage gathers from them, the dense stage starts from them.
        st = state
        st.faults_on = False  # the accelerator's fault-free activations (int8 included)
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
        st.faults_on = True
        self.later_faulty = any(isinstance(m, FaultyLayer) for m in self.mods[1:])
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
    def _first_layer(self, b0: int, nb: int) -> Sparse:
        """Changed outputs of the first faulty layer for images ``b0 .. b0+nb-1``.

        The hits are drawn (or, for a chip, enumerated) and recomputed by the one GEMM
        kernel (:func:`hasched.sim.gemm.element_deltas`) from the cached clean input.
        """
        lay = self.first
        fa = lay.faults
        out = self.acts[1]  # fault-free output of the faulty layer (with bias)
        per_img = out[0].numel() // lay.rows  # output columns per image
        xv = lay._input_view(self.inputs[b0:b0 + nb], 1)
        if fa.model.permanent:
            hits = permanent_hits(fa, 0, nb, per_img)
        else:
            hits = sample_hits(fa, nb, per_img, self.state.generator)
        res = element_deltas(fa, xv, hits, self.state.generator, per_img)
        pos = res.r * per_img + res.c
        clean = self.clean_at(1, res.b + b0, pos)
        val = lay._faulty_values(clean, res.delta, res.r, res.full)
        # Most hits on a zero partial product (image background) round away completely.
        return Sparse(res.p, res.b, pos, val).keep(val != clean)

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
        if isinstance(mod, FaultyLayer):
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
    def score(self, b0: int, nb: int, metric, labels: torch.Tensor, clean_pred: torch.Tensor,
              clean_score: torch.Tensor) -> torch.Tensor:
        """Summed metric per member for images ``b0 .. b0+nb-1``: ``float64 Tensor[P]``.

        Args:
            metric: ``(logits, labels, clean_pred) -> per-sample scores``.
            labels, clean_pred, clean_score: Per image (all images), the label, the
                fault-free prediction and the fault-free score.
        """
        self._nb = nb
        P = self.first.faults.population
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
        sl = slice(b0, b0 + nb)
        out = torch.full((P,), float(clean_score[sl].sum()), dtype=torch.float64,
                         device=labels.device)
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
        if self.later_faulty:
            return metric(x, labels[sl].repeat(P), clean_pred[sl].repeat(P)).reshape(P, nb).sum(1)
        rm, rb = rows // nb, rows % nb + b0
        gain = metric(x, labels[rb], clean_pred[rb]) - clean_score[rb]
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
        if isinstance(mod, nn.Linear) and not isinstance(mod, FaultyLayer):
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

