"""Error models: what a fault does to one FP32 partial product, as bit operations.

Every model works on the IEEE-754 bit pattern (``float32`` viewed as ``int32``):

* ``flip-to-0`` / ``flip-to-1`` / ``bitflip``: one random exponent bit is cleared / set /
  inverted. The bit is drawn uniformly from ``low_bit..high_bit``. The default 23..29
  reproduces the authors' released code, which never picks the top exponent bit (30); pass
  ``high_bit=30`` for the whole exponent.
* ``tf32`` / ``bf16``: the 13 / 16 low mantissa bits are zeroed (truncation, not rounding).
* ``zero``: the partial product is lost (set to 0). This is also what the authors' released
  truncation code does on a CPU, where its mask overflows.

New models (INT8 arithmetic, stuck-at maps, ...) plug in with :func:`register_error_model`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hasched.errors import HaschedError

__all__ = [
    "ErrorModel",
    "ExponentBitError",
    "MantissaTruncation",
    "ZeroError",
    "PAPER_FR_MAX",
    "register_error_model",
    "create_error_model",
    "list_error_models",
]

# Table 1 of the paper: the maximum fault rates studied per error type.
PAPER_FR_MAX: dict[str, tuple[float, ...]] = {
    "flip-to-0": (0.1, 0.2, 0.5),
    "flip-to-1": (1e-3, 2e-3, 5e-3),
    "bitflip": (1e-3, 2e-3, 5e-3),
    "tf32": (0.1, 0.2, 0.5),
    "bf16": (0.1, 0.2, 0.5),
}


class ErrorModel(ABC):
    """Corrupts FP32 values that a fault hit."""

    name: str = "?"

    @abstractmethod
    def corrupt(self, values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Returns the corrupted version of every element of ``values`` (float32)."""

    def corrupt_u(self, values: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Like :meth:`corrupt`, taking its randomness from uniforms ``u`` in [0, 1).

        The dense GEMM path draws one uniform per partial product: it decides the hit
        (``u < rate``) and, rescaled (``u / rate``, uniform again given a hit), which bit the
        hit flips. Models that need no randomness ignore ``u``.
        """
        return self.corrupt(values, None)

    def describe(self) -> dict:
        return {"name": self.name}


def _bits(values: torch.Tensor) -> torch.Tensor:
    if values.dtype != torch.float32:
        raise HaschedError(f"error models act on float32 bit patterns, got {values.dtype}")
    return values.contiguous().view(torch.int32)


@dataclass(frozen=True)
class ExponentBitError(ErrorModel):
    """One uniformly chosen exponent bit is set to 0, set to 1, or inverted.

    Attributes:
        mode: ``"flip-to-0"``, ``"flip-to-1"`` or ``"bitflip"``.
        low_bit: Lowest bit that can be hit (23 is the exponent's lowest).
        high_bit: Highest bit that can be hit, inclusive (30 is the exponent's highest).
    """

    mode: str
    low_bit: int = 23
    high_bit: int = 29

    def __post_init__(self) -> None:
        if self.mode not in ("flip-to-0", "flip-to-1", "bitflip"):
            raise HaschedError(f"unknown exponent error mode {self.mode!r}")
        if not 0 <= self.low_bit <= self.high_bit <= 31:
            raise HaschedError(
                f"{self.mode}: need 0 <= low_bit <= high_bit <= 31, "
                f"got {self.low_bit}..{self.high_bit}"
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.mode

    def corrupt(self, values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        bits = _bits(values)
        pos = torch.randint(self.low_bit, self.high_bit + 1, bits.shape,
                            generator=generator, device=bits.device, dtype=torch.int32)
        return self._apply(bits, pos)

    def corrupt_u(self, values: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n = self.high_bit - self.low_bit + 1
        pos = (u * n).to(torch.int32).clamp_(max=n - 1) + self.low_bit
        return self._apply(_bits(values), pos)

    def _apply(self, bits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        mask = torch.bitwise_left_shift(torch.ones_like(pos), pos)
        if self.mode == "flip-to-1":
            out = bits | mask
        elif self.mode == "flip-to-0":
            out = bits & ~mask
        else:
            out = bits ^ mask
        return out.view(torch.float32)

    def describe(self) -> dict:
        return {"name": self.mode, "low_bit": self.low_bit, "high_bit": self.high_bit}


@dataclass(frozen=True)
class MantissaTruncation(ErrorModel):
    """Zeroes the ``dropped_bits`` least significant mantissa bits (TF32: 13, BF16: 16)."""

    label: str
    dropped_bits: int

    def __post_init__(self) -> None:
        if not 0 <= self.dropped_bits <= 23:
            raise HaschedError(f"{self.label}: dropped_bits must be in 0..23")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    def corrupt(self, values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # -(1 << n) in two's complement is ...1110..0: it keeps sign, exponent, high mantissa.
        keep = torch.tensor(-(1 << self.dropped_bits), dtype=torch.int32, device=values.device)
        return (_bits(values) & keep).view(torch.float32)

    def describe(self) -> dict:
        return {"name": self.label, "dropped_bits": self.dropped_bits}


@dataclass(frozen=True)
class ZeroError(ErrorModel):
    """The partial product is lost: it contributes 0 to the sum."""

    @property
    def name(self) -> str:  # type: ignore[override]
        return "zero"

    def corrupt(self, values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.zeros_like(values)


_REGISTRY: dict[str, Callable[..., ErrorModel]] = {}


def register_error_model(name: str) -> Callable:
    """Decorator: registers a factory ``(**params) -> ErrorModel`` under ``name``."""

    def deco(factory: Callable[..., ErrorModel]) -> Callable[..., ErrorModel]:
        _REGISTRY[name] = factory
        return factory

    return deco


for _mode in ("flip-to-0", "flip-to-1", "bitflip"):
    register_error_model(_mode)(
        lambda _m=_mode, **kw: ExponentBitError(mode=_m, **kw)
    )
register_error_model("tf32")(lambda **kw: MantissaTruncation(label="tf32", dropped_bits=13, **kw))
register_error_model("bf16")(lambda **kw: MantissaTruncation(label="bf16", dropped_bits=16, **kw))
register_error_model("zero")(lambda **kw: ZeroError(**kw))


def list_error_models() -> list[str]:
    """Names accepted by :func:`create_error_model`."""
    return list(_REGISTRY)


def create_error_model(name: str, **params) -> ErrorModel:
    """Builds a registered error model, e.g. ``create_error_model("bitflip", high_bit=30)``."""
    if name not in _REGISTRY:
        raise HaschedError(
            f"unknown error model {name!r}; known: {', '.join(list_error_models())}"
        )
    try:
        return _REGISTRY[name](**params)
    except TypeError as err:
        raise HaschedError(f"error model {name!r}: bad parameters ({err})") from None
