"""What is wrong with each PE: transient fault rates (:class:`FaultProfile`) and permanent
fault maps of fabricated chips (:class:`ChipMap`).

Both are arrays over a mapping's PE grid (``mapping.pe_shape``): ``(n_sms, pes_per_sm)`` for
gpu-tiles, ``(R, C)`` for a systolic array. Both are generated from an explicit seed and
saved/loaded as ``.npy`` (arrays only) or ``.json`` (arrays plus how they were made).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hasched.errors import HaschedError

__all__ = ["FaultProfile", "ChipMap", "PERMANENT_KINDS"]

# Codes of ChipMap.kind: what a faulty PE does to the value at its fault site.
PERMANENT_KINDS = {"ok": 0, "stuck-at": 1, "dead": 2}


def _grid(arr, name: str, dtype) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 2:
        raise HaschedError(f"{name}: expected a 2-D PE grid, got shape {tuple(a.shape)}")
    a = a.astype(dtype, copy=True)
    a.setflags(write=False)
    return a


def _save(path: str | Path, npy: np.ndarray, obj: dict, what: str) -> Path:
    from hasched.io import atomic_write

    path = Path(path)
    if path.suffix == ".npy":
        def write(fh) -> None:
            np.save(fh, npy)

        atomic_write(path, write)
    elif path.suffix == ".json":
        atomic_write(path, json.dumps(obj, indent=1) + "\n")
    else:
        raise HaschedError(f"{what}: use a .npy or .json file name, got {path.name}")
    return path


def _read(path: str | Path, what: str) -> tuple[Path, object]:
    path = Path(path)
    if not path.is_file():
        raise HaschedError(f"{what} file not found: {path}")
    try:
        if path.suffix == ".npy":
            return path, np.load(path, allow_pickle=False)
        if path.suffix == ".json":
            return path, json.loads(path.read_text())
    except (ValueError, OSError, EOFError, json.JSONDecodeError) as err:
        raise HaschedError(f"{what} {path} is malformed: {err}".splitlines()[0]) from None
    raise HaschedError(f"{what}: use a .npy or .json file, got {path.name}")


@dataclass(frozen=True)
class FaultProfile:
    """Per-PE transient fault rates of one accelerator instance.

    Attributes:
        rates: float64 PE grid of probabilities in [0, 1].
        fr_max: The maximum rate the profile was drawn with (``None`` if loaded from rates).
        seed: The generator seed (``None`` if not generated).
    """

    rates: np.ndarray
    fr_max: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        rates = _grid(self.rates, "fault profile", np.float64)
        if not np.all(np.isfinite(rates)):
            raise HaschedError("fault profile: rates must be finite")
        if rates.size and (rates.min() < 0.0 or rates.max() > 1.0):
            raise HaschedError(
                f"fault profile: rates must lie in [0, 1], got [{rates.min():g}, {rates.max():g}]"
            )
        object.__setattr__(self, "rates", rates)

    @classmethod
    def generate(cls, fr_max: float, seed: int, pe_shape: tuple[int, int] = (20, 32)
                 ) -> FaultProfile:
        """Draws every PE's rate from Uniform(0, fr_max) (HAS paper §4.2).

        Args:
            fr_max: Maximum fault rate, in [0, 1].
            seed: Seed of ``numpy.random.default_rng``.
            pe_shape: The mapping's PE grid (default: 20 SMs x 32 threads).
        """
        if not (isinstance(fr_max, int | float) and math.isfinite(fr_max)
                and 0.0 <= fr_max <= 1.0):
            raise HaschedError(f"fr_max must lie in [0, 1], got {fr_max!r}")
        rng = np.random.default_rng(seed)
        rates = rng.uniform(0.0, fr_max, size=tuple(pe_shape))
        return cls(rates=rates, fr_max=float(fr_max), seed=int(seed))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rates.shape)  # type: ignore[return-value]

    def check(self, pe_shape: tuple[int, int]) -> None:
        """Raises if the profile does not fit a mapping's PE grid."""
        if self.shape != tuple(pe_shape):
            raise HaschedError(f"fault profile has shape {self.shape}, the mapping's PE grid "
                               f"is {tuple(pe_shape)}")

    def flat_rates(self) -> np.ndarray:
        return self.rates.reshape(-1)

    def to_dict(self) -> dict:
        return {"kind": "fault-profile", "fr_max": self.fr_max, "seed": self.seed,
                "rates": self.rates.tolist()}

    def save(self, path: str | Path) -> Path:
        """Writes ``.npy`` (rates only) or ``.json`` (rates, fr_max, seed), atomically."""
        return _save(path, self.rates, self.to_dict(), "fault profile")

    @classmethod
    def load(cls, path: str | Path) -> FaultProfile:
        """Reads a profile written by :meth:`save` (or any 2-D ``.npy`` of rates)."""
        path, obj = _read(path, "fault profile")
        try:
            if isinstance(obj, np.ndarray):
                if obj.dtype.kind not in "fiu":
                    raise HaschedError(f"rates must be numbers, got dtype {obj.dtype}")
                return cls(rates=obj)
            if not isinstance(obj, dict) or "rates" not in obj:
                raise HaschedError("JSON needs a 'rates' field")
            rates = obj["rates"]
            if not isinstance(rates, list) or any(
                    not isinstance(v, int | float) or isinstance(v, bool)
                    for row in rates for v in (row if isinstance(row, list) else [None])):
                raise HaschedError("'rates' must be a list of lists of numbers")
            return cls(rates=np.asarray(rates, dtype=np.float64),
                       fr_max=obj.get("fr_max"), seed=obj.get("seed"))
        except HaschedError as err:
            raise HaschedError(f"fault profile {path}: {err}") from None


@dataclass(frozen=True)
class ChipMap:
    """Permanent faults of one chip: which PEs are faulty and how.

    Attributes:
        kind: int8 PE grid of :data:`PERMANENT_KINDS` codes (0 = healthy).
        bit: int8 PE grid: the stuck bit of a stuck-at PE (else 0).
        value: int8 PE grid: the stuck value (0 or 1) of a stuck-at PE (else 0).
        site: What a fault corrupts: ``product``, ``accumulator`` or ``output``
            (see :mod:`hasched.sim.mapping`), or ``auto`` for the mapping's default.
        mapping: The mapping spec the chip was drawn for (informational).
        faulty_fraction: The fraction it was drawn with; seed: its seed.
    """

    kind: np.ndarray
    bit: np.ndarray
    value: np.ndarray
    site: str = "auto"
    mapping: str | None = None
    faulty_fraction: float | None = None
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = _grid(self.kind, "chip map 'kind'", np.int8)
        bit = _grid(self.bit, "chip map 'bit'", np.int8)
        value = _grid(self.value, "chip map 'value'", np.int8)
        if not (kind.shape == bit.shape == value.shape):
            raise HaschedError("chip map: 'kind', 'bit' and 'value' must have one shape")
        if not np.isin(kind, list(PERMANENT_KINDS.values())).all():
            raise HaschedError(f"chip map: 'kind' codes must be in {PERMANENT_KINDS}")
        if bit.min(initial=0) < 0 or bit.max(initial=0) > 31:
            raise HaschedError("chip map: 'bit' must lie in 0..31")
        if not np.isin(value, [0, 1]).all():
            raise HaschedError("chip map: 'value' must be 0 or 1")
        if self.site not in ("auto", "output", "product", "accumulator"):
            raise HaschedError(f"chip map: unknown site {self.site!r}")
        for n, a in (("kind", kind), ("bit", bit), ("value", value)):
            object.__setattr__(self, n, a)

    @classmethod
    def sample(cls, pe_shape: tuple[int, int], faulty_fraction: float, seed: int, *,
               kind: str = "stuck-at", bit: int | str = "random", value: int | str = "random",
               bit_range: tuple[int, int] = (0, 15), site: str = "auto",
               mapping: str | None = None) -> ChipMap:
        """Draws exactly ``round(faulty_fraction * n_pes)`` faulty PEs uniformly at random.

        Args:
            pe_shape: The mapping's PE grid.
            faulty_fraction: Share of faulty PEs, in [0, 1].
            seed: Seed of ``numpy.random.default_rng`` (the only randomness).
            kind: ``stuck-at`` or ``dead``.
            bit: The stuck bit, or ``random`` (uniform in ``bit_range`` per faulty PE).
            value: The stuck value 0/1, or ``random`` (per faulty PE).
            bit_range: Inclusive range for random bits.
            site: Fault site (see :mod:`hasched.sim.mapping`).
            mapping: Spec recorded in the file.
        """
        if not (isinstance(faulty_fraction, int | float) and 0.0 <= faulty_fraction <= 1.0):
            raise HaschedError(f"faulty-PE fraction must lie in [0, 1], got {faulty_fraction!r}")
        if kind not in ("stuck-at", "dead"):
            raise HaschedError(f"permanent fault kind must be stuck-at or dead, got {kind!r}")
        rng = np.random.default_rng(seed)
        n = math.prod(pe_shape)
        n_bad = int(round(faulty_fraction * n))
        bad = rng.permutation(n)[:n_bad]
        kinds = np.zeros(n, np.int8)
        bits = np.zeros(n, np.int8)
        vals = np.zeros(n, np.int8)
        kinds[bad] = PERMANENT_KINDS[kind]
        if kind == "stuck-at":
            lo, hi = bit_range
            bits[bad] = rng.integers(lo, hi + 1, n_bad) if bit == "random" else int(bit)
            vals[bad] = rng.integers(0, 2, n_bad) if value == "random" else int(value)
        return cls(kinds.reshape(pe_shape), bits.reshape(pe_shape), vals.reshape(pe_shape),
                   site=site, mapping=mapping, faulty_fraction=float(faulty_fraction),
                   seed=int(seed))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kind.shape)  # type: ignore[return-value]

    @property
    def faulty(self) -> np.ndarray:
        """Boolean PE grid of faulty PEs."""
        return self.kind != 0

    def check(self, pe_shape: tuple[int, int]) -> None:
        if self.shape != tuple(pe_shape):
            raise HaschedError(f"chip map has shape {self.shape}, the mapping's PE grid is "
                               f"{tuple(pe_shape)}")

    def to_dict(self) -> dict:
        return {"kind": "chip-map", "mapping": self.mapping, "site": self.site,
                "faulty_fraction": self.faulty_fraction, "seed": self.seed,
                "fault": self.kind.tolist(), "bit": self.bit.tolist(),
                "value": self.value.tolist(), "codes": PERMANENT_KINDS, **self.meta}

    def save(self, path: str | Path) -> Path:
        """Writes ``.json`` (everything) or ``.npy`` (a ``(3, R, C)`` stack kind/bit/value)."""
        stack = np.stack([self.kind, self.bit, self.value])
        return _save(path, stack, self.to_dict(), "chip map")

    @classmethod
    def load(cls, path: str | Path) -> ChipMap:
        """Reads a chip map written by :meth:`save`, checking every field."""
        path, obj = _read(path, "chip map")
        try:
            if isinstance(obj, np.ndarray):
                if obj.ndim != 3 or obj.shape[0] != 3 or obj.dtype.kind not in "iu":
                    raise HaschedError("a .npy chip map is an integer (3, R, C) stack of "
                                       "kind, bit, value")
                return cls(obj[0], obj[1], obj[2])
            if not isinstance(obj, dict) or obj.get("kind") != "chip-map":
                raise HaschedError("not a chip map (expected \"kind\": \"chip-map\")")
            for name in ("fault", "bit", "value"):
                if not isinstance(obj.get(name), list):
                    raise HaschedError(f"field {name!r} must be a 2-D list of integers")
                if any(not isinstance(v, int) or isinstance(v, bool)
                       for row in obj[name] for v in (row if isinstance(row, list) else [None])):
                    raise HaschedError(f"field {name!r} must be a 2-D list of integers")
            return cls(np.asarray(obj["fault"]), np.asarray(obj["bit"]),
                       np.asarray(obj["value"]), site=obj.get("site", "auto"),
                       mapping=obj.get("mapping"), faulty_fraction=obj.get("faulty_fraction"),
                       seed=obj.get("seed"))
        except HaschedError as err:
            raise HaschedError(f"chip map {path}: {err}") from None
        except ValueError as err:
            raise HaschedError(f"chip map {path}: {err}".splitlines()[0]) from None
