"""The Fal-reTune commands end to end, in-process, on synthetic MNIST and a 2-step mlp:
``multipliers``, ``resilience-ax`` (resume is byte-identical), ``retune``, and one-line
errors for bad LUT and chip files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_run import cli, one_error
from hasched.sim.multipliers import create_multiplier
from hasched.study.axres import AxResSettings, run_axres, summarize_axres
from hasched.study.scenario import Scenario
from hasched.zoo import data
from hasched.zoo.train import save_checkpoint, train_model
from idx_files import write_learnable

AX = ["--model", "mlp", "--mapping", "systolic:4x4", "--images", "24", "--multipliers",
      "drum4", "--sites", "product,accumulator", "--bits", "3,12", "--values", "1",
      "--faulty-pes", "0.25", "--chips", "2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(data_dir, models_dir): synthetic MNIST and a 2-step mlp seed 1."""
    root = tmp_path_factory.mktemp("ax")
    write_learnable(root / "data", 160, 48, seed=0, folders=("mnist",))
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no dl")))
    model, meta = train_model("mlp", 1, data_dir=root / "data", max_steps=2, progress=False,
                              download=False)
    save_checkpoint(model, meta, root / "models")
    yield root / "data", root / "models"
    mp.undo()






def test_multipliers_lists_bundled_and_loaded_tables(tmp_path, capsys, monkeypatch):
    a = np.arange(256, dtype=np.uint16)
    np.save(tmp_path / "mine.npy", (a[:, None] * a[None, :] >> 3 << 3).astype(np.uint16))
    code, out, err = cli(["multipliers", "--lut", tmp_path / "mine.npy", "--json"], capsys,
                         monkeypatch)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"exact", "trunc4", "drum4", "mitchell", "bam8", "lut:mine.npy"} <= set(rows)
    assert rows["drum4"]["mae"] == create_multiplier("drum4").metrics()["mae"]
    low = (a[:, None].astype(np.int64) * a[None, :]) % 8  # the bits the table drops
    assert rows["lut:mine.npy"]["wce"] == 7 and rows["lut:mine.npy"]["mae"] == low.mean()
    assert rows["exact"]["error_probability"] == 0.0
    code, out, _ = cli(["multipliers"], capsys, monkeypatch)
    assert code == 0 and "trunc4" in out and "MAE" in out


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.with_suffix(".bin").write_bytes(b"\0" * 100), "65,536"),
    (lambda p: np.save(p, np.zeros((256, 256))), "integers"),
    (lambda p: np.save(p, np.zeros((256, 128), np.int32)), "square"),
    (lambda p: p.write_bytes(b"not numpy"), "malformed"),
    (lambda p: None, "not found"),
])
def test_bad_lut_files_are_one_line(tmp_path, capsys, monkeypatch, make, needle):
    path = tmp_path / "bad.npy"
    make(path)
    target = path.with_suffix(".bin") if needle == "65,536" else path
    code, _, err = cli(["multipliers", "--lut", target], capsys, monkeypatch)
    one_error(code, err, needle)


def test_resilience_ax_resume_is_byte_identical(store, tmp_path, capsys, monkeypatch):
    code, out, err = cli(["resilience-ax", *AX, "--out", tmp_path / "full"], capsys,
                         monkeypatch, store)
    assert code == 0, err
    assert "same faulty bit" in out and "AccDNN" in out
    full = tmp_path / "full"
    for name in ("report.md", "results.csv", "summary.json", "heatmap_f0.25.png"):
        assert (full / name).is_file()
    rows = [json.loads(p.read_text())["rows"][0] for p in sorted((full / "parts").iterdir())]
    assert len(rows) == 2 * 2 * 1 * 1 * 2 * 2  # multipliers x sites x bits x values x chips
    s = AxResSettings(Scenario(model="mlp", layers=("h0", "h1", "op"),
                               mapping="systolic:4x4", arithmetic="int8", images="24",
                               fault="stuck-at"),
                      multipliers=("drum4",), bits=(3, 12), values=(1,), faulty_pes=(0.25,),
                      chips=2)
    d, m = store
    part = run_axres(tmp_path / "cut", s, models_dir=m, data_dir=d, progress=False,
                     max_cells=5)
    assert len(part) == 5
    code, out2, err = cli(["resilience-ax", *AX, "--out", tmp_path / "cut"], capsys,
                          monkeypatch, store)
    assert code == 0, err and out2 == out
    for p in (full / "parts").iterdir():
        assert (tmp_path / "cut" / "parts" / p.name).read_bytes() == p.read_bytes()
    assert (tmp_path / "cut" / "results.csv").read_bytes() == (full / "results.csv").read_bytes()
    summ = summarize_axres(rows)
    assert {p["multiplier"] for p in summ["per_multiplier"]} == {"drum4"}
    # the same chip for both multipliers: one faulty-PE count per chip seed
    counts = {(r["chip_seed"], r["faulty_count"]) for r in rows}
    assert len(counts) == 2


@pytest.mark.parametrize("args,needle", [
    (["--bits", "16"], "0..15"),
    (["--fault", "bitflip"], "stuck-at"),
    (["--fault", "stuck-at:bit=3"], "stuck-at"),
    (["--sites", "output"], "product"),
    (["--arithmetic", "fp32"], "int8"),
    (["--multipliers", "drum9"], "unknown multiplier"),
    (["--faulty-pes", "0"], "(0, 1]"),
    (["--layers", "h0,h1"], "one layer group"),
])
def test_resilience_ax_bad_options_are_one_line(store, tmp_path, capsys, monkeypatch, args,
                                                needle):
    code, _, err = cli(["resilience-ax", *AX, *args, "--out", tmp_path / "x"], capsys,
                       monkeypatch, store)
    one_error(code, err, needle)
    assert not (tmp_path / "x").exists()


RT = ["--model", "mlp", "--mapping", "systolic:4x4", "--images", "24", "--multiplier",
      "drum4", "--fault", "stuck-at:bit=9,value=1,site=product", "--faulty-pes", "0.5",
      "--chips", "2", "--calibration-images", "64", "--train-images", "64:128",
      "--search-images", "64:96", "--finetune-steps", "2", "--retune-steps", "1",
      "--search-config", '{"population": 2, "generations": 1}']


def test_retune_side_by_side_and_resume(store, tmp_path, capsys, monkeypatch):
    methods = "retune,retune+bias,prune,remap,finetune"
    code, out, err = cli(["retune", *RT, "--method", methods, "--out", tmp_path / "r"],
                         capsys, monkeypatch, store)
    assert code == 0, err
    for label in ("none (AxDNN", "exact multiplier (AccDNN", "| retune |", "retune+bias",
                  "prune", "remap", "finetune"):
        assert label in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert {r["method"] for r in summary["rows"]} == {"none", "exact", *methods.split(",")}
    assert all(r["chips"] == 2 for r in summary["rows"])
    before = (tmp_path / "r" / "summary.json").read_bytes()
    code, out2, _ = cli(["retune", *RT, "--method", methods, "--out", tmp_path / "r"],
                        capsys, monkeypatch, store)
    assert code == 0 and out2 == out
    assert (tmp_path / "r" / "summary.json").read_bytes() == before


def test_retune_bad_chip_files_are_one_line(store, tmp_path, capsys, monkeypatch):
    from hasched.sim.faults import create_fault

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    wrong = tmp_path / "wrong.json"
    create_fault("stuck-at").sample_chip((16, 16), 0.1, 1).save(wrong)
    acc = tmp_path / "acc.json"
    create_fault("stuck-at", site="accumulator").sample_chip((4, 4), 0.1, 1).save(acc)
    notchip = tmp_path / "notchip.json"
    notchip.write_text(json.dumps({"kind": "fault-profile"}))
    for path, needle in ((tmp_path / "none.json", "not found"), (bad, "malformed"),
                         (wrong, "PE grid"), (acc, "accumulator"), (notchip, "chip-map")):
        code, _, err = cli(["retune", *RT, "--chip", path, "--out", tmp_path / "o"], capsys,
                           monkeypatch, store)
        one_error(code, err, needle)
        assert not (tmp_path / "o").exists()
    code, _, err = cli(["retune", *RT, "--method", "retune,magic", "--out", tmp_path / "o"],
                       capsys, monkeypatch, store)
    one_error(code, err, "unknown mitigation")


def test_retune_chip_files_with_unsafe_names_get_safe_keys():
    # a chip file "my chip.json" used to raise a ValueError traceback from GridCell
    from hasched.study.retune import retune_cells

    cells = retune_cells(["my chip", "c/ø", "f0.1_s1"], ("retune+bias",))
    assert [c.key for c in cells] == [
        "my-chip_none", "my-chip_exact", "my-chip_retune+bias", "c--_none", "c--_exact",
        "c--_retune+bias", "f0.1_s1_none", "f0.1_s1_exact", "f0.1_s1_retune+bias"]
    assert [c.params["chip"] for c in cells[::3]] == ["my chip", "c/ø", "f0.1_s1"]


@pytest.mark.parametrize("args,needle", [
    (["--retune-steps", "-1"], "steps must be an integer >= 0"),
    (["--batch-size", "0"], "batch size must be >= 1"),
    (["--lr", "2"], "learning rate must lie in (0, 1)"),
    (["--method", "prune,none"], "always measured"),  # was 'two grid cells share a key'
])
def test_retune_bad_fine_tune_options_fail_before_any_output(store, tmp_path, capsys,
                                                            monkeypatch, args, needle):
    # they used to fail inside the first fine-tuning cell, after the grid folder was made
    code, _, err = cli(["retune", *RT, "--method", "prune", *args, "--out", tmp_path / "o"],
                       capsys, monkeypatch, store)
    one_error(code, err, needle)
    assert not (tmp_path / "o").exists()
