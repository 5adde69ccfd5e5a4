"""Generated frame sequences: the motion model by a loop oracle, byte-for-byte
reproducibility, and a loader that names what is wrong with a damaged file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hasched.errors import HaschedError
from hasched.zoo.frames import (
    Motion,
    _shift,
    generate_sequences,
    load_frames,
    save_frames,
)


def _images(n: int = 12, side: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, side, side)
    x[:, :, 4:12, 5:11] = torch.rand(n, 1, 8, 6, generator=g)  # an object with margins
    return x, torch.arange(n) % 10


def test_translation_follows_the_motion_model():
    x, y = _images()
    fs = generate_sequences(x, y, 8, 20, Motion(speed=2, max_offset=3), seed=5)
    still = np.round(x[fs.source_index.astype(np.int64), 0].double().numpy() * 255).astype(
        np.uint8)
    assert len(set(fs.source_index.tolist())) == 8  # distinct sources
    assert np.array_equal(fs.labels, y.numpy()[fs.source_index.astype(np.int64)])
    off = fs.offsets.astype(int)
    assert np.abs(off).max() <= 3
    step = np.abs(np.diff(off, axis=1))
    assert step.max() <= 2 and (step.sum(-1) > 0).all()  # moves every frame, <= 2 px / axis
    for s in range(8):
        for t in range(20):  # loop oracle: each frame is the still image moved by its offset
            dy, dx = off[s, t]
            want = np.zeros_like(still[s])
            for i in range(16):
                for j in range(16):
                    if 0 <= i - dy < 16 and 0 <= j - dx < 16:
                        want[i, j] = still[s][i - dy, j - dx]
            assert np.array_equal(fs.frames[s, t], want)


def test_bounce_reflects_position_and_velocity():
    from hasched.zoo.frames import _bounce

    assert _bounce(2, 2, 3) == (2, -2)  # 4 reflects at 3 to 2
    assert _bounce(-3, -1, 3) == (-2, 1)
    assert _bounce(0, 1, 3) == (1, 1)
    assert np.array_equal(_shift(np.arange(9, dtype=np.uint8).reshape(3, 3), 1, -1),
                          np.array([[0, 0, 0], [1, 2, 0], [4, 5, 0]], dtype=np.uint8))


def test_same_seed_same_bytes_other_seed_other_frames(tmp_path):
    x, y = _images()
    m = Motion(speed=1, max_offset=2, rotation=10.0, noise=3.0)
    a = save_frames(generate_sequences(x, y, 6, 5, m, seed=3), tmp_path / "a.hsf")
    b = save_frames(generate_sequences(x, y, 6, 5, m, seed=3), tmp_path / "b.hsf")
    c = save_frames(generate_sequences(x, y, 6, 5, m, seed=4), tmp_path / "c.hsf")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    back = load_frames(a)
    ref = generate_sequences(x, y, 6, 5, m, seed=3)
    for k, v in ref.arrays().items():
        assert np.array_equal(back.arrays()[k], v) and back.arrays()[k].dtype == v.dtype
    assert back.header["motion"] == m.to_dict() and back.header["seed"] == 3


def test_still_sequences_do_not_change():
    x, y = _images()
    fs = generate_sequences(x, y, 3, 4, Motion(speed=0, max_offset=2), seed=1)
    assert (fs.frames == fs.frames[:, :1]).all()


@pytest.mark.parametrize("damage, needle", [
    (lambda b: b"XXXXXXXX" + b[8:], "bad magic"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
    (lambda b: b + b"\0", "unexpected bytes"),
    (lambda b: b[:12] + b"}" + b[13:], "not valid JSON"),
])
def test_damaged_files_are_named(tmp_path, damage, needle):
    x, y = _images()
    path = save_frames(generate_sequences(x, y, 2, 3, Motion(1, 2), seed=1), tmp_path / "f.hsf")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(HaschedError, match=needle) as e:
        load_frames(path)
    assert "f.hsf" in str(e.value)
    with pytest.raises(HaschedError, match="not found"):
        load_frames(tmp_path / "missing")


def test_bad_settings_are_refused():
    x, y = _images()
    with pytest.raises(HaschedError, match="speed"):
        Motion(speed=3, max_offset=2)
    with pytest.raises(HaschedError, match="distinct"):
        generate_sequences(x, y, 13, 3, Motion(1, 2), seed=1)
    with pytest.raises(HaschedError, match="off the"):
        generate_sequences(x, y, 2, 3, Motion(1, 8), seed=1)
