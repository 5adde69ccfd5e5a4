"""Delta evaluation of any traceable model: the clean part once, the faulty part per member.

:mod:`hasched.sim.incremental` keeps changes sparse through an ``nn.Sequential``. Residual
networks, concatenations and custom ``forward`` methods need a graph: torch.fx traces the
model with every faulty layer as a leaf, and the nodes split into

* the **clean part**: every node that does not depend on a faulty layer (the stem, earlier
  blocks, skip connections that branch off before the faulty layer). It runs once per
  image, never per population member, and its outputs that the faulty part reads (the
  *frontier*) are cached for all images when they fit the memory budget;
* the **faulty part**: every node downstream of a faulty layer, plus batch-size and shape
  arithmetic it reads (``x.size(0)`` must see the folded batch). It runs on population
  rows ``member * nb + image``; clean frontier values are gathered per row.

With one faulty layer, only the rows whose faulty-layer output actually changed go on;
the others keep their cached clean score (at sparse rates most rows, at dense rates few).

**Per-sample premise.** Every node of the faulty part must treat batch rows independently
(eval-mode BatchNorm does; batch statistics or ``x.mean(0)`` do not). A self-check at
construction runs the split graph on reordered rows without faults and compares with the
plain model; where it differs, or where torch.fx cannot trace the model (data-dependent
control flow), :class:`GraphUnsupported` says why and the evaluator falls back to the
expanded-batch path (and reports the reason in ``--json``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from hasched.sim.layers import FaultState, FaultyLayer

__all__ = ["GraphEngine", "GraphUnsupported"]


class GraphUnsupported(Exception):
    """The model cannot run on the graph path; the message says why (for ``--json``)."""


class _LeafTracer(fx.Tracer):
    """Standard leaves plus every faulty layer (its GEMM is the simulator's, not fx's)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, FaultyLayer) or super().is_leaf_module(m, qualname)


def _reach(nodes: list[fx.Node], roots: set[fx.Node]) -> set[fx.Node]:
    """``roots`` and every node that reads one of them (directly or not)."""
    out = set(roots)
    for n in nodes:  # topological order
        if n not in out and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class GraphEngine:
    """The split execution of one faulty model (see the module docstring).

    Args:
        model: The faulty model (faulty layers already swapped in), in eval mode.
        state: The faulty layers' shared state.
        sample: ``(n, ...)`` clean inputs (n >= 3) for the type probe and the self-check.
        cache_bytes: Cache the frontier for all images when it needs at most this much.
    """

    def __init__(self, model: nn.Module, state: FaultState, sample: torch.Tensor,
                 cache_bytes: int = 512 * 2**20) -> None:
        self.state = state
        self.cache_bytes = cache_bytes
        try:
            graph = _LeafTracer().trace(model)
        except Exception as err:  # fx raises TraceError, TypeError, ... on dynamic control flow
            raise GraphUnsupported(f"torch.fx cannot trace {type(model).__name__} "
                                   f"({_first_line(err)})") from None
        self.gm = fx.GraphModule(model, graph)  # shares modules and parameters
        self.modules = dict(self.gm.named_modules())
        self._split(list(graph.nodes), sample)
        self._cache: dict[fx.Node, Any] | None = None
        self._cached_n = 0
        self._self_check(sample)

    # ------------------------------------------------------------------------ set-up
    def _split(self, nodes: list[fx.Node], sample: torch.Tensor) -> None:
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise GraphUnsupported(f"the graph path needs a model with one input, not "
                                   f"{len(inputs)}")
        self.input = inputs[0]
        self.output = next(n for n in nodes if n.op == "output")
        faulty = {n for n in nodes if n.op == "call_module"
                  and isinstance(self.modules[n.target], FaultyLayer)}
        batched = _reach(nodes, {self.input})
        suffix = _reach(nodes, faulty)
        if self.output not in suffix:
            raise GraphUnsupported("the model's output does not depend on a faulty layer")
        is_tensor = self._probe(nodes, sample)
        # Batch-derived non-tensors (sizes, shapes, tuples) that the faulty part reads are
        # recomputed there, from folded inputs.
        stack = list(suffix)
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in suffix and a in batched and not is_tensor.get(a, False):
                    suffix.add(a)
                    stack.append(a)
        self.prefix = [n for n in nodes if n not in suffix]
        self._last_use = {a: n for n in self.prefix for a in n.all_input_nodes}
        self.frontier = [n for n in self.prefix if any(u in suffix for u in n.users)]
        self.batched = {n for n in self.frontier if n in batched}
        # Faulty layers fed by the clean part alone take the plain batch and fold it.
        self.roots = [n for n in nodes if n in faulty
                      and not any(a in suffix for a in n.all_input_nodes)]
        self.rest = [n for n in nodes if n in suffix and n not in self.roots
                     and n is not self.output]
        self.single = len(faulty) == 1
        self.frontier_bytes = sum(int(v[0].numel()) * v.element_size()
                                  for n, v in self._probe_values.items() if n in self.batched)
        del self._probe_values

    @torch.no_grad()
    def _probe(self, nodes: list[fx.Node], sample: torch.Tensor) -> dict[fx.Node, bool]:
        """Runs the graph once without faults: which values are tensors (per node)."""
        st = self.state
        st.faults_on, st.expanded = False, False
        env: dict[fx.Node, Any] = {self.input: sample}
        try:
            for n in nodes:
                if n.op not in ("placeholder", "output"):
                    env[n] = self._exec(n, env)
        except Exception as err:
            raise GraphUnsupported(f"the traced graph does not run ({_first_line(err)})"
                                   ) from None
        finally:
            st.faults_on = True
        self._probe_values = {n: v for n, v in env.items() if isinstance(v, torch.Tensor)}
        return {n: isinstance(v, torch.Tensor) for n, v in env.items()}

    def _exec(self, n: fx.Node, env: dict[fx.Node, Any],
              fetch: Callable[[fx.Node], Any] | None = None) -> Any:
        get = fetch or env.__getitem__
        args = fx.node.map_arg(n.args, get)
        kwargs = fx.node.map_arg(n.kwargs, get)
        if n.op == "call_module":
            return self.modules[n.target](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "get_attr":
            return operator.attrgetter(n.target)(self.gm)
        raise GraphUnsupported(f"unexpected graph node {n.op}")

    @torch.no_grad()
    def _self_check(self, sample: torch.Tensor) -> None:
        """Fault-free split run on reordered rows == the plain model (per-sample premise)."""
        st = self.state
        st.faults_on, st.expanded = False, False
        try:
            want = self.gm(sample)
            front = self._frontier(sample)
            nb = sample.shape[0]
            # Reversed and one image short: a row-mixing op (a mean over the batch) sees
            # a different batch than the plain model did.
            rows = torch.arange(nb - 1, 0, -1, device=sample.device)
            env = dict(front)
            for n in self.roots:
                env[n] = self._exec(n, env)[rows]
            got = self._run_rest(env, rows, clean=True)
        finally:
            st.faults_on = True
        if not (isinstance(got, torch.Tensor) and got.shape == want[rows].shape
                and torch.allclose(got, want[rows], rtol=1e-4, atol=1e-5)):
            raise GraphUnsupported("the layers after the faulty one do not treat images "
                                   "independently (batch statistics?)")

    # -------------------------------------------------------------------- execution
    def _frontier(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        """Clean-part values that the faulty part reads, for the images ``x``."""
        env: dict[fx.Node, Any] = {self.input: x}
        keep = set(self.frontier)
        for n in self.prefix:
            if n.op == "placeholder":
                continue
            env[n] = self._exec(n, env)
            for a in n.all_input_nodes:  # free what nothing downstream reads any more
                if self._last_use.get(a) is n and a not in keep:
                    del env[a]
        return {n: env[n] for n in keep}

    def frontier_for(self, inputs: torch.Tensor, b0: int, nb: int, batch: int
                     ) -> dict[fx.Node, Any]:
        """The frontier of images ``b0 .. b0+nb-1`` (cached for all when it fits)."""
        N = inputs.shape[0]
        if self._cache is None and self.frontier_bytes * N <= self.cache_bytes:
            st = self.state
            st.faults_on, st.expanded = False, False
            try:
                parts = [self._frontier(inputs[i:i + batch]) for i in range(0, N, batch)]
            finally:
                st.faults_on = True
            self._cache = {n: (torch.cat([p[n] for p in parts]) if n in self.batched
                               else parts[0][n]) for n in self.frontier}
        if self._cache is not None:
            return {n: (v[b0:b0 + nb] if n in self.batched else v)
                    for n, v in self._cache.items()}
        st = self.state
        st.faults_on, st.expanded = False, False
        try:
            return self._frontier(inputs[b0:b0 + nb])
        finally:
            st.faults_on = True

    def _run_rest(self, env: dict[fx.Node, Any], idx: torch.Tensor, clean: bool = False
                  ) -> Any:
        """Runs the faulty part after its roots; clean frontier values gathered at ``idx``."""
        folded: dict[fx.Node, Any] = {}

        def fetch(a: fx.Node) -> Any:
            if a in self.batched:
                if a not in folded:
                    folded[a] = env[a].index_select(0, idx)
                return folded[a]
            return env[a]

        st = self.state
        st.expanded = not clean
        for n in self.rest:
            env[n] = self._exec(n, env, fetch)
        return fx.node.map_arg(self.output.args[0], fetch)

    @torch.no_grad()
    def score(self, front: dict[fx.Node, Any], nb: int, metric, labels: torch.Tensor,
              clean_pred: torch.Tensor, clean_score: torch.Tensor) -> torch.Tensor:
        """Summed metric per member for one chunk of ``nb`` images: ``float64 Tensor[P]``.

        Args:
            front: :meth:`frontier_for` of the chunk.
            metric: ``(logits, labels, clean_pred) -> per-sample scores``.
            labels, clean_pred, clean_score: Of the chunk's images.
        """
        st = self.state
        P = st.population
        env = dict(front)
        st.expanded = False
        for n in self.roots:  # plain batch in, (P*nb, ...) out
            st.expanded = False
            env[n] = self._exec(n, env)
        if self.single:
            root = self.roots[0]
            out = env[root]
            st.faults_on = False
            try:
                clean = self._exec(root, env)
            finally:
                st.faults_on = True
            changed = (out.reshape(P, nb, -1) != clean.reshape(1, nb, -1)).any(-1)
            rows = changed.reshape(-1).nonzero().squeeze(1)  # (member * nb + image)
            base = torch.full((P,), float(clean_score.sum()), dtype=torch.float64,
                              device=labels.device)
            if rows.numel() == 0:
                return base
            env[root] = out.index_select(0, rows)
            img = rows % nb
            logits = self._run_rest(env, img)
            gain = metric(logits, labels[img], clean_pred[img]) - clean_score[img]
            return base.index_add_(0, rows // nb, gain.double())
        img = torch.arange(P * nb, device=labels.device) % nb
        logits = self._run_rest(env, img)
        return metric(logits, labels[img], clean_pred[img]).double().reshape(P, nb).sum(1)
