"""Moving-object frame sequences made from a dataset's images, for computation-reuse studies.

Consecutive video frames are similar; :func:`generate_sequences` makes such frames from
still images so that a reuse engine (:mod:`hasched.reuse`) has something to reuse.

**Motion model** (every draw comes from one ``numpy`` PCG64 generator seeded with ``seed``,
in a fixed order, so the frames are byte-for-byte reproducible from the seed):

1. *Source*: ``sequences`` distinct images of the split, drawn without replacement; a
   sequence's label is its source image's label. Images are the dataset's own pipeline
   (``mnist32``: the bilinear 32x32 resize) rounded to ``uint8`` grey levels.
2. *Translation* (always): an integer offset ``(dy, dx)``, starting uniform in
   ``[-max_offset, max_offset]^2``, with a velocity ``(vy, vx)`` uniform in
   ``{-speed..speed}^2`` minus ``(0, 0)`` (``speed = 0``: a still sequence). Each frame moves
   by the velocity; a coordinate that would leave ``[-max_offset, max_offset]`` *bounces*:
   its position is reflected at the bound and its velocity flips sign. The shifted image is
   cropped at the canvas edge and the uncovered area is 0 (the canvas is the image size,
   so the model sees its usual input shape).
3. *Rotation* (``rotation > 0``): an angle starting uniform in ``[-rotation, rotation]``
   degrees, turning by a per-sequence angular velocity uniform in ``[-rotation/4,
   rotation/4]`` degrees per frame, bouncing at ``+-rotation``; applied (bilinear, about the
   image centre) before the translation.
4. *Noise* (``noise > 0``): i.i.d. Gaussian noise of standard deviation ``noise`` grey
   levels on every pixel of every frame, rounded and clipped to ``0..255`` (sensor noise;
   it lowers reuse at fine quantisation).

**File format** (``frames.hsf``, one file): the 8 magic bytes ``HSCHSEQ1``, a big-endian
``uint32`` header length, the header (UTF-8 JSON, sorted keys), then the arrays the header
lists, each C-ordered little-endian, with their SHA-256 in the header: ``frames`` ``uint8
(S, L, H, W)``, ``labels`` ``uint8 (S,)``, ``source_index`` ``int32 (S,)`` (index in the
split), ``offsets`` ``int16 (S, L, 2)`` (``dy, dx`` per frame) and ``angles`` ``float32 (S,
L)`` (degrees). The header holds no time or path, so equal settings give equal bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hasched.errors import HaschedError
from hasched.io import atomic_write, os_error
from hasched.schema import check_fields

__all__ = ["Motion", "FrameSet", "FRAMES_FILE", "generate_sequences", "save_frames",
           "load_frames", "frames_to_tensor"]

FRAMES_FILE = "frames.hsf"
_MAGIC = b"HSCHSEQ1"
_VERSION = 1
_DTYPES = {"uint8": "<u1", "int16": "<i2", "int32": "<i4", "float32": "<f4"}


@dataclass(frozen=True)
class Motion:
    """How the object moves from frame to frame (see the module docstring).

    Attributes:
        speed: Maximum translation per frame and axis, in pixels (0: still frames).
        max_offset: Largest offset from the centre position, in pixels (bounce bound). The
            default is 1 px because the paper models are not shift-invariant: recipe-trained
            mnist32-cnn (one conv and pool, then dense layers) is 96.0 / 94.3 / 85.3 / 70.8 /
            54.9 % accurate on frames whose offsets bounce within 0 / 1 / 2 / 3 / 4 px.
        rotation: Largest rotation angle in degrees (0: none).
        noise: Standard deviation of per-frame Gaussian pixel noise, in grey levels.
    """

    speed: int = 1
    max_offset: int = 1
    rotation: float = 0.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.speed <= max(self.max_offset, 0):
            raise HaschedError(f"motion speed must be in 0..max_offset ({self.max_offset}) px "
                               f"per frame, got {self.speed}")
        if self.max_offset < 0 or not 0 <= self.rotation <= 90 or self.noise < 0:
            raise HaschedError(f"bad motion {self}: need max_offset >= 0, rotation in 0..90 "
                               "degrees and noise >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FrameSet:
    """Sequences of frames with one label each.

    Attributes:
        frames: ``uint8 (S, L, H, W)``. labels: ``uint8 (S,)``.
        source_index: ``int32 (S,)`` image index in the dataset split.
        offsets: ``int16 (S, L, 2)`` translation ``(dy, dx)`` of every frame.
        angles: ``float32 (S, L)`` rotation in degrees of every frame.
        header: Generation settings (dataset, split, fingerprint, seed, motion).
    """

    frames: np.ndarray
    labels: np.ndarray
    source_index: np.ndarray
    offsets: np.ndarray
    angles: np.ndarray
    header: dict

    @property
    def n_sequences(self) -> int:
        return int(self.frames.shape[0])

    @property
    def length(self) -> int:
        return int(self.frames.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"frames": self.frames, "labels": self.labels,
                "source_index": self.source_index, "offsets": self.offsets,
                "angles": self.angles}

    def select(self, start: int, stop: int) -> FrameSet:
        """Sequences ``start .. stop-1`` (the header is kept)."""
        return FrameSet(**{k: v[start:stop] for k, v in self.arrays().items()},
                        header=self.header)


def _bounce(pos: int, vel: int, bound: int) -> tuple[int, int]:
    """One step of a coordinate in ``[-bound, bound]``, reflected at the bounds."""
    pos += vel
    if pos > bound:
        pos, vel = 2 * bound - pos, -vel
    elif pos < -bound:
        pos, vel = -2 * bound - pos, -vel
    return pos, vel


def _trajectory(rng: np.random.Generator, motion: Motion, length: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Offsets ``(L, 2)`` and angles ``(L,)`` of one sequence (fixed draw order)."""
    E, v = motion.max_offset, motion.speed
    pos = [int(p) for p in rng.integers(-E, E + 1, size=2)]
    vel = [0, 0]
    while v > 0 and vel == [0, 0]:
        vel = [int(p) for p in rng.integers(-v, v + 1, size=2)]
    ang = omega = 0.0
    if motion.rotation > 0:
        ang = float(rng.uniform(-motion.rotation, motion.rotation))
        omega = float(rng.uniform(-motion.rotation / 4, motion.rotation / 4))
    offsets = np.zeros((length, 2), dtype=np.int16)
    angles = np.zeros(length, dtype=np.float32)
    for t in range(length):
        offsets[t], angles[t] = pos, ang
        for a in range(2):
            pos[a], vel[a] = _bounce(pos[a], vel[a], E)
        ang += omega
        if abs(ang) > motion.rotation:
            ang = float(np.sign(ang)) * 2 * motion.rotation - ang
            omega = -omega
    return offsets, angles


def _rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Bilinear rotation of a ``(H, W)`` uint8 image about its centre (zeros outside)."""
    if degrees == 0:
        return img
    H, W = img.shape
    th = np.deg2rad(degrees)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    cy, cx = (H - 1) / 2, (W - 1) / 2
    # Inverse mapping: where each output pixel comes from.
    sy = np.cos(th) * (yy - cy) + np.sin(th) * (xx - cx) + cy
    sx = -np.sin(th) * (yy - cy) + np.cos(th) * (xx - cx) + cx
    y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    fy, fx = sy - y0, sx - x0
    src = np.pad(img.astype(np.float64), 1)  # index -1 and H read zeros

    def at(y, x):
        return src[np.clip(y, -1, H) + 1, np.clip(x, -1, W) + 1]

    out = ((1 - fy) * (1 - fx) * at(y0, x0) + (1 - fy) * fx * at(y0, x0 + 1)
           + fy * (1 - fx) * at(y0 + 1, x0) + fy * fx * at(y0 + 1, x0 + 1))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` moved by ``(dy, dx)`` pixels, cropped at the edges, zeros uncovered."""
    H, W = img.shape
    out = np.zeros_like(img)
    ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    out[yd, xd] = img[ys, xs]
    return out


def generate_sequences(images: torch.Tensor, labels: torch.Tensor, sequences: int,
                       length: int, motion: Motion, seed: int, *, info: dict | None = None
                       ) -> FrameSet:
    """Moving-object sequences from still images (deterministic in ``seed``).

    Args:
        images: ``(N, 1, H, W)`` float images in ``[0, 1]`` (a dataset split).
        labels: ``(N,)`` class indices.
        sequences: Number of sequences ``S`` (at most ``N``: sources are distinct).
        length: Frames per sequence ``L``.
        motion: The motion model.
        seed: Seed of every draw.
        info: Recorded in the header (dataset, split, fingerprint).
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise HaschedError(f"frames are made from grey images (N, 1, H, W), got "
                           f"{tuple(images.shape)}")
    n = int(images.shape[0])
    if not 1 <= sequences <= n or length < 1:
        raise HaschedError(f"need 1 <= sequences <= {n} (distinct source images) and "
                           f"length >= 1, got {sequences} x {length}")
    H, W = images.shape[2:]
    if 2 * motion.max_offset >= min(H, W):
        raise HaschedError(f"max_offset {motion.max_offset} moves a {H}x{W} image off the "
                           "canvas; use a smaller one")
    rng = np.random.Generator(np.random.PCG64(seed))
    src = np.sort(rng.choice(n, size=sequences, replace=False)).astype(np.int32)
    still = np.round(images[torch.from_numpy(src.astype(np.int64)), 0].double().numpy()
                     * 255.0).clip(0, 255).astype(np.uint8)  # (S, H, W)
    frames = np.zeros((sequences, length, H, W), dtype=np.uint8)
    offsets = np.zeros((sequences, length, 2), dtype=np.int16)
    angles = np.zeros((sequences, length), dtype=np.float32)
    for s in range(sequences):
        offsets[s], angles[s] = _trajectory(rng, motion, length)
        for t in range(length):
            img = _rotate(still[s], float(angles[s, t]))
            frames[s, t] = _shift(img, int(offsets[s, t, 0]), int(offsets[s, t, 1]))
        if motion.noise > 0:
            noisy = frames[s].astype(np.float64) + rng.normal(0.0, motion.noise,
                                                             frames[s].shape)
            frames[s] = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    header = {"format": "hasched-frames", "version": _VERSION, "seed": int(seed),
              "sequences": sequences, "length": length, "height": int(H), "width": int(W),
              "motion": motion.to_dict(), **(info or {})}
    lab = labels[torch.from_numpy(src.astype(np.int64))].numpy().astype(np.uint8)
    return FrameSet(frames, lab, src, offsets, angles, header)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8 (..., H, W)`` frames as float ``(..., 1, H, W)`` in ``[0, 1]``."""
    return torch.from_numpy(frames.astype(np.float32) / np.float32(255.0)).unsqueeze(-3)


# ------------------------------------------------------------------------------ the file

def _encode(fs: FrameSet) -> bytes:
    arrays, blobs = [], []
    for name, arr in fs.arrays().items():
        dtype = str(arr.dtype)
        blob = np.ascontiguousarray(arr, dtype=_DTYPES[dtype]).tobytes()
        arrays.append({"name": name, "dtype": dtype, "shape": list(arr.shape),
                       "sha256": hashlib.sha256(blob).hexdigest()})
        blobs.append(blob)
    header = json.dumps({**fs.header, "arrays": arrays}, sort_keys=True,
                        separators=(",", ":")).encode()
    return _MAGIC + struct.pack(">I", len(header)) + header + b"".join(blobs)


def save_frames(fs: FrameSet, path: str | Path) -> Path:
    """Writes ``fs`` atomically as one ``.hsf`` file (see the module docstring)."""
    return atomic_write(path, _encode(fs))


def _array_specs(header: dict, name: str) -> list[dict]:
    specs = header["arrays"]
    for i, a in enumerate(specs):
        check_fields(a, {"name": str, "dtype": str, "shape": list[int], "sha256": str},
                     file=name, where=f"arrays[{i}]")
        if a["dtype"] not in _DTYPES or min(a["shape"], default=1) < 0:
            raise HaschedError(f"{name}: arrays[{i}] has a bad dtype or shape "
                               f"({a['dtype']}, {a['shape']})")
    want = ["frames", "labels", "source_index", "offsets", "angles"]
    if [a["name"] for a in specs] != want:
        raise HaschedError(f"{name}: arrays must be {', '.join(want)} in this order")
    return specs


def _decode(raw: bytes, name: str) -> FrameSet:
    if raw[:8] != _MAGIC or len(raw) < 12:
        raise HaschedError(f"{name} is not a hasched frames file (bad magic bytes)")
    (n,) = struct.unpack(">I", raw[8:12])
    if 12 + n > len(raw):
        raise HaschedError(f"{name} is truncated (header of {n} bytes, file of {len(raw)})")
    try:
        header = json.loads(raw[12:12 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise HaschedError(f"{name}: the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise HaschedError(f"{name}: the header is not a JSON object")
    check_fields(header, {"format": str, "version": int, "seed": int, "sequences": int,
                          "length": int, "height": int, "width": int, "motion": dict,
                          "arrays": list}, file=name, extra_ok=True)
    if header["format"] != "hasched-frames" or header["version"] != _VERSION:
        raise HaschedError(f"{name}: unsupported format {header['format']} version "
                           f"{header['version']}")
    out, pos = {}, 12 + n
    for a in _array_specs(header, name):
        size = int(np.prod(a["shape"], dtype=np.int64)) * np.dtype(_DTYPES[a["dtype"]]).itemsize
        blob = raw[pos:pos + size]
        if len(blob) != size:
            raise HaschedError(f"{name} is truncated: array {a['name']} needs {size} bytes")
        if hashlib.sha256(blob).hexdigest() != a["sha256"]:
            raise HaschedError(f"{name}: array {a['name']} is damaged (checksum mismatch)")
        out[a["name"]] = np.frombuffer(blob, dtype=_DTYPES[a["dtype"]]).reshape(
            a["shape"]).astype(a["dtype"])
        pos += size
    if pos != len(raw):
        raise HaschedError(f"{name}: {len(raw) - pos} unexpected bytes after the arrays")
    _check_shapes(out, header, name)
    header = {k: v for k, v in header.items() if k != "arrays"}
    return FrameSet(**out, header=header)


def _check_shapes(a: dict[str, np.ndarray], header: dict, name: str) -> None:
    S, L, H, W = (header[k] for k in ("sequences", "length", "height", "width"))
    want = {"frames": (S, L, H, W), "labels": (S,), "source_index": (S,),
            "offsets": (S, L, 2), "angles": (S, L)}
    for key, shape in want.items():
        if tuple(a[key].shape) != shape:
            raise HaschedError(f"{name}: {key} has shape {tuple(a[key].shape)}, the header "
                               f"says {shape}")
    if S < 1 or L < 1:
        raise HaschedError(f"{name} holds no frames")


def load_frames(path: str | Path) -> FrameSet:
    """Reads a frames file (or a folder holding ``frames.hsf``), checking every field.

    Raises:
        HaschedError: Missing, truncated, damaged or foreign file, naming it and the field.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FRAMES_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise HaschedError(f"frames file {path} not found (make one with `hasched frames`)"
                           ) from None
    except OSError as err:
        raise os_error(path, err, "read") from None
    return _decode(raw, f"frames file {path}")
