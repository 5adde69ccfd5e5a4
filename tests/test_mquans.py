"""Mquans: the greedy allocator by hand, criticality populations against a per-neuron loop,
same seed same result, and the three commands end to end on tiny synthetic data."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hasched.cli import main
from hasched.errors import HaschedError
from hasched.reuse.allocate import greedy_allocation, per_mac, rank_neurons, staircase_bits
from hasched.reuse.criticality import Perturbation, neuron_scores
from hasched.reuse.quant import calibrate
from hasched.zoo import data
from hasched.zoo.frames import load_frames
from hasched.zoo.train import save_checkpoint, train_model
from idx_files import write_learnable

# Exact binary fractions, so the hand-computed sums below are exact in float64.
CRIT = {"a": torch.tensor([0.125, 0.5, 0.25]), "b": torch.tensor([0.1875, 0.0625])}


def _true_drop(bits: dict[str, torch.Tensor]) -> float:
    """A stand-in for the calibration drop: each bit removed costs the neuron's criticality."""
    return float(sum((CRIT[k] * (8 - v)).sum() for k, v in bits.items()))


def test_greedy_allocation_by_hand():
    # Ranking: b1 .0625, a0 .125, b0 .1875, a2 .25, a1 .5 (sum 1.125).
    assert rank_neurons(CRIT) == [("b", 1), ("a", 0), ("b", 0), ("a", 2), ("a", 1)]
    res = greedy_allocation(CRIT, _true_drop, budget=1.0, bits_max=8, bits_min=2)
    # Level 7: all five cost 1.125 > 1; binary search: m=2 (.1875), 3 (.375), 4 (.625) -> 4.
    # Level 6: m=4 costs .625 + .625 > 1; m=2 (.8125), m=3 (1.0) -> 3.
    # Level 5: m=3 costs 1.375; m=1 costs 1.0625 -> nothing; stop.
    assert res.thresholds == {7: 4, 6: 3}
    assert res.bits["a"].tolist() == [6, 8, 7] and res.bits["b"].tolist() == [6, 6]
    assert res.drop == 1.0 and _true_drop(res.bits) == 1.0
    assert res.evaluations == 1 + (1 + 3) + (1 + 2) + (1 + 1)
    assert [t["m"] for t in res.trace] == [5, 2, 3, 4, 4, 2, 3, 3, 1]
    big = greedy_allocation(CRIT, _true_drop, budget=100.0, bits_max=8, bits_min=2)
    assert all((v == 2).all() for v in big.bits.values()) and big.evaluations == 7
    assert staircase_bits([("a", 1), ("a", 0)], {"a": 3}, {5: 2, 4: 1}, 8)["a"].tolist() == [
        5, 4, 8]
    with pytest.raises(HaschedError, match="budget"):
        greedy_allocation(CRIT, lambda b: 2.0, budget=1.0)


def test_per_mac_ranking_by_hand():
    keys = per_mac(CRIT, {"a": 4.0, "b": 0.5})
    # a: .03125 .125 .0625; b: .375 .125 -> a0, a2, then a1 and b1 tie (layer order), b0
    assert keys["a"].tolist() == [0.03125, 0.125, 0.0625] and keys["b"].tolist() == [
        0.375, 0.125]
    assert rank_neurons(keys) == [("a", 0), ("a", 2), ("a", 1), ("b", 1), ("b", 0)]
    with pytest.raises(HaschedError, match="feeds no MACs"):
        per_mac(CRIT, {"a": 4.0, "b": 0.0})


def _tiny(g: torch.Generator) -> nn.Module:
    net = nn.Sequential(OrderedDict([
        ("c0", nn.Conv2d(4, 4, 3, padding=1, groups=2)), ("r0", nn.ReLU()),
        ("flat", nn.Flatten()), ("h0", nn.Linear(4 * 5 * 5, 6)), ("r1", nn.ReLU()),
        ("op", nn.Linear(6, 3))])).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


def _loop_scores(net, layer, spec, x, y, neuron, pert) -> float:
    """Oracle: one neuron at a time, its input replaced by a pre-hook, the full model run."""
    mod = net.get_submodule(layer)
    axis = -1 if isinstance(mod, nn.Linear) else 1

    def pre(m, args):
        z = args[0].clone()
        idx = [slice(None)] * z.dim()
        idx[axis] = neuron
        z[tuple(idx)] = pert.apply(z[tuple(idx)], spec, None).to(z.dtype)
        return (z,)

    with torch.no_grad():
        ref = F.log_softmax(net(x), -1)
        h = mod.register_forward_pre_hook(pre)
        out = F.log_softmax(net(x), -1)
        h.remove()
    return float((ref.exp() * (ref - out)).sum(-1).mean())


@pytest.mark.parametrize("layer", ["c0", "h0", "op"])
def test_population_scores_equal_a_per_neuron_loop(layer):
    g = torch.Generator().manual_seed(0)
    net = _tiny(g)
    x = torch.rand(12, 4, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    spec = calibrate(net, [layer], x)[layer]
    pert = Perturbation("quant", bits=2)
    n = spec.neurons
    rows = neuron_scores(net, layer, spec, x, y, list(range(n)), pert, population=3)
    assert [r["neuron"] for r in rows] == list(range(n))
    want = [_loop_scores(net, layer, spec, x, y, k, pert) for k in range(n)]
    got = [r["criticality"] for r in rows]
    assert np.allclose(got, want, rtol=1e-9, atol=1e-15) and max(want) > 0


def test_nested_layer_expands_the_input():
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 5))
            self.op = nn.Linear(5, 2)

        def forward(self, x):
            return self.op(torch.relu(self.body(x)) + x)  # the skip needs the whole fold

    g = torch.Generator().manual_seed(1)
    net = Res().double().eval()
    x = torch.rand(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (7,), generator=g)
    spec = calibrate(net, ["body.0"], x)["body.0"]
    pert = Perturbation("quant", bits=1)
    rows = neuron_scores(net, "body.0", spec, x, y, list(range(5)), pert, population=2)
    want = [_loop_scores(net, "body.0", spec, x, y, k, pert) for k in range(5)]
    assert np.allclose([r["criticality"] for r in rows], want, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("pert", [Perturbation("noise", sigma=0.3),
                                  Perturbation("fault", fault="bitflip", rate=0.5)])
def test_same_seed_same_scores(pert):
    g = torch.Generator().manual_seed(2)
    net = _tiny(g).float()
    x = torch.rand(10, 4, 5, 5, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    spec = calibrate(net, ["h0"], x)["h0"]

    def run(seed):
        return neuron_scores(net, "h0", spec, x, y, list(range(100)), pert,
                             torch.Generator().manual_seed(seed), population=8)

    assert run(5) == run(5)
    assert run(5) != run(6)


# ----------------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(data_dir, models_dir): learnable synthetic MNIST and a 30-step mlp seed 1."""
    root = tmp_path_factory.mktemp("mq")
    write_learnable(root / "data", n_train=160, n_test=40)
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no dl")))
    model, meta = train_model("mlp", 1, data_dir=root / "data", max_steps=30, progress=False,
                              download=False)
    save_checkpoint(model, meta, root / "models")
    yield root
    mp.undo()


def cli(args, capsys, monkeypatch, root):
    monkeypatch.setenv("HASCHED_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("HASCHED_MODELS_DIR", str(root / "models"))
    monkeypatch.setattr(sys, "argv", ["hasched", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _ok(res):
    code, out, err = res
    assert code in (0, None), err
    return out


def _error(res, needle):
    code, _, err = res
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err
    assert lines[-1].startswith("hasched: error:") and needle in lines[-1], err


def test_commands_end_to_end(store, tmp_path, capsys, monkeypatch):
    def run(*a):
        return cli(a, capsys, monkeypatch, store)

    fr = tmp_path / "frames"
    _ok(run("frames", "--dataset", "mnist", "--sequences", "12", "--length", "5", "--motion",
            "1px", "--max-offset", "2", "--seed", "3", "--out", fr))
    _ok(run("frames", "--dataset", "mnist", "--sequences", "12", "--length", "5", "--motion",
            "1px", "--max-offset", "2", "--seed", "3", "--out", tmp_path / "again", "--no-gif"))
    assert (fr / "frames.hsf").read_bytes() == (tmp_path / "again" / "frames.hsf").read_bytes()
    assert (fr / "strip.png").is_file() and (fr / "preview.gif").is_file()
    crit = tmp_path / "crit"
    _ok(run("criticality", "--model", "mlp", "--out", crit, "--images", "16", "--layers",
            "h0,op", "--calibration-images", "32", "--cell-neurons", "300"))
    table = (crit / "criticality.csv").read_text().splitlines()
    assert len(table) == 1 + 784 + 128 and (crit / "criticality.png").is_file()
    out = tmp_path / "reuse"
    args = ("reuse", "--model", "mlp", "--frames", fr, "--criticality", crit, "--bits",
            "uniform:3-4,mquans", "--budget", "2", "--calib-sequences", "4", "--layers", "h0,op",
            "--calibration-images", "32", "--out", out)
    _ok(run(*args))
    summ = json.loads((out / "summary.json").read_text())
    rows = {r["setting"]: r for r in summ["rows"]}
    assert set(rows) == {"uniform-3", "uniform-4", "mquans-2"}
    for r in rows.values():
        assert r["mismatches"] == 0 and 0 <= r["reuse_rate"] <= 1
        assert r["macs_dense"] == 8 * 5 * (784 * 256 + 128 * 10)  # 8 streams x 5 frames
        assert r["speedup"] == pytest.approx(r["macs_dense"] / r["macs_done"])
    assert rows["mquans-2"]["calib_drop"] <= 2
    assert (out / "pareto.png").is_file() and (out / "allocations" / "mquans-2.json").is_file()
    before = (out / "results.csv").read_bytes()
    _ok(run(*args))  # finished: resumed from the part files, same table
    assert (out / "results.csv").read_bytes() == before
    _error(run(*args[:-2], "--refresh", "2", "--out", out), "other settings")

    # source images from a range of the split: indices stay the split's
    part = tmp_path / "part"
    _ok(run("frames", "--dataset", "mnist", "--images", "25:", "--sequences", "15", "--length",
            "2", "--out", part, "--no-gif"))
    src = load_frames(part).source_index
    assert sorted(src.tolist()) == list(range(25, 40))  # all 15 of test images 25..39
    _error(run("frames", "--dataset", "mnist", "--images", "30:50", "--out", tmp_path / "p2"),
           "outside")
    # --exclude: the other set's sources are never drawn (25 left: all of them, in order)
    rest = tmp_path / "rest"
    _ok(run("frames", "--dataset", "mnist", "--exclude", part, "--sequences", "25", "--length",
            "1", "--seed", "9", "--out", rest, "--no-gif"))
    assert load_frames(rest).source_index.tolist() == list(range(25))
    _error(run("frames", "--dataset", "mnist", "--exclude", part, "--sequences", "26", "--out",
               tmp_path / "p2"), "distinct source images")
    _error(run("frames", "--dataset", "mnist", "--split", "train", "--exclude", part, "--out",
               tmp_path / "p2"), "not mnist train")
    assert not (tmp_path / "p2").exists()
    # independent calibration frames: every sequence is then evaluated
    cal = tmp_path / "cal"
    _ok(run("frames", "--dataset", "mnist", "--split", "train", "--sequences", "30",
            "--length", "1", "--max-offset", "2", "--seed", "4", "--out", cal, "--no-gif"))
    out2 = tmp_path / "reuse2"
    _ok(run("reuse", "--model", "mlp", "--frames", fr, "--calib-frames", cal, "--bits",
            "uniform:3", "--layers", "h0,op", "--calibration-images", "32", "--out", out2))
    summ2 = json.loads((out2 / "summary.json").read_text())
    conf2 = json.loads((out2 / "config.json").read_text())
    assert conf2["calib_sequences"] == 0 and conf2["rank"] == "per-mac"
    assert conf2["calib_frames"]["header"]["split"] == "train"
    assert summ2["calib_frames"] == 30 and summ2["eval_sequences"] == 12
    assert summ2["rows"][0]["macs_dense"] == 12 * 5 * (784 * 256 + 128 * 10)
    assert "`" + str(cal) + "`" in (out2 / "summary.md").read_text()
    out3 = tmp_path / "reuse3"
    _ok(run("reuse", "--model", "mlp", "--frames", fr, "--calib-frames", cal, "--criticality",
            crit, "--bits", "mquans", "--budget", "2", "--rank", "criticality", "--layers",
            "h0,op", "--calibration-images", "32", "--out", out3))
    alloc = json.loads((out3 / "allocations" / "mquans-2.json").read_text())
    assert "rank" not in json.loads((out3 / "config.json").read_text())  # as before --rank
    assert alloc["drop"] <= 2 and alloc["evaluations"] >= 2
    # the same frames, other calibration frames: a different run, refused in that folder
    _error(run("reuse", "--model", "mlp", "--frames", fr, "--calib-frames", fr, "--bits",
               "uniform:3", "--layers", "h0,op", "--calibration-images", "32", "--out", out2),
           "other settings")


def test_command_errors(store, tmp_path, capsys, monkeypatch):
    def run(*a):
        return cli(a, capsys, monkeypatch, store)

    _error(run("frames", "--out", tmp_path / "f", "--motion", "fast"), "--motion")
    _error(run("frames", "--out", tmp_path / "f", "--motion", "1px,spin=3"), "unknown part")
    fr = tmp_path / "fm"
    _ok(run("frames", "--dataset", "fashion-mnist", "--sequences", "4", "--length", "3",
            "--out", fr, "--no-gif"))
    _error(run("reuse", "--model", "mlp", "--frames", fr, "--bits", "uniform:4", "--out",
               tmp_path / "r", "--calib-sequences", "1"), "fashion-mnist")
    _error(run("reuse", "--model", "mlp", "--frames", fr, "--bits", "mquans", "--out",
               tmp_path / "r"), "criticality")
    mn = tmp_path / "mn"
    _ok(run("frames", "--dataset", "mnist", "--sequences", "4", "--length", "3", "--out", mn,
            "--no-gif"))
    _error(run("reuse", "--model", "mlp", "--frames", mn, "--calib-frames", fr, "--bits",
               "uniform:4", "--out", tmp_path / "r"), "calibration frames are made from")
    _error(run("reuse", "--model", "mlp", "--frames", fr, "--bits", "uniform:4", "--rank",
               "random", "--out", tmp_path / "r"), "rank must be one of")
    _error(run("reuse", "--model", "mlp", "--frames", fr, "--bits", "uniform:9-4", "--out",
               tmp_path / "r"), "range")
    _error(run("criticality", "--model", "mlp", "--layers", "h7", "--out", tmp_path / "c"),
           "unknown layer")
    _error(run("criticality", "--model", "mlp", "--perturb", "stuck-at", "--out",
               tmp_path / "c"), "permanent")
    # were a ValueError traceback, and a failure inside the first mquans cell
    _error(run("criticality", "--model", "mlp", "--perturb", "bitflip:rate=abc", "--out",
               tmp_path / "c"), "rate must be a number")
    _error(run("reuse", "--model", "mlp", "--frames", fr, "--bits", "uniform:4", "--out",
               tmp_path / "r", "--bits-min", "6", "--bits-max", "4"), "--bits-min")
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_acceptance_picks_both_sides_on_the_evaluation_frames():
    from hasched.study.reuse import acceptance

    def row(method, setting, drop, saved, reuse, budget=None, cal=0.0):
        return {"method": method, "setting": setting, "drop": drop, "mac_savings": saved,
                "reuse_rate": reuse, "budget": budget, "calib_drop": cal}

    rows = [row("uniform", "uniform-3", 1.6, 0.76, 0.84, cal=0.4),
            row("uniform", "uniform-4", 0.25, 0.70, 0.77),
            row("uniform", "uniform-5", 0.2, 0.64, 0.70),
            row("mquans", "mquans-0.25", 0.1, 0.73, 0.78, 0.25),
            row("mquans", "mquans-0.5", 0.8, 0.78, 0.80, 0.5)]
    a = acceptance(rows, 0.5)
    # uniform-3 is best by calibration drop (0.4) but misses on the evaluation frames
    assert (a["best_uniform"], a["best_uniform_by_calibration"]) == ("uniform-4", "uniform-3")
    # Mquans at the 0.5 budget misses (0.8); the 0.25 one is within and higher
    assert a["mquans_within_budget"] is False and a["higher_reuse"] is False
    assert a["best_mquans"] == "mquans-0.25" and a["best_mquans_higher"] is True
    b = acceptance(rows, 0.15)
    assert b["best_uniform"] is None and b["best_mquans"] == "mquans-0.25"
    assert "best_mquans_higher" not in b
