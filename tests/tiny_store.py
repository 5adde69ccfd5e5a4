"""A synthetic MNIST-like dataset and a 2-step mnist32-cnn seed 1 (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hasched.zoo import data
from hasched.zoo.train import save_checkpoint, train_model
from idx_files import FILES, write_idx


def make_store(root: Path, mp: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Write ``root/data`` (256 train, 128 test images) and ``root/models``.

    Returns:
        ``(data_dir, models_dir)``; ``mp`` forbids downloads until it is undone.
    """
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("test", 128)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, lab in enumerate(labels):
            images[i, 2 * lab + 4: 2 * lab + 6, :] = 255
        (root / "data" / "mnist").mkdir(parents=True, exist_ok=True)
        write_idx(root / "data" / "mnist" / FILES[split][0], images)
        write_idx(root / "data" / "mnist" / FILES[split][1], labels)
    mp.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no dl")))
    model, meta = train_model("mnist32-cnn", 1, data_dir=root / "data", train_subset=256,
                              max_steps=2, progress=False, download=False)
    save_checkpoint(model, meta, root / "models")
    return root / "data", root / "models"
