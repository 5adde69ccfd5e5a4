"""Datasets: IDX parsing, folder lookup, optional checksummed download, in-process cache.

Three dataset names are known: ``mnist`` and ``fashion-mnist`` (28x28, the folder names of the
standard IDX distributions) and ``mnist32``, MNIST resized to 32x32 the way the paper's
TensorFlow pipeline does it (``tf.image.resize`` default: bilinear, half-pixel centres, no
antialiasing).

A model that expects another input shape (e.g. resnet18 with 3 channels at 32x32 on
Fashion-MNIST) is fed through an :class:`InputAdapter`: the same bilinear resize, then the
grey channel repeated. No normalisation is applied: every model here is trained from scratch
on ``[0, 1]`` images.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import struct
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hasched.errors import HaschedError
from hasched.io import atomic_write, make_dirs

__all__ = [
    "Dataset",
    "InputAdapter",
    "dataset_classes",
    "dataset_shape",
    "find_dataset_dir",
    "list_datasets",
    "load_dataset",
    "parse_image_range",
    "read_idx",
    "resize_bilinear",
]

SPLITS = ("train", "test")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_ALL_FILES = _FILES["train"] + _FILES["test"]

# Published MD5s of the original distributions (the ones torchvision checks).
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": (
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
}
# Dataset name -> (folder holding the IDX files, side length to resize to or None).
_DATASETS: dict[str, tuple[str, int | None]] = {
    "mnist": ("mnist", None),
    "mnist32": ("mnist", 32),
    "fashion-mnist": ("fashion-mnist", None),
}
_SYSTEM_DIR = Path("/usr/share/datasets")


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset, fully in memory.

    Attributes:
        images: ``float32`` tensor ``[N, 1, H, W]`` with values in ``[0, 1]``.
        labels: ``int64`` tensor ``[N]``.
        name: Dataset name, e.g. ``"mnist32"``.
        split: ``"train"`` or ``"test"``.
        fingerprint: Short sha256 hex of the raw files' bytes (identifies the data used).
        source: Folder the IDX files were read from.
    """

    images: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    name: str
    split: str
    fingerprint: str
    source: Path

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_DATASETS)


def dataset_shape(name: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of one image of dataset ``name`` (all known datasets are grey).

    Raises:
        HaschedError: If ``name`` is unknown.
    """
    _dataset_folder(name)
    side = _DATASETS[name][1] or 28
    return (1, side, side)


def dataset_classes(name: str) -> int:
    """Number of classes of dataset ``name`` (labels are ``0 .. n-1``).

    Raises:
        HaschedError: If ``name`` is unknown.
    """
    _dataset_folder(name)
    return 10


@dataclass(frozen=True)
class InputAdapter:
    """Turns a dataset's images into the input a model expects.

    Resizing is :func:`resize_bilinear` (TF's default, as for ``mnist32``) clamped to
    ``[0, 1]``; a grey image becomes C channels by repetition. The identity adapter returns
    its input unchanged (same tensor object), so models fed their own dataset see exactly
    the data they always saw.

    Attributes:
        source: ``(C, H, W)`` of the dataset's images.
        target: ``(C, H, W)`` the model expects.
    """

    source: tuple[int, int, int]
    target: tuple[int, int, int]

    def __post_init__(self) -> None:
        (c_in, _, _), (c_out, h, w) = self.source, self.target
        if c_in != c_out and c_in != 1:
            raise HaschedError(
                f"cannot adapt {c_in}-channel images to a {c_out}-channel model input"
            )
        if min(c_out, h, w) < 1:
            raise HaschedError(f"bad model input shape {self.target}")

    @property
    def is_identity(self) -> bool:
        return tuple(self.source) == tuple(self.target)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C_src, H_src, W_src)`` -> ``(N, C, H, W)`` (same object when identity)."""
        c, h, w = self.target
        out = images
        if tuple(images.shape[2:]) != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False,
                                antialias=False).clamp_(0.0, 1.0)
        if out.shape[1] != c:
            out = out.repeat(1, c, 1, 1)  # (N, 1, H, W) -> (N, C, H, W)
        return out

    def describe(self) -> dict:
        """JSON-able record of what the adapter does (for results' ``info``)."""
        steps = []
        if tuple(self.source[1:]) != tuple(self.target[1:]):
            steps.append(f"resize {self.source[1]}x{self.source[2]} -> "
                         f"{self.target[1]}x{self.target[2]} (bilinear, half-pixel)")
        if self.source[0] != self.target[0]:
            steps.append(f"repeat channels {self.source[0]} -> {self.target[0]}")
        return {"from": list(self.source), "to": list(self.target), "steps": steps}


def parse_image_range(spec: str | int | slice | None, n_total: int) -> slice:
    """Which images to use: ``None`` (all), ``N`` (the first N), ``"a:b"`` or a slice.

    Raises:
        HaschedError: For a malformed, empty or out-of-range selection.
    """
    if spec is None or spec == "":
        return slice(0, n_total)
    if isinstance(spec, slice):
        if spec.step not in (None, 1):
            raise HaschedError(f"image range {spec!r} must be contiguous")
        start = 0 if spec.start is None else spec.start
        stop = n_total if spec.stop is None else spec.stop
    else:
        text = str(spec).strip()
        try:
            if ":" in text:
                lo, _, hi = text.partition(":")
                start = int(lo) if lo.strip() else 0
                stop = int(hi) if hi.strip() else n_total
            else:
                start, stop = 0, int(text)
        except ValueError:
            raise HaschedError(f"bad image range {spec!r}; use N, A:B, A: or :B") from None
    if not (0 <= start < stop <= n_total):
        raise HaschedError(f"image range {spec!r} is outside 0..{n_total} or empty")
    return slice(start, stop)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one gzip-compressed IDX file of unsigned bytes.

    The element count and dimensions come from the header, never from assumptions.

    Args:
        path: Path to a ``*-idx{1,3}-ubyte.gz`` file.

    Returns:
        A ``uint8`` array of the header's shape.

    Raises:
        HaschedError: If the file is missing, not gzip, truncated, or has a bad header.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise HaschedError(f"dataset file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise HaschedError(f"corrupt or truncated dataset file {path}: {exc}") from None
    return _parse_idx(raw, path)


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4:
        raise HaschedError(f"truncated IDX file {path}: no header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    # Only unsigned bytes (0x08) occur in (Fashion-)MNIST; anything else is not a dataset file.
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 3:
        raise HaschedError(f"bad IDX magic number in {path}: 0x{raw[:4].hex()}")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise HaschedError(f"truncated IDX file {path}: incomplete header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_end])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header_end != expected:
        raise HaschedError(
            f"corrupt IDX file {path}: header says {'x'.join(map(str, dims))} = {expected} bytes"
            f" of data, file has {len(raw) - header_end}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(dims)


def resize_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` images like ``tf.image.resize`` does by default.

    TF's default is bilinear with half-pixel centres and no antialiasing, which is exactly
    PyTorch's ``align_corners=False, antialias=False``.
    """
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _ALL_FILES)


def _candidates(folder_name: str, data_dir: str | Path | None) -> list[tuple[str, Path]]:
    """Places to look for ``folder_name``, in lookup order, each with a label for errors."""
    places: list[tuple[str, Path]] = []
    for label, base in (
        ("data_dir", data_dir),
        ("HASCHED_DATA_DIR", os.environ.get("HASCHED_DATA_DIR") or None),
    ):
        if base is None:
            continue
        base = Path(base).expanduser()
        # Accept both the dataset folder itself and its parent holding mnist/, fashion-mnist/.
        places.append((label, base))
        places.append((label, base / folder_name))
    places.append(("cache", _cache_root() / folder_name))
    places.append(("system", _SYSTEM_DIR / folder_name))
    return places


def _cache_root() -> Path:
    return Path("~/.cache/hasched/datasets").expanduser()


def find_dataset_dir(
    name: str, data_dir: str | Path | None = None, *, download: bool = True
) -> Path:
    """Locate (or download) the folder holding the IDX files of dataset ``name``.

    Lookup order: ``data_dir`` (the folder itself or its parent), ``$HASCHED_DATA_DIR`` (same
    two forms), ``~/.cache/hasched/datasets/<folder>``, ``/usr/share/datasets/<folder>``, then
    a checksummed download into the cache when ``download`` is true and
    ``$HASCHED_OFFLINE`` is unset (the test suite sets it: tests never download).

    Raises:
        HaschedError: If ``name`` is unknown or no location has the four files.
    """
    folder_name = _dataset_folder(name)
    places = _candidates(folder_name, data_dir)
    for _, place in places:
        if _has_files(place):
            return place.resolve()
    tried = [str(p) for _, p in places]
    if download and not os.environ.get("HASCHED_OFFLINE"):
        target = _cache_root() / folder_name
        try:
            _download(folder_name, target)
            return target.resolve()
        except HaschedError as exc:
            tried.append(f"download ({exc})")
    else:
        tried.append("download (disabled: HASCHED_OFFLINE is set)" if download
                     else "download (disabled)")
    raise HaschedError(
        f"dataset {name!r} not found; tried: {'; '.join(tried)}. Put the four IDX .gz files"
        f" in a folder named {folder_name!r} and set HASCHED_DATA_DIR or pass --data-dir"
    )


def _dataset_folder(name: str) -> str:
    try:
        return _DATASETS[name][0]
    except KeyError:
        raise HaschedError(
            f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}"
        ) from None


def _download(folder_name: str, target: Path) -> None:
    """Download the four files of ``folder_name`` into ``target``, verifying MD5 checksums.

    Each file is written to a temporary file in ``target`` and renamed into place only once its
    checksum matches, so an interrupted download never leaves a half file under the real name.
    """
    make_dirs(target)
    for filename in _ALL_FILES:
        dest = target / filename
        if dest.is_file() and _md5_file(dest) == _MD5[folder_name][filename]:
            continue
        errors = []
        for mirror in _MIRRORS[folder_name]:
            try:
                _fetch(mirror + filename, dest, _MD5[folder_name][filename])
                break
            except (OSError, ValueError) as exc:
                errors.append(f"{mirror}: {exc}")
        else:
            raise HaschedError(f"could not download {filename}: {' | '.join(errors)}")


def _fetch(url: str, dest: Path, md5: str, timeout: float = 60.0) -> None:
    # The files are at most ~30 MB: held in memory until the checksum matches, then written
    # atomically (a network error is an OSError, tried on the next mirror; a failed write
    # is a HaschedError naming the file, which ends the download).
    digest = hashlib.md5(usedforsecurity=False)
    buf = io.BytesIO()
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            buf.write(chunk)
    if digest.hexdigest() != md5:
        raise ValueError(f"checksum mismatch (md5 {digest.hexdigest()}, expected {md5})")
    atomic_write(dest, buf.getvalue())


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _load_cached(folder: Path, split: str, size: int | None) -> tuple[torch.Tensor, ...]:
    """Parse and convert one split; cached because campaigns load the same data many times."""
    image_file, label_file = (folder / f for f in _FILES[split])
    sha = hashlib.sha256()
    for f in (image_file, label_file):
        sha.update(f.read_bytes())
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise HaschedError(
            f"unexpected IDX shapes in {folder}: images {images.shape}, labels {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise HaschedError(
            f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split"
        )
    if labels.size and labels.max() > 9:
        raise HaschedError(f"{label_file}: label {int(labels.max())} out of range 0..9")
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    if size is not None:
        x = resize_bilinear(x, size).clamp_(0.0, 1.0)
    y = torch.from_numpy(labels.astype(np.int64))
    # Callers share these tensors through the cache; read-only flags don't exist in torch, so
    # they are documented as must-not-modify and handed out as-is to avoid copies.
    return x, y, sha.hexdigest()[:16]


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
) -> Dataset:
    """Load one split of a dataset as tensors.

    The returned tensors are shared with an in-process cache: do not modify them in place.

    Args:
        name: One of :func:`list_datasets`.
        split: ``"train"`` or ``"test"``.
        data_dir: Folder holding the IDX files, or its parent; see :func:`find_dataset_dir`.
        download: Allow downloading into ``~/.cache/hasched/datasets`` as a last resort.

    Returns:
        The :class:`Dataset`.

    Raises:
        HaschedError: Unknown name/split, data not found, or corrupt files.
    """
    if split not in SPLITS:
        raise HaschedError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    folder = find_dataset_dir(name, data_dir, download=download)
    images, labels, fingerprint = _load_cached(folder, split, _DATASETS[name][1])
    return Dataset(images, labels, name, split, fingerprint, folder)
