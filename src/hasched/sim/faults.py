"""Fault models: what a fault does to the value at its site, as bit operations on a word.

A model receives the values a fault hit, the :class:`~hasched.sim.arithmetic.Word` they
live in (float32 bits, or a two's-complement integer of 16/32 bits), the flat index of the
PE that computed each value, and optionally one uniform per value for its own randomness.

Transient models (a PE's rate says how often; fresh draws on every evaluation):

* ``flip-to-0`` / ``flip-to-1`` / ``bitflip``: one random bit in ``low_bit..high_bit`` is
  cleared / set / inverted. Defaults: float32 exponent bits 23..29 -- the authors' released
  code never picks the top exponent bit (30); pass ``high_bit=30`` for the whole exponent --
  and all bits of an integer word.
* ``tf32`` / ``bf16``: the 13 / 16 low mantissa bits are zeroed (float32 words only).
* ``zero``: the value is lost (set to 0); also what the authors' truncation code does on a
  CPU, where its mask overflows.

Permanent models (a chip map says which PEs are faulty; every value they compute is hit):

* ``stuck-at``: one bit of the word is stuck at 0 or 1 (per PE, from the chip map);
* ``dead``: the PE's value is 0 (at the ``product`` site this bypasses the PE, i.e. prunes
  the weights mapped to it).

Each model has a ``site`` (``auto``, ``output``, ``product``, ``accumulator``; see
:mod:`hasched.sim.mapping`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from hasched.errors import HaschedError
from hasched.registry import Registry
from hasched.sim.arithmetic import Word
from hasched.sim.profile import PERMANENT_KINDS, ChipMap

__all__ = [
    "FaultModel",
    "BitError",
    "MantissaTruncation",
    "ZeroError",
    "PermanentFault",
    "ChipFault",
    "PAPER_FR_MAX",
    "FAULTS",
    "create_fault",
    "list_fault_models",
]

# Table 1 of the HAS paper: the maximum fault rates studied per error type.
PAPER_FR_MAX: dict[str, tuple[float, ...]] = {
    "flip-to-0": (0.1, 0.2, 0.5),
    "flip-to-1": (1e-3, 2e-3, 5e-3),
    "bitflip": (1e-3, 2e-3, 5e-3),
    "tf32": (0.1, 0.2, 0.5),
    "bf16": (0.1, 0.2, 0.5),
}

FAULTS: Registry = Registry("fault model")
_SITES = ("auto", "output", "product", "accumulator")


def _check_site(site: str) -> None:
    if site not in _SITES:
        raise HaschedError(f"fault site must be one of {', '.join(_SITES)}, got {site!r}")


def to_bits(values: torch.Tensor, word: Word) -> torch.Tensor:
    """The word's bit pattern as int64 (unsigned for integers, in ``0 .. 2^bits - 1``)."""
    if word.kind == "float32":
        if values.dtype != torch.float32:
            raise HaschedError(f"float32 words need float32 values, got {values.dtype}")
        return values.contiguous().view(torch.int32).long()
    return values.long() & ((1 << word.bits) - 1)


def from_bits(bits: torch.Tensor, word: Word) -> torch.Tensor:
    """Inverse of :func:`to_bits` (integers are sign-extended and returned as float64)."""
    if word.kind == "float32":
        return bits.to(torch.int32).view(torch.float32)
    bits = bits & ((1 << word.bits) - 1)
    return torch.where(bits >= (1 << (word.bits - 1)), bits - (1 << word.bits), bits).double()


def _compact(index: torch.Tensor) -> torch.Tensor:
    """``index`` without its broadcast (stride-0) dimensions: size 1 there, so that what is
    gathered through it is computed once per distinct element and broadcasts back."""
    sl = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
               for st, n in zip(index.stride(), index.shape, strict=True))
    return index[sl]


class FaultModel(ABC):
    """Corrupts the values that a fault hit."""

    name: str = "?"
    site: str = "auto"
    permanent: bool = False
    uses_pe: bool = False  # whether corrupt() reads ``pe`` (then callers must supply it)

    @abstractmethod
    def corrupt(self, values: torch.Tensor, word: Word, pe: torch.Tensor | None,
                u: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """Corrupted version of every element of ``values``.

        Args:
            values: float32 (float32 words) or integer-valued float64 (int words).
            word: The word the values live in.
            pe: Flat PE index of every value (``None`` if the model does not use it).
            u: Optional uniforms in [0, 1) supplying the model's randomness (the dense path
                reuses the hit draw); otherwise it draws from ``generator``.
            generator: Source of any random draw.
        """

    def check_word(self, word: Word) -> None:  # noqa: B027 - most models act on any word
        """Raises if the model cannot act on ``word``."""

    def describe(self) -> dict:
        return {"name": self.name, "site": self.site}


@dataclass(frozen=True)
class BitError(FaultModel):
    """One uniformly chosen bit is set to 0, set to 1, or inverted."""

    mode: str
    low_bit: int | None = None
    high_bit: int | None = None
    site: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("flip-to-0", "flip-to-1", "bitflip"):
            raise HaschedError(f"unknown bit error mode {self.mode!r}")
        _check_site(self.site)
        lo, hi = self.bit_range(Word("float32"))
        if not 0 <= lo <= hi <= 31:
            raise HaschedError(f"{self.mode}: need 0 <= low_bit <= high_bit <= 31, "
                               f"got {lo}..{hi}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.mode

    def bit_range(self, word: Word) -> tuple[int, int]:
        if word.kind == "float32":
            default = (23, 29)
        else:
            default = (0, word.bits - 1)
        lo = default[0] if self.low_bit is None else self.low_bit
        hi = default[1] if self.high_bit is None else self.high_bit
        return lo, hi

    def check_word(self, word: Word) -> None:
        lo, hi = self.bit_range(word)
        if hi >= (32 if word.kind == "float32" else word.bits):
            raise HaschedError(f"{self.mode}: bit {hi} lies outside the {word.bits}-bit word")

    def corrupt(self, values, word, pe, u, generator):
        lo, hi = self.bit_range(word)
        if u is None:
            pos = torch.randint(lo, hi + 1, values.shape, generator=generator,
                                device=values.device, dtype=torch.int32)
        else:
            n = hi - lo + 1
            pos = (u * n).to(torch.int32).clamp_(max=n - 1) + lo
        bits = to_bits(values, word)
        mask = torch.bitwise_left_shift(torch.ones_like(bits), pos.long())
        if self.mode == "flip-to-1":
            bits = bits | mask
        elif self.mode == "flip-to-0":
            bits = bits & ~mask
        else:
            bits = bits ^ mask
        return from_bits(bits, word)

    def describe(self) -> dict:
        return {"name": self.mode, "site": self.site, "low_bit": self.low_bit,
                "high_bit": self.high_bit}


@dataclass(frozen=True)
class MantissaTruncation(FaultModel):
    """Zeroes the ``dropped_bits`` least significant mantissa bits (TF32: 13, BF16: 16)."""

    label: str
    dropped_bits: int
    site: str = "auto"

    def __post_init__(self) -> None:
        if not 0 <= self.dropped_bits <= 23:
            raise HaschedError(f"{self.label}: dropped_bits must be in 0..23")
        _check_site(self.site)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    def check_word(self, word: Word) -> None:
        if word.kind != "float32":
            raise HaschedError(f"{self.label} truncates a float32 mantissa; with integer "
                               "arithmetic use a bit error model (flip-to-0, bitflip, ...)")

    def corrupt(self, values, word, pe, u, generator):
        self.check_word(word)
        # -(1 << n) in two's complement is ...1110..0: it keeps sign, exponent, high mantissa.
        keep = torch.tensor(-(1 << self.dropped_bits), dtype=torch.int32, device=values.device)
        return (values.contiguous().view(torch.int32) & keep).view(torch.float32)

    def describe(self) -> dict:
        return {"name": self.label, "site": self.site, "dropped_bits": self.dropped_bits}


@dataclass(frozen=True)
class ZeroError(FaultModel):
    """The value is lost: it contributes 0."""

    site: str = "auto"

    def __post_init__(self) -> None:
        _check_site(self.site)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "zero"

    def corrupt(self, values, word, pe, u, generator):
        return torch.zeros_like(values)


@dataclass(frozen=True)
class PermanentFault:
    """How faulty PEs of sampled chips fail (``stuck-at`` or ``dead``): a chip recipe.

    Attributes:
        kind: ``stuck-at`` or ``dead``.
        bit: Stuck bit, or ``random`` (uniform in ``low_bit..high_bit`` per faulty PE).
        value: Stuck value 0/1, or ``random`` (per faulty PE).
        site: Fault site.
        low_bit, high_bit: Range of random bits.
    """

    kind: str
    bit: int | str = "random"
    value: int | str = "random"
    site: str = "auto"
    low_bit: int = 0
    high_bit: int = 15

    permanent = True

    def __post_init__(self) -> None:
        _check_site(self.site)
        if self.kind not in ("stuck-at", "dead"):
            raise HaschedError(f"permanent fault kind must be stuck-at or dead, got {self.kind}")
        if self.bit != "random" and not (isinstance(self.bit, int) and 0 <= self.bit <= 31):
            raise HaschedError(f"stuck-at: bit must be 0..31 or random, got {self.bit!r}")
        if self.value not in ("random", 0, 1):
            raise HaschedError(f"stuck-at: value must be 0, 1 or random, got {self.value!r}")
        if not 0 <= self.low_bit <= self.high_bit <= 31:
            raise HaschedError("stuck-at: need 0 <= low_bit <= high_bit <= 31")

    @property
    def name(self) -> str:
        return self.kind

    def sample_chip(self, pe_shape: tuple[int, int], faulty_fraction: float, seed: int,
                    mapping: str | None = None) -> ChipMap:
        """Draws a chip whose faulty PEs fail this way."""
        return ChipMap.sample(pe_shape, faulty_fraction, seed, kind=self.kind, bit=self.bit,
                              value=self.value, bit_range=(self.low_bit, self.high_bit),
                              site=self.site, mapping=mapping)

    def describe(self) -> dict:
        return {"name": self.kind, "site": self.site, "bit": self.bit, "value": self.value}


class ChipFault(FaultModel):
    """The permanent faults of one chip: every value a faulty PE computes is hit.

    Args:
        chip: Which PEs are faulty and how (per-PE kind, bit, value).
    """

    permanent = True
    uses_pe = True

    def __init__(self, chip: ChipMap) -> None:
        self.chip = chip
        self.site = chip.site
        self.name = "chip"
        self._kind = torch.from_numpy(chip.kind.reshape(-1).astype(np.int64))
        self._bit = torch.from_numpy(chip.bit.reshape(-1).astype(np.int64))
        self._value = torch.from_numpy(chip.value.reshape(-1).astype(np.int64))
        self._tables: dict = {}

    def faulty_pes(self) -> torch.Tensor:
        """Boolean ``(n_pes,)`` mask of faulty PEs."""
        return self._kind != 0

    def check_word(self, word: Word) -> None:
        stuck = self._kind == PERMANENT_KINDS["stuck-at"]
        width = 32 if word.kind == "float32" else word.bits
        if bool(stuck.any()) and int(self._bit[stuck].max()) >= width:
            raise HaschedError(f"chip has a stuck bit {int(self._bit[stuck].max())} outside "
                               f"the {width}-bit word at its fault site")

    def corrupt(self, values, word, pe, u, generator):
        if pe is None:
            raise HaschedError("a chip fault needs the PE of every value")
        if word.kind == "int" and values.dtype == torch.float64:
            fast = self._corrupt_int(values, word, pe)
            if fast is not None:
                return fast
        dev = values.device
        kind, bit, val = (t.to(dev)[pe] for t in (self._kind, self._bit, self._value))
        bits = to_bits(values, word)
        mask = torch.bitwise_left_shift(torch.ones_like(bits), bit)
        stuck = torch.where(val.bool(), bits | mask, bits & ~mask)
        out = from_bits(torch.where(kind == PERMANENT_KINDS["stuck-at"], stuck, bits), word)
        return torch.where(kind == PERMANENT_KINDS["dead"], torch.zeros_like(out), out)

    def _int_tables(self, bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per PE, float64 ``(2^-b, w, v * w, dead)`` for the closed form of
        :meth:`_corrupt_int` (``w = 2^b``, ``-2^b`` on the sign bit, 0 unless stuck)."""
        key = (bits, str(device))
        if key not in self._tables:
            stuck = self._kind == PERMANENT_KINDS["stuck-at"]
            b = self._bit.double()
            w = torch.where(self._bit == bits - 1, -(2.0 ** b), 2.0 ** b)
            w = torch.where(stuck, w, torch.zeros_like(w))
            self._tables[key] = tuple(t.to(device) for t in (
                2.0 ** -b, w, w * self._value.double(), self._kind == PERMANENT_KINDS["dead"]))
        return self._tables[key]

    def _corrupt_int(self, values: torch.Tensor, word: Word, pe: torch.Tensor
                     ) -> torch.Tensor | None:
        """Stuck-at and dead on integer words in closed form, or ``None`` (out of range).

        For a value ``p`` inside an ``n``-bit two's-complement word, sticking bit ``b`` at
        ``v`` changes ``p`` by ``(v - bit_b(p)) * 2^b`` (by ``-(v - bit_b(p)) * 2^(n-1)`` on
        the sign bit), with ``bit_b(p) = floor(p / 2^b) mod 2`` also for negative ``p``. This
        is exact in float64 and takes a few in-place passes instead of a bit pattern's
        round trip through int64 (the hot loop of chip evaluations). Values outside the
        word would wrap around; they take the generic path.
        """
        if values.numel() == 0:
            return values.clone()
        half = float(1 << (word.bits - 1))
        lo, hi = torch.aminmax(values)
        if float(lo) < -half or float(hi) >= half:
            return None
        inv, w, vw, dead = (t[_compact(pe)] for t in self._int_tables(word.bits, values.device))
        out = values * inv  # p / 2^b (exact: a power of two)
        out.floor_().remainder_(2.0)  # bit_b(p) in {0, 1}
        out.mul_(-w).add_(vw).add_(values)  # p + (v - bit) * w
        if bool(dead.any()):
            out = torch.where(dead, torch.zeros_like(out), out)
        return out

    def describe(self) -> dict:
        return {"name": "chip", "site": self.site, "faulty_pes": int(self.faulty_pes().sum()),
                "faulty_fraction": self.chip.faulty_fraction, "seed": self.chip.seed}


for _mode in ("flip-to-0", "flip-to-1", "bitflip"):
    FAULTS.add(_mode, lambda _m=_mode, **kw: BitError(mode=_m, **kw),
               {"flip-to-0": "transient: one random bit cleared (float32: exponent 23..29)",
                "flip-to-1": "transient: one random bit set (float32: exponent 23..29)",
                "bitflip": "transient: one random bit inverted (float32: exponent 23..29)"}[_mode])
FAULTS.add("tf32", lambda **kw: MantissaTruncation(label="tf32", dropped_bits=13, **kw),
           "transient: 13 low mantissa bits zeroed (float32 only)")
FAULTS.add("bf16", lambda **kw: MantissaTruncation(label="bf16", dropped_bits=16, **kw),
           "transient: 16 low mantissa bits zeroed (float32 only)")
FAULTS.add("zero", lambda **kw: ZeroError(**kw), "transient: the value is lost (0)")
FAULTS.add("stuck-at", lambda **kw: PermanentFault("stuck-at", **kw),
           "permanent: one bit of the word stuck at 0/1 (bit=, value=, site=)")
FAULTS.add("dead", lambda **kw: PermanentFault("dead", **kw),
           "permanent: the PE's value is 0 (site=product prunes its weights)")


def list_fault_models() -> list[str]:
    """Names accepted by :func:`create_fault`."""
    return FAULTS.names()


def create_fault(name: str, **params) -> FaultModel | PermanentFault:
    """Builds a registered fault model, e.g. ``create_fault("bitflip", high_bit=30)``."""
    return FAULTS.create(name, **params)
