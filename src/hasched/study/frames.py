"""``hasched frames``: generated moving-object sequences in an output folder.

The folder holds ``frames.hsf`` (:mod:`hasched.zoo.frames`), ``strip.png`` (the first
sequences, one per row), optionally ``preview.gif``, and ``config.json``. Running the same
settings into the same folder again rewrites identical bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hasched.errors import HaschedError
from hasched.io import check_out_dir, claim_out_dir
from hasched.zoo.frames import FRAMES_FILE, Motion, generate_sequences, load_frames, save_frames

__all__ = ["write_frames"]


def _excluded_sources(exclude: str | Path, dataset: str, split: str) -> np.ndarray:
    """Sorted source indices of another frame set of the same dataset and split."""
    other = load_frames(exclude)
    if (other.header.get("dataset"), other.header.get("split")) != (dataset, split):
        raise HaschedError(f"the frames to exclude ({exclude}) are of "
                           f"{other.header.get('dataset')} {other.header.get('split')}, "
                           f"not {dataset} {split}")
    return np.unique(other.source_index.astype(np.int64))


def write_frames(out: str | Path, dataset: str, sequences: int, length: int, motion: Motion,
                 seed: int, *, split: str = "test", images: str | None = None,
                 exclude: str | Path | None = None, data_dir: str | Path | None = None,
                 gif: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Generates the sequences of ``dataset`` into the folder ``out``; returns a summary.

    ``images`` (``N``, ``A:B``, ``A:`` or ``:B``) restricts the source images to a range of
    the split, so that two frame sets (evaluation and calibration) can be made from
    disjoint images; ``source_index`` stays an index into the whole split. ``exclude`` (a
    frames file or folder of the same dataset and split) removes that set's source images
    from the candidates: calibration frames held out from the evaluation frames but drawn
    from the same images otherwise (the two halves of the MNIST test split differ: the
    recipe-trained mnist32-cnn is 96.1 % accurate on the first, 97.9 % on the second).
    """
    from hasched.report.reuse import frame_gif, frame_strip
    from hasched.zoo.data import load_dataset, parse_image_range

    config = {"hasched": "frames", "dataset": dataset, "split": split, "sequences": sequences,
              "length": length, "motion": motion.to_dict(), "seed": seed}
    if images is not None:  # absent otherwise, so older frames folders keep their identity
        config["images"] = images
    held = None
    if exclude is not None:
        held = _excluded_sources(exclude, dataset, split)
        config["exclude"] = {"sources": len(held), "sha256": hashlib.sha256(
            held.tobytes()).hexdigest()[:16]}

    def compatible(saved: dict, path: Path) -> None:
        if saved != config:
            raise HaschedError(f"{path} holds frames made with other settings; use another "
                               "--out")

    check_out_dir(out, what="frames", compatible=compatible)
    ds = load_dataset(dataset, split, data_dir)
    sl = parse_image_range(images, int(ds.images.shape[0]))
    info = {"dataset": dataset, "split": split, "dataset_fingerprint": ds.fingerprint}
    if images is not None:
        info["images"] = [sl.start, sl.stop]
    cand = np.arange(sl.start, sl.stop)  # candidate source images (split indices)
    if held is not None:
        info["exclude"] = config["exclude"]
        cand = np.setdiff1d(cand, held)
    idx = torch.from_numpy(cand)
    fs = generate_sequences(ds.images[idx], ds.labels[idx], sequences, length, motion, seed,
                            info=info)
    fs = replace(fs, source_index=cand[fs.source_index].astype(np.int32))
    out = Path(out)
    with claim_out_dir(out, config, log=log):
        save_frames(fs, out / FRAMES_FILE)
        frame_strip(fs.frames, out / "strip.png")
        if gif:
            frame_gif(fs.frames, out / "preview.gif")
    changed = (fs.frames[:, 1:] != fs.frames[:, :-1]).mean() if length > 1 else 0.0
    return {"file": str(out / FRAMES_FILE), "sequences": sequences, "length": length,
            "shape": list(fs.frames.shape), "pixels_changed": float(changed)}
