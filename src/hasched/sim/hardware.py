"""Accelerator geometry, fault profiles and the one place where tiles meet PEs.

The simulated accelerator (paper §3.2, §4.2) has ``n_sms`` streaming multiprocessors of
``pes_per_sm`` processing elements (threads) each. A fault profile gives every PE a fault
rate. A GEMM ``out = W @ X`` with ``W: (rows, K)`` is cut into tiles:

* ``block_height`` weight rows per tile; row ``i`` of a tile runs on thread ``i`` of the SM
  (a layer with fewer rows than ``block_height`` is one tile of exactly its rows: the authors'
  code uses 10 for the 10-row output layer);
* ``block_width`` K-columns per tile (32 for dense layers, ``kh * kw`` for convolutions,
  which are lowered with im2col);
* ``batch_block`` output columns per tile; successive column blocks are successive time
  steps on the *same* PEs, so they do not change which PE a partial product runs on.

**Tile mapping.** The tile of row-block ``r`` and K-block ``k`` runs on SM
``(r * n_k + k) mod n_sms`` where ``n_k`` is the number of K-blocks (as the authors' code).
:func:`slot_pe_index` is the only implementation of this rule.

A *slot* is a row position of the (possibly permuted) weight matrix. A HAS schedule is a
permutation ``perm`` with ``perm[slot] = weight row`` (gene = slot, allele = row, paper
§3.3.1), so row ``perm[s]`` is computed by the PEs of slot ``s``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hasched.errors import HaschedError

__all__ = [
    "AcceleratorConfig",
    "FaultProfile",
    "Tiling",
    "layer_tiling",
    "slot_pe_index",
    "slot_rates",
    "row_rates",
]


@dataclass(frozen=True)
class AcceleratorConfig:
    """Geometry of the simulated accelerator and of its GEMM tiles.

    Attributes:
        n_sms: Streaming multiprocessors (paper §4.2: 20; the authors' released experiments
            used 10).
        pes_per_sm: Processing elements (threads) per SM.
        block_height: Weight rows per tile, at most ``pes_per_sm``.
        dense_block_width: K-columns per tile for dense layers.
        conv_block_width: K-columns per tile for convolutions; ``None`` means ``kh * kw``.
        batch_block: Output columns per tile (time steps; kept for the record, it does not
            change which PE computes a partial product).
    """

    n_sms: int = 20
    pes_per_sm: int = 32
    block_height: int = 32
    dense_block_width: int = 32
    conv_block_width: int | None = None
    batch_block: int = 32

    def __post_init__(self) -> None:
        for name in ("n_sms", "pes_per_sm", "block_height", "dense_block_width", "batch_block"):
            if int(getattr(self, name)) < 1:
                raise HaschedError(f"accelerator: {name} must be >= 1, got {getattr(self, name)}")
        if self.conv_block_width is not None and self.conv_block_width < 1:
            raise HaschedError("accelerator: conv_block_width must be >= 1")
        if self.block_height > self.pes_per_sm:
            raise HaschedError(
                f"accelerator: block_height {self.block_height} exceeds pes_per_sm "
                f"{self.pes_per_sm} (one row per thread)"
            )

    @property
    def n_pes(self) -> int:
        return self.n_sms * self.pes_per_sm


@dataclass(frozen=True)
class FaultProfile:
    """Per-PE fault rates of one accelerator instance.

    Attributes:
        rates: ``(n_sms, pes_per_sm)`` float64 array of probabilities in [0, 1].
        fr_max: The maximum rate the profile was drawn with (``None`` if loaded from rates).
        seed: The generator seed (``None`` if not generated).
    """

    rates: np.ndarray
    fr_max: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        rates = np.asarray(self.rates, dtype=np.float64)
        if rates.ndim != 2:
            raise HaschedError(f"fault profile: expected a 2-D (n_sms, pes_per_sm) array, "
                               f"got shape {tuple(rates.shape)}")
        if not np.all(np.isfinite(rates)):
            raise HaschedError("fault profile: rates must be finite")
        if rates.size and (rates.min() < 0.0 or rates.max() > 1.0):
            raise HaschedError(
                f"fault profile: rates must lie in [0, 1], got [{rates.min():g}, {rates.max():g}]"
            )
        rates = rates.copy()
        rates.setflags(write=False)
        object.__setattr__(self, "rates", rates)

    @classmethod
    def generate(
        cls, fr_max: float, seed: int, accel: AcceleratorConfig | None = None
    ) -> FaultProfile:
        """Draws every PE's rate from Uniform(0, fr_max) (paper §4.2).

        Args:
            fr_max: Maximum fault rate, in [0, 1].
            seed: Seed of ``numpy.random.default_rng``.
            accel: Geometry; defaults to :class:`AcceleratorConfig()`.
        """
        accel = accel or AcceleratorConfig()
        if not (math.isfinite(fr_max) and 0.0 <= fr_max <= 1.0):
            raise HaschedError(f"fr_max must lie in [0, 1], got {fr_max!r}")
        rng = np.random.default_rng(seed)
        rates = rng.uniform(0.0, fr_max, size=(accel.n_sms, accel.pes_per_sm))
        return cls(rates=rates, fr_max=float(fr_max), seed=int(seed))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rates.shape)  # type: ignore[return-value]

    def check(self, accel: AcceleratorConfig) -> None:
        """Raises if the profile does not fit ``accel``'s geometry."""
        if self.shape != (accel.n_sms, accel.pes_per_sm):
            raise HaschedError(
                f"fault profile has shape {self.shape}, the accelerator needs "
                f"({accel.n_sms}, {accel.pes_per_sm}) (n_sms, pes_per_sm)"
            )

    def to_dict(self) -> dict:
        return {"fr_max": self.fr_max, "seed": self.seed, "rates": self.rates.tolist()}

    def save(self, path: str | Path) -> Path:
        """Writes ``.npy`` (rates only) or ``.json`` (rates, fr_max, seed), atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if path.suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, self.rates)
        elif path.suffix == ".json":
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        else:
            raise HaschedError(f"fault profile: use a .npy or .json file name, got {path.name}")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FaultProfile:
        """Reads a profile written by :meth:`save` (or any 2-D ``.npy`` of rates)."""
        path = Path(path)
        if not path.is_file():
            raise HaschedError(f"fault profile file not found: {path}")
        try:
            if path.suffix == ".npy":
                return cls(rates=np.load(path, allow_pickle=False))
            if path.suffix == ".json":
                obj = json.loads(path.read_text())
                if not isinstance(obj, dict) or "rates" not in obj:
                    raise HaschedError(f"fault profile {path}: JSON needs a 'rates' field")
                return cls(rates=np.asarray(obj["rates"], dtype=np.float64),
                           fr_max=obj.get("fr_max"), seed=obj.get("seed"))
        except HaschedError as err:
            raise HaschedError(f"fault profile {path}: {err}") from None
        except (ValueError, TypeError, OSError, json.JSONDecodeError) as err:
            raise HaschedError(f"fault profile {path} is malformed: {err}") from None
        raise HaschedError(f"fault profile: use a .npy or .json file, got {path.name}")


@dataclass(frozen=True)
class Tiling:
    """How one layer's GEMM is cut into tiles.

    Attributes:
        rows: Weight rows (output channels / features).
        k: Reduction length (``in_features`` or ``in_channels * kh * kw``).
        block_height: Rows per tile (threads used per SM).
        block_width: K-columns per tile.
    """

    rows: int
    k: int
    block_height: int
    block_width: int

    @property
    def n_r(self) -> int:
        return -(-self.rows // self.block_height)

    @property
    def n_k(self) -> int:
        return -(-self.k // self.block_width)

    @property
    def k_padded(self) -> int:
        return self.n_k * self.block_width


def layer_tiling(
    rows: int, k: int, accel: AcceleratorConfig, kernel_area: int | None = None
) -> Tiling:
    """Tiles of a dense layer (``kernel_area=None``) or a convolution (``kh * kw``)."""
    if kernel_area is None:
        width = accel.dense_block_width
    else:
        width = accel.conv_block_width or kernel_area
    return Tiling(rows=rows, k=k, block_height=min(accel.block_height, rows), block_width=width)


def slot_pe_index(tiling: Tiling, accel: AcceleratorConfig) -> torch.Tensor:
    """Flat PE index (``sm * pes_per_sm + thread``) of every (slot, K-block).

    This is the tile-to-PE mapping of the whole package: row-block ``r = slot //
    block_height``, thread ``slot % block_height``, SM ``(r * n_k + k) mod n_sms``.

    Returns:
        LongTensor ``(rows, n_k)``.
    """
    slots = torch.arange(tiling.rows)
    rb = slots // tiling.block_height  # (rows,)
    thread = slots % tiling.block_height  # (rows,)
    kb = torch.arange(tiling.n_k)
    sm = (rb[:, None] * tiling.n_k + kb[None, :]) % accel.n_sms  # (rows, n_k)
    return sm * accel.pes_per_sm + thread[:, None]


def slot_rates(profile: FaultProfile, tiling: Tiling, accel: AcceleratorConfig) -> torch.Tensor:
    """Fault rate of every (slot, K-block) of a layer: float32 ``(rows, n_k)``."""
    profile.check(accel)
    flat = torch.tensor(profile.rates, dtype=torch.float32).reshape(-1)
    return flat[slot_pe_index(tiling, accel)]


def row_rates(slot_rate: torch.Tensor, perms: torch.Tensor | None) -> torch.Tensor:
    """Moves slot rates onto weight rows under schedules ``perms``.

    A schedule only decides which PEs compute a row, so permuting the rates of the
    partial products is exactly equivalent to permuting the weight rows before the GEMM
    and un-permuting its outputs afterwards, and it lets the clean partial products be
    shared by all members of a population.

    Args:
        slot_rate: ``(rows, n_k)`` rates per slot.
        perms: ``(P, rows)`` with ``perms[p, slot] = row``, or ``None`` for the identity.

    Returns:
        ``(P, rows, n_k)`` rates per weight row (``P = 1`` for ``None``).
    """
    if perms is None:
        return slot_rate[None]
    P, n = perms.shape
    if n != slot_rate.shape[0]:
        raise HaschedError(f"schedule has {n} entries, the layer has {slot_rate.shape[0]} rows")
    src = slot_rate.to(perms.device)[None].expand(P, -1, -1)
    out = torch.empty_like(src)
    # out[p, perms[p, s]] = slot_rate[s]: row perms[p, s] runs on slot s.
    out.scatter_(1, perms[:, :, None].expand(-1, -1, slot_rate.shape[1]), src)
    return out
