"""One Scenario for every command: parsing, recording, re-running, and the same CLI options
on every command (in-process, on tiny synthetic data)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli_run import cli, one_error
from hasched.cli import app
from hasched.cli_options import SCENARIO_OPTION_NAMES
from hasched.errors import HaschedError
from hasched.study.build import build_evaluator, evaluate
from hasched.study.scenario import (
    Scenario,
    parse_fault,
    parse_layer_groups,
    split_fault_list,
)
from hasched.zoo import data
from hasched.zoo.train import save_checkpoint, train_model
from idx_files import write_learnable

KNOWN = ["c0", "h0", "h1", "h2", "op"]

# what each command sets itself instead of taking it as an option
MODEL = {"--model", "--seed", "--torchvision", "--module", "--checkpoint", "--num-classes",
         "--dataset"}
EXCLUDED = {
    "evaluate": set(),
    "sensitivity": {"--error-seed"},
    "search": {"--images"},
    "compare": {"--images"},  # like search: search and held-out image ranges instead
    "bench": {"--images"} | MODEL,  # bench times the paper model's suite
    "demo": {"--images"} | MODEL,  # the demo trains its own mnist32-cnn
    "reproduce": {"--layers", "--fault", "--fr-max", "--profile-seed", "--images",
                  "--error-seed"} | MODEL,  # the paper's cases set these
    # permanent faults only (the same chip every time): no transient rates, no repeats
    "resilience-ax": {"--fr-max", "--profile-seed", "--profile", "--repeats", "--error-seed",
                      "--multiplier", "--chip"},  # it sweeps multipliers and samples chips
    "retune": {"--fr-max", "--profile-seed", "--profile", "--repeats", "--error-seed"},
    # FAP: pruned weights in fp32, so no arithmetic, fault model or transient options
    "resilience": {"--n-sms", "--arithmetic", "--multiplier", "--fault", "--error", "--fr-max",
                   "--profile-seed", "--profile", "--faulty-pes", "--chip-seed", "--chip",
                   "--repeats", "--metric", "--error-seed"},
}
EXCLUDED["retrain"] = EXCLUDED["resilience"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(data_dir, models_dir): synthetic MNIST and a 2-step mnist32-cnn seed 1."""
    root = tmp_path_factory.mktemp("scn")
    write_learnable(root / "data", 256, 96, seed=0, folders=("mnist",))
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no dl")))
    model, meta = train_model("mnist32-cnn", 1, data_dir=root / "data", train_subset=256,
                              max_steps=2, progress=False, download=False)
    save_checkpoint(model, meta, root / "models")
    yield root / "data", root / "models"
    mp.undo()






@pytest.mark.parametrize("command", sorted(EXCLUDED))
def test_every_command_takes_the_same_scenario_options(command):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in SCENARIO_OPTION_NAMES:
        if opt not in EXCLUDED[command]:
            assert opt in res.output, f"{command} lacks {opt}"


def test_a_command_cannot_hide_a_scenario_option():
    from hasched.cli_options import scenario_options

    def cmd(scn: dict, seed: int = 0) -> None:  # would hide the model's --seed
        return None

    with pytest.raises(TypeError, match="hide scenario options"):
        scenario_options()(cmd)
    assert scenario_options(override=("seed",))(cmd) is not None


def test_layer_groups():
    assert parse_layer_groups("c0,h2+op", KNOWN) == [("c0",), ("h2", "op")]
    assert parse_layer_groups("all", KNOWN) == [tuple(KNOWN)]
    assert parse_layer_groups("each", KNOWN) == [(n,) for n in KNOWN]
    for bad, msg in (("c9", "unknown layer"), ("c0+c0", "twice"), ("c0,c0", "twice"),
                     ("", "no layer")):
        with pytest.raises(HaschedError, match=msg):
            parse_layer_groups(bad, KNOWN)


def test_fault_specs():
    assert parse_fault("stuck-at:bit=14,value=1,site=accumulator") == (
        "stuck-at", (("bit", 14), ("value", 1), ("site", "accumulator")))
    assert parse_fault("bitflip") == ("bitflip", ())
    assert split_fault_list("bitflip:high_bit=30,low_bit=20,zero,tf32") == [
        "bitflip:high_bit=30,low_bit=20", "zero", "tf32"]
    with pytest.raises(HaschedError, match="key=value"):
        parse_fault("bitflip:30")


def test_scenario_round_trip_and_validation(tmp_path):
    s = Scenario(layers=("h2", "op"), mapping="systolic:8x8", arithmetic="int8",
                 multiplier="drum4", fault="stuck-at", fault_params=(("bit", 3),),
                 faulty_pes=0.1, chip_seed=4, metric="sdc1")
    assert Scenario.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.fault_kind == "permanent" and s.validate() is s
    for kw, msg in ((dict(fault="stuck-at"), "--faulty-pes"),
                    (dict(faulty_pes=0.1), "transient"),
                    (dict(mapping="torus"), "unknown mapping"),
                    (dict(arithmetic="int4"), "unknown arithmetic"),
                    (dict(multiplier="drum4"), "int8"),
                    (dict(fault="tf32", arithmetic="int8"), None),
                    (dict(chip=str(tmp_path / "none.json")), "not found")):
        if msg is None:
            continue
        with pytest.raises(HaschedError, match=msg):
            Scenario(**kw).validate()
    with pytest.raises(HaschedError, match="metric"):
        Scenario(metric="top3")
    with pytest.raises(HaschedError, match="unknown scenario field"):
        Scenario.from_dict({"modle": "x"})


def test_a_recorded_scenario_reruns_exactly(store):
    d, m = store
    s = Scenario(layers=("c0",), fault="bitflip", fr_max=0.05, images="48", repeats=2,
                 error_seed=3)
    rec = evaluate(build_evaluator(s, data_dir=d, models_dir=m, progress=False), 2, 3)
    again = Scenario.from_dict(rec["scenario"])
    rec2 = evaluate(build_evaluator(again, data_dir=d, models_dir=m, progress=False),
                    again.repeats, again.error_seed)
    assert rec2["accuracies"] == rec["accuracies"] and again == s


def test_evaluate_on_a_systolic_int8_chip(store, capsys, monkeypatch):
    code, out, err = cli(["evaluate", "--layers", "c0,h2+op", "--mapping", "systolic:16x16",
                          "--arithmetic", "int8", "--fault", "stuck-at:bit=14,value=1",
                          "--faulty-pes", "0.05", "--chip-seed", "3", "--images", "48",
                          "--json"], capsys, monkeypatch, store)
    assert code == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["layers"] for r in recs] == [["c0"], ["h2", "op"]]
    for r in recs:
        assert r["arithmetic"] == "int8" and r["mapping"] == "systolic:16x16"
        assert r["fault"]["name"] == "chip" and r["fault"]["faulty_pes"] == 13
        assert r["repeats"] == 1 and r["scenario"]["faulty_pes"] == 0.05
        assert 0 <= r["accuracy_mean"] <= 1 and 0 <= r["reference_accuracy"] <= 1


def test_chips_command_and_chip_files(store, capsys, monkeypatch, tmp_path):
    out_dir = tmp_path / "chips"
    code, out, err = cli(["chips", "--out", str(out_dir), "--faulty-pes", "0.02,0.1",
                          "--count", "2", "--fault", "dead"], capsys, monkeypatch, store)
    assert code == 0, err
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["chip_f0.02_s1.json", "chip_f0.02_s2.json", "chip_f0.1_s1.json",
                     "chip_f0.1_s2.json"]
    code, out, err = cli(["evaluate", "--layers", "h0", "--mapping", "systolic:16x16",
                          "--chip", str(out_dir / "chip_f0.1_s1.json"), "--images", "32",
                          "--json"], capsys, monkeypatch, store)
    assert code == 0, err and json.loads(out)["fault"]["faulty_pes"] == 26
    before = sorted(p.name for p in out_dir.iterdir())
    code, _, err = cli(["chips", "--out", str(out_dir)], capsys, monkeypatch, store)
    one_error(code, err, "not an empty folder")
    assert sorted(p.name for p in out_dir.iterdir()) == before


@pytest.mark.parametrize("args,needle", [
    (["--mapping", "systolic:16"], "systolic:RxC"),
    (["--fault", "stuck-at"], "--faulty-pes"),
    (["--faulty-pes", "0.1"], "transient"),
    (["--fault", "stuck-at:bit=99", "--faulty-pes", "0.1"], "bit"),
    (["--multiplier", "drum4"], "int8"),
    (["--arithmetic", "int8", "--multiplier", "lut:/nonexistent.bin"], "not found"),
    (["--fault", "bf16", "--arithmetic", "int8"], "float32"),
    (["--mapping", "systolic:4x4", "--fault", "zero:site=output"], "fault sites"),
    (["--metric", "top3"], "metric"),
])
def test_bad_scenarios_are_one_line(store, capsys, monkeypatch, args, needle):
    code, _, err = cli(["evaluate", "--images", "16", *args], capsys, monkeypatch, store)
    one_error(code, err, needle)


def test_any_model_end_to_end_from_the_cli(store, capsys, monkeypatch, tmp_path):
    """torchvision resnet18 and a user's module:fn, each with a checkpoint file."""
    from safetensors.torch import save_file

    from hasched.zoo.ref import ModelRef, build_model

    (tmp_path / "hz_user_net.py").write_text(
        "import torch.nn as nn\n\ndef build(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(4 * 26 * 26, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for src, layer in (("torchvision:resnet18", "layer1.0.conv2"),
                       ("module:hz_user_net:build", "0")):
        ref = ModelRef(src, dataset="mnist")
        ckpt = tmp_path / f"{src.split(':')[1]}.safetensors"
        save_file({k: v.contiguous() for k, v in build_model(ref, 0).state_dict().items()},
                  str(ckpt))
        flag = ["--torchvision", "resnet18"] if src.startswith("torch") else \
            ["--module", "hz_user_net:build"]
        code, out, err = cli(["evaluate", *flag, "--dataset", "mnist", "--checkpoint",
                              str(ckpt), "--layers", layer, "--fr-max", "1e-3", "--images",
                              "16", "--repeats", "2", "--json"], capsys, monkeypatch, store)
        assert code == 0, err
        rec = json.loads(out)
        assert rec["scenario"]["model"] == src and rec["layers"] == [layer]
        assert rec["path"] == ("graph" if "resnet" in src else "incremental")
    code, _, err = cli(["evaluate", "--torchvision", "resnet18", "--model", "mlp"], capsys,
                       monkeypatch, store)
    one_error(code, err, "one model source")
