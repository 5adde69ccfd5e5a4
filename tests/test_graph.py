"""The torch.fx graph path: the clean part once, the faulty part per member.

Oracle: the expanded-batch path (the whole model on the folded population), which draws the
same errors for the same generator, so every score must agree exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hasched.sim.evaluator import EvalConfig, FaultyEvaluator
from hasched.sim.faults import create_fault
from hasched.sim.graph import GraphEngine, GraphUnsupported
from hasched.sim.layers import inject_faults
from hasched.sim.mapping import GpuTiles
from hasched.sim.profile import FaultProfile
from test_any_model import resnetish

MAP = GpuTiles(n_sms=4, pes_per_sm=8, block_height=8, dense_block_width=8)


def _ev(model, x, y, layers, rate, fault="bitflip", graph=True, memory_mb=512, **kw):
    return FaultyEvaluator(model, x, y, layers, create_fault(fault, **kw),
                           FaultProfile.generate(rate, 2, MAP.pe_shape), mapping=MAP,
                           config=EvalConfig(graph=graph, memory_mb=memory_mb))


def _both(model, layers, rate, n=30, fault="bitflip", perms=True, **kw):
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(-1)
    y = torch.where(torch.arange(n) % 4 == 0, (y + 1) % 5, y)
    out = []
    for graph in (True, False):
        ev = _ev(model, x, y, layers, rate, fault, graph, **kw)
        ps = None
        if perms:
            g = torch.Generator().manual_seed(5)
            ps = {layers[0]: torch.stack([torch.randperm(ev.rows[layers[0]], generator=g)
                                          for _ in range(3)])}
        out.append((ev, ev.score_sum(ps, 2, torch.Generator().manual_seed(7))))
    return out


@pytest.mark.parametrize("layers,rate", [
    (["2.conv1"], 0.002),  # one faulty layer inside a residual block: rows filtered
    (["2.conv1"], 0.2),  # dense rates: every row goes on
    (["2.conv1", "3.conv2"], 0.01),  # a later faulty layer sees the folded batch
    (["2.conv2", "3.conv1"], 0.05),
])
def test_graph_path_equals_the_expanded_path(layers, rate):
    (ev, got), (ref_ev, want) = _both(resnetish(), layers, rate)
    assert ev.last_path == "graph" and ref_ev.last_path == "dense-expanded"
    assert ev.fallback_reason == ""
    assert got.shape == (3, 2) and torch.equal(got, want)
    assert (got < ev.n_images).any()  # the faults did something


def test_unchanged_rows_keep_their_clean_score_without_running_the_suffix():
    """At a tiny rate few rows change; the others must not reach the layers after it."""
    m = resnetish()
    seen: list[int] = []
    m[6].register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[0]))
    (ev, got), (_, want) = _both(m, ["3.conv2"], 2e-4, perms=False)
    assert torch.equal(got, want)
    graph_rows = seen[-2]  # the graph call ran before the expanded one
    assert seen[-1] == 2 * 30  # expanded: every (member, image)
    assert graph_rows < 2 * 30


class ShapeArith(nn.Module):
    """Reads the batch size from a clean tensor after the faulty layer (x.size(0))."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = torch.relu(self.conv(h)) + h  # skip connection from the clean part
        return self.fc(y.view(h.size(0), -1))


class Branchy(nn.Module):
    """Two faulty layers on parallel branches, concatenated: two roots fold separately."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(6 * 64, 5)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), torch.tanh(self.b(x))], 1).flatten(1))


@pytest.mark.parametrize("model,layers", [(ShapeArith, ["conv"]), (Branchy, ["a", "b"])])
def test_custom_forwards_take_the_graph_path_exactly(model, layers):
    (ev, got), (_, want) = _both(model().eval(), layers, 0.01)
    assert ev.last_path == "graph" and torch.equal(got, want)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 64, 5)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:  # control flow on data: not traceable
            h = -h
        return self.fc(h.flatten(1))


class BatchMixing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 64, 5)

    def forward(self, x):
        h = self.conv(x)
        return self.fc((h - h.mean(0)).flatten(1))  # depends on the other images


@pytest.mark.parametrize("model,why", [(DataDependent, "torch.fx cannot trace"),
                                       (BatchMixing, "do not treat images independently")])
def test_untraceable_or_batch_mixing_models_fall_back_and_say_why(model, why):
    (ev, got), (_, want) = _both(model().eval(), ["conv"], 0.05, perms=False)
    assert ev.last_path == "dense-expanded" and why in ev.fallback_reason
    assert torch.equal(got, want)


def test_frontier_cache_and_per_chunk_recompute_agree():
    m = resnetish()
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    faulty, st = inject_faults(m, ["3.conv1"], MAP,
                               torch.full((MAP.n_pes,), 0.02, dtype=torch.float64),
                               create_fault("bitflip"))
    faulty.eval()
    cached = GraphEngine(faulty, st, x[:4])
    uncached = GraphEngine(faulty, st, x[:4], cache_bytes=0)
    assert cached.frontier_bytes == 4 * 8 * 8 * 4  # Block 3's input (the skip) only
    for b0, nb in ((0, 5), (5, 7)):
        a = {n.name: v for n, v in cached.frontier_for(x, b0, nb, batch=4).items()}
        b = {n.name: v for n, v in uncached.frontier_for(x, b0, nb, batch=4).items()}
        assert a.keys() == b.keys() and len(a) == 1
        assert all(torch.equal(a[k], b[k]) and a[k].shape[0] == nb for k in a)
    assert uncached._cache is None and cached._cache is not None


def test_graph_engine_refuses_a_model_without_the_faulty_layer_in_its_output():
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(64, 5)

        def forward(self, x):
            self.conv(x)
            return self.fc(x.flatten(1))

    faulty, st = inject_faults(Dead().eval(), ["conv"], MAP,
                               torch.zeros(MAP.n_pes, dtype=torch.float64),
                               create_fault("bitflip"))
    with pytest.raises(GraphUnsupported, match="does not depend on a faulty layer"):
        GraphEngine(faulty, st, torch.rand(2, 1, 8, 8))
