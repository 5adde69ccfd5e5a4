"""Sensitivity campaigns: grid expansion, resume, atomic parts, summary, errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from hasched.errors import HaschedError
from hasched.study.campaign import (
    CampaignConfig,
    Cell,
    expand_grid,
    load_results,
    run_campaign,
    summarize_results,
)


def fake_eval(cfg: CampaignConfig, cell: Cell) -> dict:
    """A deterministic stand-in for the engine: accuracy depends on coordinates + error seed."""
    s = cell.error_seed(cfg.model)
    clean = 0.9 + 0.01 * cell.seed
    accs = [clean - cell.fr_max * (1 + ((s >> (8 * i)) % 7)) for i in range(cfg.repeats)]
    return {"clean_accuracy": clean, "accuracies": accs, "images": 64}


def small_cfg(**kw) -> CampaignConfig:
    args = dict(model="mnist32-cnn", seeds="1,2", layers="c0,op,c0+h0",
                errors="flip-to-1,tf32", fr_max="paper", profile_seeds="1,2", repeats=2,
                images=64)
    args.update(kw)
    return CampaignConfig.from_args(**args)


def test_grid_expansion_counts():
    cfg = small_cfg()
    assert len(expand_grid(cfg)) == 2 * 3 * 2 * 3 * 2
    all_cfg = CampaignConfig.from_args("mnist32-cnn")
    assert all_cfg.layers == ("c0", "h0", "h1", "h2", "op")
    assert len(expand_grid(all_cfg)) == 3 * 5 * 5 * 3 * 2
    sweep = small_cfg(fr_max="sweep", errors="bitflip", layers="c0", seeds="1",
                      profile_seeds="1")
    assert len(expand_grid(sweep)) == 12  # table rates are inside the sweep
    explicit = small_cfg(fr_max="5e-3,1e-3,1e-3", layers="c0", seeds="1", profile_seeds="1")
    assert [c.fr_max for c in expand_grid(explicit)] == [1e-3, 5e-3, 1e-3, 5e-3]
    keys = [c.key for c in expand_grid(cfg)]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("kw, msg", [
    (dict(layers="c9"), "unknown layer"),
    (dict(layers="c0+c0"), "twice"),
    (dict(errors="flip-to-2"), "unknown error"),
    (dict(fr_max="abc"), "--fr-max"),
    (dict(fr_max="0,1e-3"), "(0, 1]"),
    (dict(seeds="1,x"), "--seeds"),
    (dict(profile_seeds=""), "empty"),
    (dict(repeats=0), "--repeats"),
    (dict(images=0), "--images"),
    (dict(device="tpu"), "--device"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(HaschedError, match=msg.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+")):
        small_cfg(**kw)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = small_cfg()
    full = run_campaign(cfg, tmp_path / "a", progress=False, evaluate_fn=fake_eval)
    assert full["complete"] and full["rows"] == 72 * 2
    # Interrupted twice, then finished.
    r1 = run_campaign(cfg, tmp_path / "b", progress=False, evaluate_fn=fake_eval, max_cells=5)
    assert not r1["complete"] and r1["rows"] == 10
    # A half-written tmp file of a dying writer and a truncated part are both ignored.
    parts = tmp_path / "b" / "parts"
    nxt = expand_grid(cfg)[5]
    (parts / f".{nxt.key}.json.123.tmp").write_text('{"key": "' + nxt.key + '", "ro')
    nxt2 = expand_grid(cfg)[6]
    (parts / f"{nxt2.key}.json").write_text('{"key": "' + nxt2.key + '", "rows": [{"mo')
    r2 = run_campaign(cfg, tmp_path / "b", progress=False, evaluate_fn=fake_eval, max_cells=9)
    assert r2["done_before"] == 5 and r2["computed"] == 9
    r3 = run_campaign(cfg, tmp_path / "b", progress=False, evaluate_fn=fake_eval)
    assert r3["complete"] and r3["computed"] == 72 - 14
    r4 = run_campaign(cfg, tmp_path / "b", progress=False, evaluate_fn=fake_eval)
    assert r4["computed"] == 0
    a = pd.read_csv(tmp_path / "a" / "results.csv")
    b = pd.read_csv(tmp_path / "b" / "results.csv")
    pd.testing.assert_frame_equal(a, b)
    assert not b.duplicated(["seed", "layers", "error", "fr_max", "profile_seed",
                             "repeat"]).any()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b" / "summary.csv"),
                                  pd.read_csv(tmp_path / "a" / "summary.csv"))


def test_incompatible_dir(tmp_path):
    cfg = small_cfg()
    run_campaign(cfg, tmp_path / "a", progress=False, evaluate_fn=fake_eval, max_cells=1)
    with pytest.raises(HaschedError, match="differs in: repeats"):
        run_campaign(small_cfg(repeats=3), tmp_path / "a", progress=False,
                     evaluate_fn=fake_eval)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("hi")
    with pytest.raises(HaschedError, match="not a hasched campaign folder"):
        run_campaign(cfg, other, progress=False, evaluate_fn=fake_eval)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    with pytest.raises(HaschedError, match="not valid JSON"):
        run_campaign(cfg, tmp_path / "bad", progress=False, evaluate_fn=fake_eval)
    with pytest.raises(HaschedError, match="not a campaign folder"):
        load_results(tmp_path / "nowhere")
    with pytest.raises(HaschedError, match="--workers"):
        run_campaign(cfg, tmp_path / "a", progress=False, evaluate_fn=fake_eval, workers=0)


def test_summary_by_hand():
    rows = []
    # one group: 2 seeds x 1 profile seed x 2 repeats; a second group with one row
    for seed, accs in ((1, (0.5, 0.7)), (2, (0.6, 0.8))):
        for i, a in enumerate(accs):
            rows.append(dict(model="m", seed=seed, layers="c0", error="bitflip", fr_max=1e-3,
                             profile_seed=1, repeat=i, error_seed=0, images=10,
                             clean_accuracy=0.9, accuracy=a, degradation_pts=100 * (0.9 - a)))
    rows.append(dict(rows[0], layers="op", accuracy=0.85, degradation_pts=5.0))
    s = summarize_results(pd.DataFrame(rows)).set_index("layers")
    c0 = s.loc["c0"]
    assert c0["n"] == 4
    assert c0["accuracy_mean"] == pytest.approx(0.65)
    # sample std of 0.5, 0.6, 0.7, 0.8: sqrt(((.15)^2+(.05)^2)*2/3)
    assert c0["accuracy_std"] == pytest.approx(math.sqrt((0.15**2 + 0.05**2) * 2 / 3))
    assert c0["degradation_mean_pts"] == pytest.approx(25.0)
    assert c0["degradation_std_pts"] == pytest.approx(100 * c0["accuracy_std"])
    assert s.loc["op", "n"] == 1 and s.loc["op", "accuracy_std"] == 0.0


def test_error_seed_is_stable():
    c = Cell(1, "c0", "bitflip", 5e-3, 2)
    assert c.error_seed("mnist32-cnn") == Cell(1, "c0", "bitflip", 0.005, 2).error_seed(
        "mnist32-cnn")
    assert c.error_seed("mnist32-cnn") != Cell(1, "c0", "bitflip", 5e-3, 1).error_seed(
        "mnist32-cnn")


def test_report_from_saved_results(tmp_path):
    from hasched.report.sensitivity import write_report

    cfg = small_cfg(errors="flip-to-1,flip-to-0", layers="c0,op")
    run_campaign(cfg, tmp_path / "r", progress=False, evaluate_fn=fake_eval)
    res = write_report(tmp_path / "r")
    text = res["report"].read_text()
    assert "most sensitive" in text and "(2) mnist32-cnn, flip-to-0" in text
    assert all(p.is_file() and p.stat().st_size > 1000 for p in res["figures"])
    part = json.loads(next((tmp_path / "r" / "parts").glob("*.json")).read_text())
    assert len(part["rows"]) == cfg.repeats


@pytest.mark.skipif(
    not (Path(os.environ.get("HASCHED_DATA_DIR", "/nonexistent")) / "mnist").is_dir(),
    reason="needs the offline MNIST files (HASCHED_DATA_DIR)")
def test_real_engine_tiny_checkpoint(tmp_path):
    """Two cells through hasched.study.build with a 2-step checkpoint and 64 images."""
    from hasched.zoo.train import save_checkpoint, train_model

    model, meta = train_model("mnist32-cnn", 1, train_subset=256, max_steps=2, progress=False)
    save_checkpoint(model, meta, tmp_path / "models")
    cfg = CampaignConfig.from_args("mnist32-cnn", seeds="1", layers="op", errors="bitflip",
                                   fr_max="5e-3", profile_seeds="1,2", repeats=2, images=64)
    r = run_campaign(cfg, tmp_path / "c", models_dir=tmp_path / "models", progress=False)
    df = load_results(tmp_path / "c")
    assert r["complete"] and len(df) == 4 and (df["images"] == 64).all()
    assert df["accuracy"].between(0, 1).all()


def test_store_from_another_sampler_version_is_refused(tmp_path):
    import json

    from hasched.study.campaign import open_store

    cfg = CampaignConfig.from_args("mnist32-cnn", seeds="1", layers="op", errors="bitflip")
    with open_store(tmp_path / "c", cfg):
        pass
    path = tmp_path / "c" / "config.json"
    obj = json.loads(path.read_text())
    obj["sampler"] -= 1
    path.write_text(json.dumps(obj))
    with pytest.raises(HaschedError, match="sampler version"), open_store(tmp_path / "c", cfg):
        pass
    assert json.loads(path.read_text()) == obj  # left as it was
