"""Tests for hasched.zoo.data: IDX parsing, lookup order, resizing. Never downloads."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hasched.errors import HaschedError
from hasched.zoo import data
from hasched.zoo.data import find_dataset_dir, load_dataset, read_idx, resize_bilinear

# Captured at import: the isolation fixture below removes it from the environment.
REAL_DATA_DIR = os.environ.get("HASCHED_DATA_DIR")
REAL_DOWNLOAD = data._download

TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def idx_bytes(arr: np.ndarray, magic: bytes | None = None) -> bytes:
    """Raw (uncompressed) IDX bytes of a uint8 array."""
    header = magic if magic is not None else bytes([0, 0, 0x08, arr.ndim])
    return header + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_gz(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw))
    return path


def make_folder(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> Path:
    """Write a complete synthetic IDX dataset folder."""
    rng = np.random.default_rng(seed)
    for (img, lab), n in ((TRAIN_FILES, n_train), (TEST_FILES, n_test)):
        write_gz(folder / img, idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        write_gz(folder / lab, idx_bytes(rng.integers(0, 10, (n,), dtype=np.uint8)))
    return folder


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env var, an empty cache and system dir, and downloads that fail the test."""
    monkeypatch.delenv("HASCHED_DATA_DIR", raising=False)
    # The suite runs with HASCHED_OFFLINE=1; these tests reach the download step on purpose
    # (with _download replaced, or a file:// mirror), so they lift it here.
    monkeypatch.delenv("HASCHED_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_cache_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(data, "_SYSTEM_DIR", tmp_path / "system")

    def no_download(*args, **kwargs):
        raise AssertionError("tests must never download")

    monkeypatch.setattr(data, "_download", no_download)
    return tmp_path


# --- IDX parsing -------------------------------------------------------------------------


def test_read_idx_takes_count_and_dims_from_header(tmp_path):
    arr = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)
    out = read_idx(write_gz(tmp_path / "x.gz", idx_bytes(arr)))
    assert out.shape == (3, 5, 7) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)
    labels = read_idx(write_gz(tmp_path / "y.gz", idx_bytes(np.array([3, 1, 4], np.uint8))))
    assert labels.tolist() == [3, 1, 4]


@pytest.mark.parametrize("magic", [b"\x00\x00\x0d\x03", b"\x01\x00\x08\x03", b"\x00\x00\x08\x07"])
def test_read_idx_rejects_bad_magic(tmp_path, magic):
    path = write_gz(tmp_path / "bad.gz", idx_bytes(np.zeros((2, 2, 2), np.uint8), magic=magic))
    with pytest.raises(HaschedError, match="magic.*bad.gz"):
        read_idx(path)


def test_read_idx_rejects_short_payload(tmp_path):
    raw = idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5]
    with pytest.raises(HaschedError, match=r"short\.gz.*48 bytes.*43"):
        read_idx(write_gz(tmp_path / "short.gz", raw))


def test_read_idx_rejects_extra_payload(tmp_path):
    raw = idx_bytes(np.zeros((3, 4, 4), np.uint8)) + b"\x00"
    with pytest.raises(HaschedError, match="long.gz"):
        read_idx(write_gz(tmp_path / "long.gz", raw))


def test_read_idx_rejects_truncated_header(tmp_path):
    with pytest.raises(HaschedError, match="hdr.gz"):
        read_idx(write_gz(tmp_path / "hdr.gz", b"\x00\x00\x08\x03\x00\x00"))


def test_read_idx_rejects_truncated_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(np.ones((10, 28, 28), np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(HaschedError, match="cut.gz"):
        read_idx(path)


def test_read_idx_rejects_non_gzip_and_missing(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not a gzip file at all")
    with pytest.raises(HaschedError, match="plain.gz"):
        read_idx(path)
    with pytest.raises(HaschedError, match="not found.*nope.gz"):
        read_idx(tmp_path / "nope.gz")


# --- lookup order ------------------------------------------------------------------------


def test_explicit_data_dir_accepts_folder_or_parent(isolated):
    folder = make_folder(isolated / "d" / "mnist")
    assert find_dataset_dir("mnist", folder) == folder.resolve()
    assert find_dataset_dir("mnist", isolated / "d") == folder.resolve()
    assert find_dataset_dir("mnist32", str(isolated / "d")) == folder.resolve()


def test_env_accepts_folder_or_parent(isolated, monkeypatch):
    folder = make_folder(isolated / "env" / "fashion-mnist")
    monkeypatch.setenv("HASCHED_DATA_DIR", str(folder.parent))
    assert find_dataset_dir("fashion-mnist") == folder.resolve()
    monkeypatch.setenv("HASCHED_DATA_DIR", str(folder))
    assert find_dataset_dir("fashion-mnist") == folder.resolve()


def test_lookup_order(isolated, monkeypatch):
    system = make_folder(isolated / "system" / "mnist")
    assert find_dataset_dir("mnist", download=False) == system.resolve()
    cache = make_folder(isolated / "cache" / "mnist")
    assert find_dataset_dir("mnist", download=False) == cache.resolve()
    env = make_folder(isolated / "env" / "mnist")
    monkeypatch.setenv("HASCHED_DATA_DIR", str(env.parent))
    assert find_dataset_dir("mnist", download=False) == env.resolve()
    explicit = make_folder(isolated / "explicit" / "mnist")
    assert find_dataset_dir("mnist", explicit, download=False) == explicit.resolve()


def test_incomplete_folder_is_skipped(isolated):
    partial = make_folder(isolated / "partial" / "mnist")
    (partial / TEST_FILES[1]).unlink()
    cache = make_folder(isolated / "cache" / "mnist")
    assert find_dataset_dir("mnist", partial) == cache.resolve()


def test_not_found_lists_every_place_and_never_downloads(isolated, monkeypatch):
    monkeypatch.setenv("HASCHED_DATA_DIR", str(isolated / "envdir"))
    with pytest.raises(HaschedError) as err:
        load_dataset("fashion-mnist", data_dir=isolated / "given", download=False)
    msg = str(err.value)
    for place in ("given", "envdir", "cache/fashion-mnist", "system/fashion-mnist"):
        assert place in msg
    assert "download (disabled)" in msg and "HASCHED_DATA_DIR" in msg and "--data-dir" in msg
    assert "\n" not in msg


def test_download_is_last_resort_and_failure_is_reported(isolated, monkeypatch):
    calls = []

    def failing_download(folder_name, target):
        calls.append((folder_name, target))
        raise HaschedError("network unreachable")

    monkeypatch.setattr(data, "_download", failing_download)
    with pytest.raises(HaschedError, match="network unreachable"):
        find_dataset_dir("mnist32")
    assert calls == [("mnist", isolated / "cache" / "mnist")]


def test_unknown_names(isolated):
    with pytest.raises(HaschedError, match="known datasets: fashion-mnist, mnist, mnist32"):
        load_dataset("cifar10")
    make_folder(isolated / "mnist")
    with pytest.raises(HaschedError, match="unknown split 'val'"):
        load_dataset("mnist", "val", isolated)


# --- loading -----------------------------------------------------------------------------


def test_load_dataset_tensors_and_cache(isolated):
    folder = make_folder(isolated / "mnist", n_train=6, n_test=4)
    ds = load_dataset("mnist", "train", isolated)
    assert ds.images.shape == (6, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (6,) and ds.labels.dtype == torch.int64
    raw = read_idx(folder / TRAIN_FILES[0])
    torch.testing.assert_close(ds.images[:, 0], torch.from_numpy(raw.copy()).float() / 255)
    assert (ds.name, ds.split, ds.source, len(ds)) == ("mnist", "train", folder.resolve(), 6)
    assert len(ds.fingerprint) == 16
    test = load_dataset("mnist", "test", folder)
    assert len(test) == 4 and test.fingerprint != ds.fingerprint
    # Served from the in-process cache: same tensor objects.
    assert load_dataset("mnist", "train", folder).images is ds.images


def test_count_mismatch_is_reported(isolated):
    folder = make_folder(isolated / "mnist", n_train=6)
    write_gz(folder / TRAIN_FILES[1], idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(HaschedError, match="6 images but 5 labels"):
        load_dataset("mnist", "train", folder)


def test_resize_matches_hand_computed_half_pixel_bilinear():
    # Half-pixel centres, 2 -> 4: output i samples source (i + 0.5) / 2 - 0.5, clamped to
    # [0, 1] -> weights 0, 0.25, 0.75, 1 along each axis. For f(r, c) = 2r + c:
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    cols = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = 2 * cols[:, None] + cols[None, :]
    torch.testing.assert_close(resize_bilinear(x, 4)[0, 0], expected)


def test_mnist32_is_resized_mnist(isolated):
    make_folder(isolated / "mnist", n_train=3, n_test=5)
    small = load_dataset("mnist", "test", isolated)
    big = load_dataset("mnist32", "test", isolated)
    assert big.images.shape == (5, 1, 32, 32)
    assert float(big.images.min()) >= 0.0 and float(big.images.max()) <= 1.0
    torch.testing.assert_close(big.images, resize_bilinear(small.images, 32).clamp(0, 1))
    assert torch.equal(big.labels, small.labels) and big.fingerprint == small.fingerprint


@pytest.mark.skipif(REAL_DATA_DIR is None, reason="HASCHED_DATA_DIR not set")
def test_real_mnist32_test_split():
    ds = load_dataset("mnist32", "test", REAL_DATA_DIR, download=False)
    assert ds.images.shape == (10000, 1, 32, 32)
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
    counts = torch.bincount(ds.labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_download_verifies_checksums_with_local_mirror(isolated, monkeypatch):
    # A file:// "mirror" exercises the real download code without any network access.
    mirror = make_folder(isolated / "mirror")
    md5s = {f: data._md5_file(mirror / f) for f in TRAIN_FILES + TEST_FILES}
    monkeypatch.setattr(data, "_download", REAL_DOWNLOAD)
    monkeypatch.setattr(data, "_MIRRORS", {"mnist": (mirror.as_uri() + "/",)})
    monkeypatch.setattr(data, "_MD5", {"mnist": {**md5s, TEST_FILES[0]: "0" * 32}})
    with pytest.raises(HaschedError, match="could not download t10k-images.*checksum mismatch"):
        find_dataset_dir("mnist32")
    cache = isolated / "cache" / "mnist"
    # Verified files are kept, the bad one never lands under its real name, no temp files.
    assert sorted(p.name for p in cache.iterdir()) == sorted(TRAIN_FILES)
    monkeypatch.setattr(data, "_MD5", {"mnist": md5s})
    assert find_dataset_dir("mnist32") == cache.resolve()
    assert len(load_dataset("mnist", "test", download=False)) == 4


def test_offline_env_disables_download(isolated, monkeypatch):
    monkeypatch.setenv("HASCHED_OFFLINE", "1")
    with pytest.raises(HaschedError, match="HASCHED_OFFLINE"):
        data.find_dataset_dir("mnist")


def test_parse_image_range():
    from hasched.zoo.data import parse_image_range

    assert parse_image_range(None, 10) == slice(0, 10)
    assert parse_image_range(4, 10) == slice(0, 4)
    assert parse_image_range("3:7", 10) == slice(3, 7)
    assert parse_image_range(":5", 10) == slice(0, 5)
    assert parse_image_range("6:", 10) == slice(6, 10)
    assert parse_image_range(slice(2, None), 10) == slice(2, 10)
    for bad, match in (("x", "bad image range"), ("5:5", "outside 0..10 or empty"),
                       (11, "outside"), (slice(0, 10, 2), "contiguous")):
        with pytest.raises(HaschedError, match=match):
            parse_image_range(bad, 10)


def test_input_adapter():
    from hasched.zoo.data import InputAdapter

    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    same = InputAdapter((1, 28, 28), (1, 28, 28))
    assert same.is_identity and same(x) is x and same.describe()["steps"] == []
    rgb = InputAdapter((1, 28, 28), (3, 28, 28))
    assert torch.equal(rgb(x), x.expand(3, 3, 28, 28)) and not rgb.is_identity
    down = InputAdapter((1, 28, 28), (1, 14, 14))
    # 28 -> 14 half-pixel bilinear without antialiasing = the mean of each 2x2 block.
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool2d(x, 2))
    with pytest.raises(HaschedError, match="cannot adapt 3-channel images to a 2-channel"):
        InputAdapter((3, 28, 28), (2, 28, 28))
