"""``hasched train`` for any model reference, in-process (tiny synthetic data)."""

from __future__ import annotations

import sys

import pytest

from hasched.cli import main
from hasched.zoo import data
from idx_files import write_learnable


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.delenv("HASCHED_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_download", lambda *a, **k: pytest.fail("tests never download"))
    (tmp_path / "hz_cli_pkg.py").write_text(
        "from torch import nn\n\ndef build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_learnable(tmp_path / "data"), tmp_path / "models"


def run(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["hasched", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_train_a_module_model_then_find_it_stored(dirs, monkeypatch, capsys):
    data_dir, models_dir = dirs
    args = ["train", "--module", "hz_cli_pkg:build", "--dataset", "mnist", "--epochs", "1",
            "--seed", "3", "--data-dir", str(data_dir), "--models-dir", str(models_dir)]
    code, out, _ = run(args, monkeypatch, capsys)
    assert code == 0 and out.startswith("module-hz_cli_pkg-build@mnist seed 3: test accuracy")
    assert (models_dir / "module-hz_cli_pkg-build@mnist" / "seed3" / "meta.json").is_file()
    code, out, _ = run(args, monkeypatch, capsys)
    assert code == 0 and "checkpoint exists" in out


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "mlp", "--torchvision", "resnet18"], "give one model source, not --model and"),
    (["--torchvision", "resnet18"], "torchvision:resnet18 has no dataset of its own"),
    (["--torchvision", "vgg11", "--dataset", "mnist"], "'vgg11' is not among its bundled"),
    (["--module", "hz_cli_pkg:nothing", "--dataset", "mnist"], "has no attribute 'nothing'"),
])
def test_train_reference_errors_are_one_line(dirs, monkeypatch, capsys, args, needle):
    base = ["train", "--data-dir", str(dirs[0]), "--models-dir", str(dirs[1])]
    code, out, err = run([*base, *args], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hasched: error: ")
    assert needle in lines[0] and not dirs[1].exists()
