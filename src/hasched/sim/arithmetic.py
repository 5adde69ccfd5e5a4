"""Arithmetic of the simulated datapath: how partial products are formed and summed.

* ``fp32`` (default): IEEE single precision. Products are formed exactly (float64) and a
  chain's sum is rounded to float32 once, as a PE with an FP32 accumulator would; chains
  are added in a fixed order. Fault-free outputs are the layer's own PyTorch result.
* ``int8``: post-training quantisation. Weights: symmetric per output channel
  (``s_w[r] = max|W[r]| / 127``); activations: symmetric per tensor
  (``s_x = max|x| / 127`` over calibration images of the training set). Products of the
  int8 operands (by the chosen :class:`~hasched.sim.multipliers.Multiplier`) are summed
  exactly in int32 (held in float64, which is exact for these magnitudes); the layer's
  output is ``s_x * s_w[r] * acc + bias``.

Values a fault can hit are *words*: the float32 bit pattern for ``fp32``; for ``int8`` a
two's-complement integer of 16 bits (a product) or 32 bits (a partial sum / accumulator).

:class:`LayerArith` is the one place that forms products and chain sums; the dense, sparse
and incremental paths all call it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from hasched.errors import HaschedError
from hasched.registry import Registry
from hasched.sim.multipliers import Multiplier, create_multiplier, lut_bits_needed

__all__ = ["Word", "Arithmetic", "Fp32", "Int8", "LayerArith", "ARITHMETICS",
           "create_arithmetic", "PINNED_SCALE_ATTR", "PINNED_ABSMAX_ATTR", "int8_weight_scales",
           "pin_int8_scales"]

ARITHMETICS: Registry[type] = Registry("arithmetic")
_GATHER_CHUNK = 1 << 23  # elements of one LUT-gather temporary
# A module attribute holding fixed per-row int8 weight scales (float64 ``(R,)``): weights
# edited in the int8 domain (pruned, retuned, fine-tuned) keep the scales they were
# quantised with instead of being re-quantised to a new ``max |W[r]|``.
PINNED_SCALE_ATTR = "int8_weight_scale"
# Likewise a fixed ``max |input|`` (float) of the layer: the activation scale the deployed
# int8 model was calibrated with (see :mod:`hasched.sim.probe`).
PINNED_ABSMAX_ATTR = "int8_input_absmax"


def int8_weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row scales ``max |W[r]| / 127`` (float64 ``(R,)``) of ``(R, K)`` weights."""
    return weight.detach().double().abs().amax(1).clamp(min=1e-12) / 127.0


def pin_int8_scales(module: torch.nn.Module, in_absmax: float | None = None) -> torch.Tensor:
    """Fixes a layer's int8 weight scales at their current values (once; returns them) and,
    when given, its input range ``in_absmax`` (once)."""
    scale = getattr(module, PINNED_SCALE_ATTR, None)
    if scale is None:
        scale = int8_weight_scales(module.weight.reshape(module.weight.shape[0], -1))
        setattr(module, PINNED_SCALE_ATTR, scale)
    if in_absmax is not None and getattr(module, PINNED_ABSMAX_ATTR, None) is None:
        setattr(module, PINNED_ABSMAX_ATTR, float(in_absmax))
    return scale


@dataclass(frozen=True)
class Word:
    """How a fault sees a value: ``float32`` bits, or a signed integer of ``bits`` bits."""

    kind: str  # "float32" | "int"
    bits: int = 32


class Arithmetic(ABC):
    """A datapath: builds the per-layer numbers (:class:`LayerArith`)."""

    name: str = "?"
    needs_calibration: bool = False

    @abstractmethod
    def layer(self, weight: torch.Tensor, in_absmax: float | None,
              w_scale: torch.Tensor | None = None) -> LayerArith:
        """Numbers of one layer.

        Args:
            weight: ``(R, K)`` float weights in PyTorch's reduction order.
            in_absmax: ``max |x|`` of the layer's input over calibration data (int8).
            w_scale: Pinned per-row int8 weight scales (see :data:`PINNED_SCALE_ATTR`), or
                ``None`` to derive them from ``weight``.
        """

    @abstractmethod
    def spec(self) -> str:
        """Text that :func:`create_arithmetic` parses back."""


@ARITHMETICS.register("fp32")
@dataclass(frozen=True)
class Fp32(Arithmetic):
    """IEEE single precision (the HAS paper's GPU)."""

    name = "fp32"

    def layer(self, weight: torch.Tensor, in_absmax: float | None,
              w_scale: torch.Tensor | None = None) -> LayerArith:
        return LayerArith(self, weight.detach().float(), None, None, None)

    def spec(self) -> str:
        return "fp32"


@ARITHMETICS.register("int8")
@dataclass(frozen=True, eq=False)
class Int8(Arithmetic):
    """Symmetric int8 PTQ, int32 accumulation, exact or approximate multiplier."""

    multiplier: Multiplier | str = "exact"

    name = "int8"
    needs_calibration = True

    def __post_init__(self) -> None:
        if isinstance(self.multiplier, str):
            object.__setattr__(self, "multiplier", create_multiplier(self.multiplier))

    def layer(self, weight: torch.Tensor, in_absmax: float | None,
              w_scale: torch.Tensor | None = None) -> LayerArith:
        if in_absmax is None:
            raise HaschedError("int8 arithmetic needs calibration data for activation scales")
        w = weight.detach().double()
        if w_scale is None:
            s_w = int8_weight_scales(w)  # (R,)
        else:
            s_w = w_scale.detach().double().to(w.device).reshape(-1)
            if s_w.shape[0] != w.shape[0] or not bool((s_w > 0).all()):
                raise HaschedError(f"pinned int8 weight scales: need {w.shape[0]} positive "
                                   f"values, got {tuple(w_scale.shape)}")
        wq = torch.round(w / s_w[:, None]).clamp_(-127, 127)  # (R, K) integer-valued
        s_x = max(float(in_absmax), 1e-12) / 127.0
        return LayerArith(self, wq.float(), s_w.float(), s_x, self.multiplier)

    def spec(self) -> str:
        m = self.multiplier
        return "int8" if m.name == "exact" else f"int8:{m.name}"


class LayerArith:
    """One layer's operands and the product/sum kernel of its arithmetic.

    Attributes:
        arith: The arithmetic. w: ``(R, K)`` weights in the compute domain (float32; for
            int8 integer-valued). s_w: ``(R,)`` weight scales or ``None``. s_x: activation
            scale or ``None``. mult: the int8 multiplier or ``None``.
    """

    def __init__(self, arith: Arithmetic, w: torch.Tensor, s_w: torch.Tensor | None,
                 s_x: float | None, mult: Multiplier | None) -> None:
        self.arith, self.w, self.s_w, self.s_x, self.mult = arith, w, s_w, s_x, mult
        self.is_int = s_x is not None
        self.exact_mult = mult is None or mult.is_exact
        if mult is not None and not mult.is_exact:
            self._table = torch.from_numpy(mult.signed_table().astype("float64")).reshape(-1)
            self._factors = mult.factors()
        self.product_bits = 16 if mult is None else max(16, min(32, lut_bits_needed(mult) + 1))

    def map_weights(self, k_perm: torch.Tensor | None, k_padded: int) -> None:
        """Stores ``w_mapped``: weights in the mapping's K order, zero-padded to whole chains.

        Args:
            k_perm: ``LongTensor[K]`` (position -> PyTorch index) or ``None``.
            k_padded: Reduction length rounded up to whole chains.
        """
        w = self.w if k_perm is None else self.w[:, k_perm.to(self.w.device)]
        self.w_mapped = torch.nn.functional.pad(w, (0, k_padded - w.shape[1]))  # (R, Kp)

    def word(self, site: str) -> Word:
        """The word a fault at ``site`` acts on."""
        if not self.is_int:
            return Word("float32")
        return Word("int", self.product_bits if site == "product" else 32)

    def to(self, device: torch.device) -> LayerArith:
        self.w = self.w.to(device)
        if hasattr(self, "w_mapped"):
            self.w_mapped = self.w_mapped.to(device)
        if self.s_w is not None:
            self.s_w = self.s_w.to(device)
        if hasattr(self, "_table"):
            self._table = self._table.to(device)
            if self._factors is not None:
                self._factors = tuple(f.to(device) for f in self._factors)
        return self

    # ------------------------------------------------------------------ inputs / outputs
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Input in the compute domain (int8: integer-valued float32)."""
        if not self.is_int:
            return x
        return torch.round(x / self.s_x).clamp_(-127, 127)

    def dequantize(self, acc: torch.Tensor, row_dim: int) -> torch.Tensor:
        """Accumulator -> float32 layer output (before bias); ``row_dim`` indexes rows."""
        if not self.is_int:
            return acc.float()
        shape = [1] * acc.dim()
        shape[row_dim] = -1
        return (acc * (self.s_w.double().reshape(shape) * self.s_x)).float()

    # ------------------------------------------------------------------------- the kernel
    def products(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Elementwise products of compute-domain operands, exactly, as float64."""
        if self.exact_mult:
            return w.double() * x.double()
        idx = (w.long() + 128) * 256 + (x.long() + 128)
        return self._table[idx]

    def chain_value(self, sums: torch.Tensor) -> torch.Tensor:
        """A chain's exact float64 sum as the PE emits it (fp32: rounded to float32)."""
        return sums if self.is_int else sums.float()

    def matmul(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact float64 ``w @ x`` under this multiplier (broadcasting like torch.matmul).

        Args:
            w: ``(..., R, L)`` compute-domain weights. x: ``(..., L, C)`` inputs.
        """
        if self.exact_mult:
            return _folded_matmul(w.double(), x.double())
        if self._factors is not None:
            a, b = self._factors  # (256, r) each
            wi, xi = w.long() + 128, x.long() + 128
            out = sum(_folded_matmul(a[:, t][wi], b[:, t][xi]) for t in range(a.shape[1]))
            return torch.round(out)
        return self._gather_matmul(w, x)

    def _gather_matmul(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``sum_l T[w[..., r, l], x[..., l, c]]`` by chunked table lookups (exact)."""
        shape = torch.broadcast_shapes(w.shape[:-2], x.shape[:-2])
        w = w.expand(*shape, *w.shape[-2:]).reshape(-1, *w.shape[-2:])  # (N, R, L)
        x = x.expand(*shape, *x.shape[-2:]).reshape(-1, *x.shape[-2:])  # (N, L, C)
        N, R, L = w.shape
        C = x.shape[-1]
        wi = (w.long() + 128) * 256  # (N, R, L)
        xi = x.long() + 128  # (N, L, C)
        out = torch.empty(N, R, C, dtype=torch.float64, device=w.device)
        step = max(1, _GATHER_CHUNK // max(1, R * L * C))
        for i in range(0, N, step):
            idx = wi[i:i + step, :, :, None] + xi[i:i + step, None, :, :]  # (n, R, L, C)
            out[i:i + step] = self._table[idx].sum(2)
        return out.reshape(*shape, R, C)

    def block_values(self, wb: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """Every chain's partial product: ``(n_c, R, L) @ (..., n_c, L, C) -> (..., n_c, R, C)``.

        fp32 values are rounded to float32 once per chain; int values are exact.
        """
        return self.chain_value(self.matmul(wb, xb))

    def sum_chains(self, v: torch.Tensor, dim: int) -> torch.Tensor:
        """Adds chain values along ``dim`` in a fixed order (exact for int)."""
        if self.is_int:
            return v.sum(dim)
        v = v.movedim(dim, 0)
        acc = v[0].clone()
        for i in range(1, v.shape[0]):
            acc += v[i]
        return acc

    def accumulator_dtype(self) -> torch.dtype:
        return torch.float64 if self.is_int else torch.float32


def _folded_matmul(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w (*B, R, L) @ x (*N, *B, L, C)``, with x's extra leading dims folded into columns.

    A dense layer's blocks have one column per sample (C = 1): broadcasting would run one
    matrix-vector product per sample and chain (measured 0.1 GFLOP/s for h0); folding the
    samples into the columns makes it one GEMM per chain block.
    """
    extra = x.dim() - w.dim()
    if extra < 1 or x.shape[-1] > 64 or tuple(x.shape[extra:-2]) != tuple(w.shape[:-2]):
        return torch.matmul(w, x)
    lead, nb = x.shape[:extra], w.dim() - 2
    C = x.shape[-1]
    xf = x.reshape(-1, *x.shape[extra:])  # (n, *B, L, C)
    n = xf.shape[0]
    cols = xf.permute(*range(1, nb + 2), 0, nb + 2).reshape(*xf.shape[1:-1], n * C)
    out = torch.matmul(w, cols).reshape(*w.shape[:-1], n, C)  # (*B, R, n, C)
    return out.permute(nb + 1, *range(nb + 1), nb + 2).reshape(*lead, *w.shape[:-1], C)


def create_arithmetic(name: str = "fp32", multiplier: str | Multiplier = "exact") -> Arithmetic:
    """``fp32`` or ``int8`` (with a multiplier spec, see
    :func:`hasched.sim.multipliers.create_multiplier`)."""
    if name == "fp32":
        if multiplier not in ("exact", None):
            raise HaschedError("a multiplier other than exact needs --arithmetic int8")
        return Fp32()
    return ARITHMETICS.create(name, multiplier=multiplier)
