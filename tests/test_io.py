"""hasched.io and hasched.schema as a library: atomic writes, folder claims, locks, checks."""

from __future__ import annotations

import errno
import json
import os

import pytest

from hasched.errors import HaschedError
from hasched.io import LOCK_NAME, atomic_write, check_out_dir, claim_out_dir
from hasched.schema import check_fields, check_type, require


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_payloads_and_mode(tmp_path):
    atomic_write(tmp_path / "a.txt", "héllo\n")
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    atomic_write(tmp_path / "c.bin", lambda fh: fh.write(b"called"))
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.bin").read_bytes() == b"called"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # like any file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.bin"]


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "r.csv"
    target.write_text("old\n")
    monkeypatch.setattr(os, "write", _enospc)
    with pytest.raises(HaschedError, match=f"cannot write {target}: no space left"):
        atomic_write(target, "new\n")
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", lambda *a: _enospc())
    with pytest.raises(HaschedError, match="no space left"):
        atomic_write(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["r.csv"]
    with pytest.raises(HaschedError, match="its folder does not exist"):
        atomic_write(tmp_path / "nowhere" / "x", "x")


def test_failed_claim_removes_the_folders_it_created(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "write", _enospc)
    with pytest.raises(HaschedError, match="lock file"), \
            claim_out_dir(tmp_path / "a" / "b", {"k": 1}):
        pass
    assert list(tmp_path.iterdir()) == []


def test_claim_writes_config_once_and_locks(tmp_path):
    out = tmp_path / "o"
    messages = []
    with claim_out_dir(out, {"k": 1}, log=messages.append):
        assert json.loads((out / "config.json").read_text()) == {"k": 1}
        lock = (out / LOCK_NAME).read_text().split()
        assert int(lock[0]) == os.getpid()
        with pytest.raises(HaschedError, match="being written by another"), \
                claim_out_dir(out, {"k": 2}):
            pass
        assert (out / LOCK_NAME).exists()  # the refused claim left our lock alone
    assert not (out / LOCK_NAME).exists() and not messages
    with claim_out_dir(out, {"k": 2}):  # an existing config is never rewritten
        pass
    assert json.loads((out / "config.json").read_text()) == {"k": 1}


def test_release_never_removes_another_runs_lock(tmp_path):
    out = tmp_path / "o"
    with claim_out_dir(out, None):
        (out / LOCK_NAME).write_text("1 elsewhere\n")  # someone broke and retook the lock
    assert (out / LOCK_NAME).read_text() == "1 elsewhere\n"


def test_garbage_lock_counts_as_stale(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_NAME).write_text("not a pid")
    messages = []
    with claim_out_dir(out, None, log=messages.append):
        pass
    assert messages == [f"{out}: recovered a stale lock that was unreadable"]


def test_policy_new_empty_ours(tmp_path):
    def same(cfg, path):
        if cfg != {"k": 1}:
            raise HaschedError("other settings")

    kw = dict(what="thing", compatible=same)
    assert check_out_dir(tmp_path / "new", **kw) is False
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK_NAME).write_text("1\n")  # a lock says nothing of the content
    assert check_out_dir(tmp_path / "empty", **kw) is False
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text('{"k": 1}')
    assert check_out_dir(tmp_path / "ours", **kw) is True
    (tmp_path / "ours" / "config.json").write_text('{"k": 2}')
    with pytest.raises(HaschedError, match="other settings"):
        check_out_dir(tmp_path / "ours", **kw)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "REPORT.md").write_text("")
    assert check_out_dir(tmp_path / "old", **kw, legacy=lambda n: n == ["REPORT.md"]) is True


@pytest.mark.parametrize("value,kind,message", [
    (True, int, "must be an integer, got true"),
    (1.5, int, "got 1.5"),
    ("1", float, 'must be a number, got "1"'),
    (None, str, "must be a string, got null"),
    ([1, "2"], list[int], 'x[1] must be an integer, got "2"'),
    ({"a": 1}, str | list[float], "must be a string or a list of numbers"),
])
def test_check_type_refuses(value, kind, message):
    with pytest.raises(HaschedError, match=message.replace("[", r"\[").replace("]", r"\]")) \
            as err:
        check_type(value, kind, file="f.json", name="x")
    assert str(err.value).startswith("f.json: x")


def test_check_type_accepts():
    assert check_type(3, float, file="f", name="x") == 3  # an integer is a number
    assert check_type(None, str | None, file="f", name="x") is None
    assert check_type([0.5, 1], list[float], file="f", name="x") == [0.5, 1]


def test_require_and_check_fields():
    assert require({"a": 1}, "b", int, file="f", default=7) == 7
    with pytest.raises(HaschedError, match="f: missing field 'cfg.b'"):
        require({"a": 1}, "b", int, file="f", where="cfg")
    with pytest.raises(HaschedError, match="f: the top level must be an object, got a JSON list"):
        require([1], "b", int, file="f")
    spec = {"rows": int, "pes": list[int]}
    assert check_fields({"rows": 2, "pes": [0, 1]}, spec, file="c") == {"rows": 2, "pes": [0, 1]}
    with pytest.raises(HaschedError, match="c: unknown field extra"):
        check_fields({"rows": 2, "pes": [], "extra": 0}, spec, file="c")
    assert check_fields({"rows": 2, "pes": [], "extra": 0}, spec, file="c", extra_ok=True)
