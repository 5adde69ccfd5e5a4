"""A synthetic MNIST-like dataset and a 2-step mnist32-cnn seed 1 (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hasched.zoo import data
from hasched.zoo.train import save_checkpoint, train_model
from idx_files import write_learnable


def make_store(root: Path, mp: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Write ``root/data`` (256 train, 128 test images) and ``root/models``.

    Returns:
        ``(data_dir, models_dir)``; ``mp`` forbids downloads until it is undone.
    """
    write_learnable(root / "data", 256, 128, seed=0, folders=("mnist",))
    mp.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no dl")))
    model, meta = train_model("mnist32-cnn", 1, data_dir=root / "data", train_subset=256,
                              max_steps=2, progress=False, download=False)
    save_checkpoint(model, meta, root / "models")
    return root / "data", root / "models"
