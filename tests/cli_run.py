"""Running ``hasched`` in-process as the console script does (shared by CLI test modules)."""

from __future__ import annotations

import sys

import pytest

from hasched.cli import main


def cli(args, capsys, monkeypatch, store=None) -> tuple[int | None, str, str]:
    """Runs ``hasched ARGS`` through ``main()``: ``(exit code, stdout, stderr)``.

    ``store``: ``(data_dir, models_dir)`` set as the environment's defaults.
    """
    if store is not None:
        monkeypatch.setenv("HASCHED_DATA_DIR", str(store[0]))
        monkeypatch.setenv("HASCHED_MODELS_DIR", str(store[1]))
    monkeypatch.setattr(sys, "argv", ["hasched", *[str(a) for a in args]])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_error(code, err, needle) -> None:
    """Exit 2, no traceback, and the last line is one ``hasched: error:`` naming ``needle``."""
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("hasched: error:") and needle in lines[-1], err
