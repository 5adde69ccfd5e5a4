"""Executors: in-process, a local process pool and Ray give byte-identical campaign tables,
and a run started on one resumes on another."""

from __future__ import annotations

import sys

import pytest

from cli_run import cli, one_error
from hasched.errors import HaschedError
from hasched.study.campaign import run_campaign
from hasched.study.executor import LocalExecutor, RayExecutor
from test_campaign import fake_eval, small_cfg


def _tables(folder) -> tuple[bytes, bytes]:
    return (folder / "results.csv").read_bytes(), (folder / "summary.csv").read_bytes()


def test_process_pool_equals_in_process(tmp_path):
    cfg = small_cfg(layers="c0", errors="flip-to-1", profile_seeds="1")
    run_campaign(cfg, tmp_path / "one", progress=False, evaluate_fn=fake_eval)
    res = run_campaign(cfg, tmp_path / "two", progress=False, evaluate_fn=fake_eval,
                       executor=LocalExecutor(2))
    assert res["computed"] == 6 and res["complete"]
    assert _tables(tmp_path / "one") == _tables(tmp_path / "two")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    # Ray workers do not see the tests folder: ship this module's functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules["test_campaign"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_equals_local_and_resumes_across_executors(tmp_path, ray_local):
    cfg = small_cfg()
    local = run_campaign(cfg, tmp_path / "local", progress=False, evaluate_fn=fake_eval)
    ray_run = run_campaign(cfg, tmp_path / "ray", progress=False, evaluate_fn=fake_eval,
                           executor=RayExecutor())
    assert local["cells"] == ray_run["computed"] == 72 and ray_run["complete"]
    assert _tables(tmp_path / "local") == _tables(tmp_path / "ray")
    # Half on Ray, killed; the rest locally from the same store: still the same tables.
    part = run_campaign(cfg, tmp_path / "mixed", progress=False, evaluate_fn=fake_eval,
                        executor=RayExecutor(), max_cells=20)
    assert part["computed"] == 20 and not part["complete"]
    rest = run_campaign(cfg, tmp_path / "mixed", progress=False, evaluate_fn=fake_eval)
    assert rest["done_before"] == 20 and rest["computed"] == 52
    assert _tables(tmp_path / "local") == _tables(tmp_path / "mixed")


def test_ray_missing_is_one_clear_error_before_anything_is_written(monkeypatch, tmp_path,
                                                                   capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(HaschedError, match=r"pip install 'hasched\[ray\]'"):
        RayExecutor()
    out = tmp_path / "camp"
    code, _, err = cli(["sensitivity", "--out", out, "--executor", "ray"], capsys, monkeypatch)
    one_error(code, err, "hasched[ray]")
    assert not out.exists()


@pytest.mark.parametrize("spec", ["spark", "local:4", "rayon"])
def test_bad_executor_spec_is_refused_before_anything_runs(spec, tmp_path, capsys,
                                                           monkeypatch):
    out = tmp_path / "camp"
    code, _, err = cli(["sensitivity", "--out", out, "--executor", spec], capsys, monkeypatch)
    one_error(code, err, "--executor")
    assert not out.exists()
