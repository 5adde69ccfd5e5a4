"""Tests for hasched.study.export: schedules folded into plain weights."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.sim.evaluator import FaultyEvaluator
from hasched.sim.faults import create_fault
from hasched.sim.profile import FaultProfile
from hasched.study.build import save_schedule
from hasched.study.export import export_schedule, fold_schedule, load_exported
from hasched.zoo.models import create_model, init_weights
from tiny_store import make_store


def _model(name: str, seed: int = 0) -> nn.Module:
    m = create_model(name)
    init_weights(m, "he_uniform", torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases, so a bias that is not permuted would show
        for mod in m.modules():
            if isinstance(mod, nn.Linear | nn.Conv2d):
                mod.bias.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return m.eval()


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,layers,shape", [
    ("mnist32-cnn", ["c0", "h2"], (1, 32, 32)),      # conv -> relu/pool/flatten -> dense
    ("fashion-cnn", ["c0", "c1", "h0"], (1, 28, 28)),  # conv -> conv, through dropout
])
def test_folded_model_computes_the_original_function(name, layers, shape):
    model = _model(name)
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(1))
    rows = {n: m.weight.shape[0] for n, m in model.named_modules() if n in layers}
    perms = {n: _perm(r, i) for i, (n, r) in enumerate(rows.items())}
    folded, consumers = fold_schedule(model, perms, x[:1])
    with torch.no_grad():
        a, b = model(x), folded(x)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), float((a - b).abs().max())
    # Row s of the exported layer is the row the schedule put on slot s (bias too); a
    # scheduled layer that also consumes a scheduled one has its columns moved as well.
    for n, p in perms.items():
        orig, new = model.get_submodule(n), folded.get_submodule(n)
        want = orig.weight[p]
        if n == "c1":
            want = want[:, perms["c0"]]
        assert torch.equal(new.bias, orig.bias[p])
        assert torch.equal(new.weight, want) or n == "h0"  # h0's columns: 49-wide blocks
    assert consumers == {"mnist32-cnn": {"c0": "h0", "h2": "op"},
                         "fashion-cnn": {"c0": "c1", "c1": "h0", "h0": "op"}}[name]
    # The original is untouched, and a schedule that moves nothing changes nothing.
    assert not torch.equal(model.get_submodule(layers[0]).weight,
                           folded.get_submodule(layers[0]).weight)
    same, _ = fold_schedule(model, {layers[0]: torch.arange(rows[layers[0]])}, x[:1])
    assert all(torch.equal(p, q) for p, q in zip(same.parameters(), model.parameters(),
                                                 strict=True))


def test_flatten_columns_move_in_channel_blocks():
    # 2 channels of 2x1 pixels flattened: channel c owns columns 2c, 2c+1.
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 2, 1)), ("flat", nn.Flatten()),
                                       ("fc", nn.Linear(4, 1, bias=False))]))
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    folded, _ = fold_schedule(model, {"conv": torch.tensor([1, 0])}, torch.zeros(1, 1, 2, 1))
    assert folded.fc.weight.tolist() == [[3.0, 4.0, 1.0, 2.0]]


def test_batch_norm_is_permuted_with_its_channels():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    with torch.no_grad():
        bn = model[1]
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
        bn.running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(3))
    model.eval()
    x = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    folded, consumers = fold_schedule(model, {"0": torch.tensor([2, 0, 3, 1])})
    assert consumers == {"0": "3"}
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-6)


@pytest.mark.parametrize("model,layer,needle", [
    (nn.Sequential(nn.Linear(4, 3), nn.ReLU()), "0", "model's outputs"),
    (nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1), nn.Linear(3, 2)), "0", "per channel"),
    (nn.Sequential(nn.Conv2d(1, 3, 1), nn.Flatten(), nn.Linear(12, 2)), "0", "example input"),
    (nn.Sequential(nn.Linear(4, 3)), "1", "not a Linear/Conv2d"),
])
def test_unfoldable_schedules_are_clear_errors(model, layer, needle):
    with pytest.raises(HaschedError, match=needle):
        fold_schedule(model, {layer: torch.tensor([2, 0, 1])})


def test_non_permutation_and_non_sequential_parent_are_refused():
    with pytest.raises(HaschedError, match="permutation"):
        fold_schedule(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1)), {"0": [0, 0, 1]})

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 1)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(HaschedError, match="Sequential"):
        fold_schedule(Branchy(), {"a": [2, 0, 1]})


def _evaluator(model, images, layer, rate):
    with torch.no_grad():
        labels = model(images).argmax(1)  # clean accuracy 1: every error that flips shows
    return FaultyEvaluator(model, images, labels, [layer], create_fault("flip-to-1"),
                           FaultProfile.generate(rate, 3))


def _small_cnn() -> nn.Module:
    model = nn.Sequential(OrderedDict([
        ("c", nn.Conv2d(1, 8, 3)), ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ("flat", nn.Flatten()), ("fc", nn.Linear(8 * 7 * 7, 10))])).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in model.parameters():
            t.uniform_(-0.3, 0.3, generator=g)
    return model


def test_exported_model_on_identity_has_the_scheduled_fault_statistics():
    model = _small_cnn()
    images = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    folded, _ = fold_schedule(model, {"c": perm}, images[:1])
    ev_s, ev_e = _evaluator(model, images, "c", 0.03), _evaluator(folded, images, "c", 0.03)
    assert ev_s.clean_accuracy == ev_e.clean_accuracy == 1.0
    # Exactly: every weight row meets the same weights and the same fault rates.
    ev_s.state.configure({"c": perm[None]})
    ev_e.state.configure(None)
    rs = ev_s.state.layers["c"].faults.rates[0]  # (8, n_chains, 1)
    re_ = ev_e.state.layers["c"].faults.rates[0]
    assert torch.equal(re_, rs[perm]) and torch.equal(folded.c.weight, model.c.weight[perm])
    # In distribution: accuracy over 200 error instances each agrees within 4 standard
    # errors (the fault process of a row depends only on its weights, inputs and rates).
    a = ev_s.accuracy({"c": perm[None]}, 200, torch.Generator().manual_seed(8))[0]
    b = ev_e.accuracy(None, 200, torch.Generator().manual_seed(9))[0]
    assert a.mean() < 0.97 and abs(float(a.mean() - b.mean())) < 4 * math.sqrt(
        a.var() / 200 + b.var() / 200)
    # Folding in a different schedule gives different statistics (the test can fail).
    other, _ = fold_schedule(model, {"c": perm.flip(0)}, images[:1])
    c = _evaluator(other, images, "c", 0.03).accuracy(None, 200,
                                                      torch.Generator().manual_seed(9))[0]
    assert abs(float(a.mean() - c.mean())) > 4 * math.sqrt(a.var() / 200 + c.var() / 200)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    yield make_store(tmp_path_factory.mktemp("exp"), mp)
    mp.undo()


def test_export_schedule_writes_a_loadable_model(store, tmp_path):
    _, models = store
    perm = _perm(32, 11)
    save_schedule(tmp_path / "s.json", {"c0": perm}, model="mnist32-cnn", seed=1,
                  layers=["c0"])
    rep = export_schedule(tmp_path / "s.json", tmp_path / "m.safetensors", models_dir=models)
    assert rep["folded"] == {"c0": "h0"} and rep["max_output_difference"] < 1e-4
    assert rep["faulty_consumers"] == []
    model, meta = load_exported(tmp_path / "m.safetensors")
    assert meta["model"] == "mnist32-cnn" and meta["folded"] == {"c0": "h0"}
    from hasched.zoo.train import load_checkpoint

    orig, _ = load_checkpoint("mnist32-cnn", 1, models)
    assert torch.equal(model.c0.weight, orig.c0.weight[perm])
    before = (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(HaschedError, match="exists"):
        export_schedule(tmp_path / "s.json", tmp_path / "m.safetensors", models_dir=models)
    assert (tmp_path / "m.safetensors").read_bytes() == before
    (tmp_path / "op.json").write_text(json.dumps({"model": "mnist32-cnn", "seed": 1,
                                                  "permutations": {"op": list(range(10))}}))
    with pytest.raises(HaschedError, match="model's outputs"):
        export_schedule(tmp_path / "op.json", tmp_path / "op.safetensors", models_dir=models)
    assert not (tmp_path / "op.safetensors").exists()
