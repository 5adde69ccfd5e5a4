"""8-bit multipliers: exact, bundled approximate families, and 256x256 lookup tables.

A multiplier is a function of two 8-bit operands. hasched computes with *signed* int8 data
(symmetric quantisation, :mod:`hasched.sim.arithmetic`), so every multiplier is used through
its signed table ``T[w + 128, x + 128]``:

* a **signed** LUT is indexed by the operands' two's-complement bytes
  (``lut[w & 0xFF, x & 0xFF]``);
* an **unsigned** LUT (``mul8u``-style, the usual export of approximate-multiplier
  libraries) is applied sign-magnitude: ``sign(w) * sign(x) * lut[|w|, |x|]``.

Bundled families (our own implementations of textbook designs, unsigned 8x8):

* ``exact``: ``a * b``;
* ``trunc{k}``: the product with its ``k`` low bits cleared;
* ``bam{k}``: broken-array multiplier with vertical break level ``k`` (partial-product bits
  ``a_i b_j`` with ``i + j < k`` are never generated);
* ``drum{k}``: DRUM (Hashemi et al., ICCAD 2015): each operand keeps ``k`` bits from its
  leading one, the lowest kept bit forced to 1, then an exact multiply;
* ``mitchell``: Mitchell's logarithmic multiplier (1962), integer (floor) antilog.

Error metrics are computed exhaustively over all 65,536 unsigned operand pairs.

**LUT GEMM.** ``sum_j T[w_j, x_j]`` is computed from an exact low-rank factorisation
``T = A @ B.T`` when ``T`` has a small rank (``exact``, ``drum``: rank 1; ``bam``, ``trunc``:
<= 2^k + 1): a handful of float64 GEMMs whose result is rounded to the (integer) exact sum.
Other tables (``mitchell``, arbitrary files) use a chunked gather, exact and slower.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hasched.errors import HaschedError
from hasched.registry import Registry

__all__ = ["Multiplier", "MULTIPLIERS", "create_multiplier", "load_lut", "error_metrics"]

MULTIPLIERS: Registry = Registry("multiplier")
_MAX_RANK = 24  # above this, a gather is cheaper than the factorised GEMMs


def _ab() -> tuple[np.ndarray, np.ndarray]:
    a = np.arange(256, dtype=np.int64)
    return a[:, None], a[None, :]


@dataclass(frozen=True, eq=False)
class Multiplier:
    """An 8x8-bit multiplier given by its 256x256 table.

    Attributes:
        name: Display name (``exact``, ``drum4``, ``lut:file.bin``...).
        lut: int64 ``(256, 256)`` table (see the module docstring for indexing).
        signed: Whether ``lut`` is indexed by two's-complement bytes of signed operands.
    """

    name: str
    lut: np.ndarray
    signed: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        lut = np.asarray(self.lut)
        if lut.shape != (256, 256):
            raise HaschedError(f"multiplier {self.name}: a LUT must be 256x256, got "
                               f"{tuple(lut.shape)}")
        if lut.dtype.kind not in "iu":
            raise HaschedError(f"multiplier {self.name}: LUT entries must be integers, "
                               f"got {lut.dtype}")
        lut = lut.astype(np.int64)
        lut.setflags(write=False)
        object.__setattr__(self, "lut", lut)

    @property
    def is_exact(self) -> bool:
        """True when the signed table equals the exact product on [-127, 127]^2."""
        if "exact" not in self._cache:
            t = self.signed_table()[1:, 1:]  # operands -127..127
            w = np.arange(-127, 128, dtype=np.int64)
            self._cache["exact"] = bool(np.array_equal(t, w[:, None] * w[None, :]))
        return self._cache["exact"]

    def signed_table(self) -> np.ndarray:
        """int64 ``T[w + 128, x + 128]`` for signed operands ``w, x`` in -128..127."""
        if "table" not in self._cache:
            v = np.arange(-128, 128, dtype=np.int64)
            if self.signed:
                t = self.lut[(v & 0xFF)[:, None], (v & 0xFF)[None, :]]
            else:
                mag = np.abs(v)
                t = np.sign(v)[:, None] * np.sign(v)[None, :] * self.lut[
                    np.minimum(mag, 255)[:, None], np.minimum(mag, 255)[None, :]]
            t.setflags(write=False)
            self._cache["table"] = t
        return self._cache["table"]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact float64 factors ``(A, B)``, ``(256, r)`` each, with ``A @ B.T == T``.

        ``None`` when the table's rank exceeds the point where factorised GEMMs pay off.
        """
        if "factors" not in self._cache:
            self._cache["factors"] = _exact_factors(self.signed_table())
        return self._cache["factors"]

    def metrics(self) -> dict:
        """Exhaustive error metrics of the unsigned (or signed) table."""
        if "metrics" not in self._cache:
            self._cache["metrics"] = error_metrics(self.lut, self.signed)
        return self._cache["metrics"]

    def describe(self) -> dict:
        return {"name": self.name, "signed": self.signed, **self.metrics()}


def _exact_factors(t: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
    u, s, vt = np.linalg.svd(t.astype(np.float64))
    if s[0] == 0:
        return torch.zeros(256, 1, dtype=torch.float64), torch.zeros(256, 1, dtype=torch.float64)
    r = int((s > s[0] * 1e-10).sum())
    if r > _MAX_RANK:
        return None
    a = u[:, :r] * s[:r]
    b = vt[:r].T
    if np.abs(a @ b.T - t).max() > 1e-6:
        return None
    return torch.from_numpy(a.copy()), torch.from_numpy(b.copy())


def error_metrics(lut: np.ndarray, signed: bool = False) -> dict:
    """MAE, WCE, MRE and error probability against the exact product, over all pairs.

    Args:
        lut: ``(256, 256)`` table.
        signed: Index operands as two's-complement bytes.
    """
    a, b = _ab()
    if signed:
        a, b = (a + 128) % 256 - 128, (b + 128) % 256 - 128
    exact = a * b
    err = np.abs(lut.astype(np.int64) - exact)
    nz = exact != 0
    return {"mae": float(err.mean()), "wce": int(err.max()),
            "mre": float((err[nz] / np.abs(exact[nz])).mean()),
            "error_probability": float((err != 0).mean())}


# --------------------------------------------------------------------- bundled families

def _exact_lut() -> np.ndarray:
    a, b = _ab()
    return a * b


def _trunc_lut(k: int) -> np.ndarray:
    return (_exact_lut() >> k) << k


def _bam_lut(k: int) -> np.ndarray:
    a, b = _ab()
    out = np.zeros((256, 256), np.int64)
    for i in range(8):
        for j in range(8):
            if i + j >= k:
                out += (((a >> i) & 1) * ((b >> j) & 1)) << (i + j)
    return out


def _drum_operand(v: np.ndarray, k: int) -> np.ndarray:
    lead = np.floor(np.log2(np.maximum(v, 1))).astype(np.int64)  # leading-one position
    shift = np.maximum(lead - k + 1, 0)
    kept = ((v >> shift) | (shift > 0)) << shift  # k bits, lowest forced to 1 if truncated
    return np.where(v < (1 << k), v, kept)


def _drum_lut(k: int) -> np.ndarray:
    a, b = _ab()
    return _drum_operand(a, k) * _drum_operand(b, k)


def _mitchell_lut() -> np.ndarray:
    a, b = _ab()
    ka = np.floor(np.log2(np.maximum(a, 1))).astype(np.int64)
    kb = np.floor(np.log2(np.maximum(b, 1))).astype(np.int64)
    xa = a / 2.0**ka - 1.0
    xb = b / 2.0**kb - 1.0
    s = xa + xb
    val = np.where(s < 1.0, 2.0 ** (ka + kb) * (1.0 + s), 2.0 ** (ka + kb + 1) * s)
    return np.where((a == 0) | (b == 0), 0, np.floor(val)).astype(np.int64)


def _family(name: str, lut_fn, doc: str) -> None:
    # One instance per family: its table, factorisation and metrics are computed once.
    MULTIPLIERS.add(name, functools.cache(lambda: Multiplier(name, lut_fn())), doc)


_family("exact", _exact_lut, "exact 8x8 product")
for _k in (2, 4, 6):
    _family(f"trunc{_k}", lambda k=_k: _trunc_lut(k), f"product with its {_k} low bits cleared")
for _k in (4, 6, 8):
    _family(f"bam{_k}", lambda k=_k: _bam_lut(k),
            f"broken-array multiplier, partial-product bits with i+j<{_k} omitted")
for _k in (3, 4, 6):
    _family(f"drum{_k}", lambda k=_k: _drum_lut(k),
            f"DRUM: {_k} bits from each operand's leading one, exact multiply")
_family("mitchell", _mitchell_lut, "Mitchell's logarithmic multiplier")


def load_lut(path: str | Path, signed: bool | None = None) -> Multiplier:
    """Loads a 256x256 LUT from ``.npy`` or a raw binary file.

    Raw binaries (TFApprox-style ``.bin``) hold 65,536 entries, row-major (first operand
    major): 131,072 bytes are read as little-endian ``uint16`` (``int16`` when ``signed``),
    262,144 bytes as little-endian ``int32``.

    Args:
        path: The file.
        signed: Whether operands index the table as two's-complement bytes; ``None`` infers
            it: a table with negative entries is signed.

    Raises:
        HaschedError: missing file, wrong size, non-square or non-integer table.
    """
    path = Path(path)
    if not path.is_file():
        raise HaschedError(f"multiplier LUT file not found: {path}")
    try:
        if path.suffix == ".npy":
            lut = np.load(path, allow_pickle=False)
        else:
            raw = path.read_bytes()
            if len(raw) == 2 * 65536:
                lut = np.frombuffer(raw, "<i2" if signed else "<u2").reshape(256, 256)
            elif len(raw) == 4 * 65536:
                lut = np.frombuffer(raw, "<i4").reshape(256, 256)
            else:
                raise HaschedError(f"a raw LUT has 65,536 uint16 or int32 entries "
                                   f"(131,072 or 262,144 bytes), got {len(raw)} bytes")
    except HaschedError as err:
        raise HaschedError(f"multiplier LUT {path}: {err}") from None
    except (ValueError, OSError, EOFError) as err:
        raise HaschedError(f"multiplier LUT {path} is malformed: {err}".splitlines()[0]) from None
    lut = np.asarray(lut)
    if lut.ndim != 2 or lut.shape[0] != lut.shape[1]:
        raise HaschedError(f"multiplier LUT {path}: must be square 256x256, got {lut.shape}")
    if lut.shape != (256, 256):
        raise HaschedError(f"multiplier LUT {path}: must be 256x256, got {lut.shape}")
    if lut.dtype.kind not in "iu":
        raise HaschedError(f"multiplier LUT {path}: entries must be integers, got {lut.dtype}")
    if signed is None:
        signed = bool((lut < 0).any())
    if np.abs(lut.astype(np.int64)).max() > 2**31 - 1:
        raise HaschedError(f"multiplier LUT {path}: entries exceed int32")
    return Multiplier(f"lut:{path.name}", lut.astype(np.int64), signed=signed)


def create_multiplier(spec: str) -> Multiplier:
    """A bundled family name (``exact``, ``drum4``...) or ``lut:PATH`` (``lut:PATH,signed``).

    Raises:
        HaschedError: unknown name or bad file.
    """
    if spec.startswith("lut:"):
        path, _, flag = spec[4:].partition(",")
        if flag not in ("", "signed", "unsigned"):
            raise HaschedError(f"multiplier {spec!r}: use lut:PATH, lut:PATH,signed or "
                               "lut:PATH,unsigned")
        return load_lut(path, None if not flag else flag == "signed")
    return MULTIPLIERS.create(spec)


def lut_bits_needed(mult: Multiplier) -> int:
    """Bits of the largest product magnitude (16 for an 8x8 multiplier)."""
    return max(1, math.ceil(math.log2(int(np.abs(mult.signed_table()).max()) + 1)))
