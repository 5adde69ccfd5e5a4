"""The CUDA path (skipped without a CUDA device; ``pytest -m gpu`` runs only these).

Oracles are the CPU results where the simulation is deterministic (clean, permanent faults,
every partial product lost) and same-seed reruns where it draws errors.
"""

from __future__ import annotations

import pytest
import torch

from hasched.sim.arithmetic import Int8
from hasched.sim.evaluator import EvalConfig, FaultyEvaluator
from hasched.sim.faults import create_fault
from hasched.sim.mapping import GpuTiles, Systolic
from hasched.sim.profile import ChipMap, FaultProfile
from random_cnn import random_cnn
from test_any_model import resnetish

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def cnn():
    return random_cnn(256, flip_every=3)


def _ev(model, x, y, layers, device, **kw):
    return FaultyEvaluator(model, x.to(device), y.to(device), layers, **kw)


def test_tf32_is_off_once_an_evaluator_runs_on_cuda(cnn):
    m, x, y = cnn
    torch.backends.cuda.matmul.allow_tf32 = True
    _ev(m, x, y, ["c0"], "cuda", fault=create_fault("zero"),
        profile=FaultProfile.generate(0.0, 1))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_every_partial_product_lost_gives_the_cpu_numbers(cnn):
    m, x, y = cnn
    always = FaultProfile(rates=torch.ones(GpuTiles().pe_shape).numpy())
    got = {d: _ev(m, x, y, ["h2"], d, fault=create_fault("zero"), profile=always)
           .correct(repeats=2).cpu() for d in ("cpu", "cuda")}
    assert torch.equal(got["cpu"], got["cuda"])


def test_int8_stuck_at_chip_gives_the_cpu_numbers(cnn):
    m, x, y = cnn
    mapping = Systolic(16, 16)
    chip = ChipMap.sample(mapping.pe_shape, 0.05, 3, kind="stuck-at", bit=14, value=1)
    got = {}
    for d in ("cpu", "cuda"):
        ev = _ev(m, x, y, ["c0", "h0", "h1", "h2", "op"], d, chip=chip, mapping=mapping,
                 arithmetic=Int8(), calibration=x[:128].to(d))
        got[d] = (ev.clean_score.sum().item(), ev.correct(repeats=1).cpu())
    assert got["cpu"][0] == got["cuda"][0] and torch.equal(got["cpu"][1], got["cuda"][1])


@pytest.mark.parametrize("layers,fault,rate", [(["c0"], "flip-to-1", 5e-3),
                                               (["h0"], "bitflip", 2e-3),
                                               (["h2", "op"], "bf16", 0.5)])
def test_same_seed_same_result_on_cuda(cnn, layers, fault, rate):
    m, x, y = cnn
    ev = _ev(m, x, y, layers, "cuda", fault=create_fault(fault),
             profile=FaultProfile.generate(rate, 1))
    runs = [ev.correct(repeats=3, generator=torch.Generator("cuda").manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and (runs[0] < 256).any()


def test_graph_path_equals_expanded_path_on_cuda():
    m = resnetish().cuda()
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        y = m(x).argmax(-1)
    mp = GpuTiles(n_sms=4, pes_per_sm=8, block_height=8, dense_block_width=8)
    out = []
    for graph in (True, False):
        ev = FaultyEvaluator(m, x, y, ["2.conv1"], create_fault("bitflip"),
                             FaultProfile.generate(0.01, 2, mp.pe_shape), mapping=mp,
                             config=EvalConfig(graph=graph))
        out.append(ev.score_sum(None, 3, torch.Generator("cuda").manual_seed(1)))
    assert torch.equal(out[0], out[1])
