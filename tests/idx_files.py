"""Writes tiny IDX datasets for tests (shared by several test modules)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def write_idx(path: Path, arr: np.ndarray) -> None:
    """A gzip IDX file of unsigned bytes with ``arr``'s shape in the header."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


def write_learnable(root: Path, n_train: int = 128, n_test: int = 32, seed: int = 1,
                    folders: tuple[str, ...] = ("mnist", "fashion-mnist")) -> Path:
    """``root/<folder>`` for each folder (default ``mnist`` and ``fashion-mnist``) with a
    learnable task: each image is noise plus a bright row band whose position is its label.
    One generator seeded ``seed`` draws every folder and split in order."""
    rng = np.random.default_rng(seed)
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            labels = rng.integers(0, 10, n, dtype=np.uint8)
            images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
            for i, lab in enumerate(labels):
                images[i, 2 * lab + 4 : 2 * lab + 6, :] = 255
            write_idx(root / folder / FILES[split][0], images)
            write_idx(root / folder / FILES[split][1], labels)
    return root
