"""Mappings: which processing element (PE) computes which partial product of a layer's GEMM.

Every faulty layer computes ``out[b, r, c] = sum_j W[r, j] * X[b, j, c]`` (``r``: weight
row = output feature/channel, ``j``: reduction index, ``b``: sample, ``c``: output column =
spatial position or token). A mapping

1. orders the reduction axis (:attr:`LayerPlan.k_perm`: PyTorch's ``(channel, kh, kw)`` or
   the authors' ``(kh, kw, channel)``);
2. cuts it into *chains* of ``L`` consecutive products that a PE (gpu-tiles) or a row of PEs
   (systolic) accumulates before the chain's sum leaves as one *partial product*; chains are
   summed outside the array, fault-free;
3. names the PE of every (row slot, reduction position).

A *slot* is a row position; a schedule ``perm[slot] = row`` decides which weight row runs in
which slot (the PEs never change, the rows move).

Fault *sites* say what a fault on a PE corrupts (:data:`SITES`):

* ``output``: the chain's sum as the PE emits it (gpu-tiles; the HAS paper's "partial
  product");
* ``product``: every single multiplication the PE performs;
* ``accumulator``: the running sum right after the PE adds its product (a faulty
  accumulator bit then propagates along the chain).

Mappings:

* ``gpu-tiles`` (HAS paper §3.2): ``n_sms`` SMs x ``pes_per_sm`` threads; a tile is
  ``block_height`` rows x ``block_width`` reduction columns (``kh*kw`` for convolutions);
  row ``i`` of a tile runs on thread ``i``; the tile of row-block ``r`` and K-block ``k`` runs
  on SM ``(r * n_k + k) mod n_sms``; a thread computes its whole K-block (chain = the block).
* ``systolic:RxC``, weight-stationary: weight ``W[r, j]`` of a tile sits on PE
  ``(r mod R, j mod C)`` (``j`` in the mapping's K order); the partial sum of a row flows
  left to right through the ``C`` PEs of array row ``r mod R`` (chain = ``C`` columns);
  every row-block and K-tile reuses the same physical PEs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from hasched.errors import HaschedError
from hasched.registry import Registry

__all__ = [
    "SITES",
    "K_ORDERS",
    "GemmShape",
    "LayerPlan",
    "Mapping",
    "GpuTiles",
    "Systolic",
    "MAPPINGS",
    "create_mapping",
]

SITES = ("output", "product", "accumulator")
K_ORDERS = ("chw", "hwc")

MAPPINGS: Registry[type] = Registry("mapping")


@dataclass(frozen=True)
class GemmShape:
    """The GEMM of one layer (per group for grouped convolutions).

    Attributes:
        rows: Weight rows (output features / channels, all groups together).
        k: Reduction length of one row (``in_features`` or ``in_channels/groups * taps``).
        taps: Kernel positions per input channel (``kh * kw``; ``None`` for dense layers).
        channels: Input channels a row reads (``k // taps``); for a dense layer that follows
            a flatten of ``(C, H, W)``, ``C`` (then ``taps = H * W``, see ``spatial_input``).
        spatial_input: ``True`` for a dense layer fed by a flattened ``(C, H, W)`` map, so
            that the ``hwc`` order can be applied to it as in the authors' code.
    """

    rows: int
    k: int
    taps: int | None = None
    channels: int | None = None
    spatial_input: bool = False

    @property
    def is_conv(self) -> bool:
        return self.taps is not None and not self.spatial_input


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's GEMM runs on the mapping.

    Attributes:
        rows: Weight rows. k: Reduction length. chain: Products per chain ``L``.
        n_chains: Chains per row (``ceil(k / L)``; the last one zero-padded).
        k_perm: ``LongTensor[k]``: position ``q`` of the mapping's K order holds PyTorch's
            reduction index ``k_perm[q]``; ``None`` for the identity.
        pe_chain: ``LongTensor[rows, n_chains]`` PE of each (slot, chain), or ``None`` when
            the PE changes inside a chain.
        pe_pos: ``LongTensor[rows, 1 or n_chains, chain]`` PE of each (slot, chain, position);
            a size-1 chain axis broadcasts (systolic: every K-tile uses the same PEs).
    """

    rows: int
    k: int
    chain: int
    n_chains: int
    k_perm: torch.Tensor | None
    pe_chain: torch.Tensor | None
    pe_pos: torch.Tensor

    @property
    def k_padded(self) -> int:
        return self.n_chains * self.chain

    def site_pes(self, site: str) -> torch.Tensor:
        """PE index per site location.

        Returns:
            ``(rows, n_chains, 1)`` for ``output`` sites (one partial product per chain),
            ``pe_pos`` (``(rows, 1 or n_chains, chain)``) for ``product``/``accumulator``.
        """
        if site == "output":
            if self.pe_chain is None:
                raise HaschedError("fault site 'output' needs a mapping where one PE computes "
                                   "a whole chain (gpu-tiles); use product or accumulator")
            return self.pe_chain[:, :, None]
        return self.pe_pos


def _k_perm(shape: GemmShape, order: str) -> torch.Tensor | None:
    """Reduction-axis order: ``chw`` (PyTorch, identity) or ``hwc`` (taps outer)."""
    if order == "chw" or shape.taps is None or shape.channels is None:
        return None
    c, t = shape.channels, shape.taps
    if c * t != shape.k:
        raise HaschedError(f"K order: {shape.k} is not channels {c} x taps {t}")
    # position q = tap * C + channel holds PyTorch index channel * taps + tap
    q = torch.arange(shape.k)
    return (q % c) * t + q // c


class Mapping(ABC):
    """Geometry of an accelerator and its rule for placing a GEMM on PEs."""

    name: str = "?"
    default_site: str = "output"
    k_order: str = "chw"

    @property
    @abstractmethod
    def pe_shape(self) -> tuple[int, int]:
        """Shape of the PE grid (a fault profile or chip map has this shape)."""

    @property
    def n_pes(self) -> int:
        return math.prod(self.pe_shape)

    @abstractmethod
    def plan(self, shape: GemmShape) -> LayerPlan:
        """Places one layer's GEMM (see :class:`LayerPlan`)."""

    def sites(self) -> tuple[str, ...]:
        """Fault sites this mapping supports."""
        return SITES

    def check_site(self, site: str) -> str:
        """Resolves ``auto`` and validates a fault site."""
        if site == "auto":
            return self.default_site
        if site not in self.sites():
            raise HaschedError(f"mapping {self.spec()} supports fault sites "
                               f"{', '.join(self.sites())}, not {site!r}")
        return site

    @abstractmethod
    def spec(self) -> str:
        """The text that :func:`create_mapping` parses back into this mapping."""

    def describe(self) -> dict:
        return {"mapping": self.spec(), "pe_shape": list(self.pe_shape),
                "k_order": self.k_order, "default_site": self.default_site}


@MAPPINGS.register("gpu-tiles")
@dataclass(frozen=True)
class GpuTiles(Mapping):
    """SMs x threads; one thread computes a tile row's whole K-block (HAS paper)."""

    n_sms: int = 20
    pes_per_sm: int = 32
    block_height: int = 32
    dense_block_width: int = 32
    conv_block_width: int | None = None
    k_order: str = "chw"

    name = "gpu-tiles"
    default_site = "output"

    def __post_init__(self) -> None:
        for f in ("n_sms", "pes_per_sm", "block_height", "dense_block_width"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise HaschedError(f"gpu-tiles: {f} must be an integer >= 1, got {v!r}")
        if self.conv_block_width is not None and self.conv_block_width < 1:
            raise HaschedError("gpu-tiles: conv_block_width must be >= 1")
        if self.block_height > self.pes_per_sm:
            raise HaschedError(f"gpu-tiles: block_height {self.block_height} exceeds "
                               f"pes_per_sm {self.pes_per_sm} (one row per thread)")
        if self.k_order not in K_ORDERS:
            raise HaschedError(f"k_order must be one of {', '.join(K_ORDERS)}")

    @property
    def pe_shape(self) -> tuple[int, int]:
        return (self.n_sms, self.pes_per_sm)

    def block_width(self, shape: GemmShape) -> int:
        if shape.is_conv:
            return self.conv_block_width or shape.taps  # type: ignore[return-value]
        return self.dense_block_width

    def plan(self, shape: GemmShape) -> LayerPlan:
        bw = self.block_width(shape)
        n_k = -(-shape.k // bw)
        height = min(self.block_height, shape.rows)
        slots = torch.arange(shape.rows)
        rb, thread = slots // height, slots % height  # (rows,)
        sm = (rb[:, None] * n_k + torch.arange(n_k)[None, :]) % self.n_sms  # (rows, n_k)
        pe = sm * self.pes_per_sm + thread[:, None]  # (rows, n_k)
        return LayerPlan(shape.rows, shape.k, bw, n_k, _k_perm(shape, self.k_order), pe,
                         pe[:, :, None].expand(-1, -1, bw))

    def spec(self) -> str:
        extra = [] if self.n_sms == 20 else [f"sms={self.n_sms}"]
        if self.k_order != "chw":
            extra.append(f"k_order={self.k_order}")
        return "gpu-tiles" + (":" + ",".join(extra) if extra else "")


@MAPPINGS.register("systolic")
@dataclass(frozen=True)
class Systolic(Mapping):
    """Weight-stationary R x C array; partial sums flow along an array row."""

    rows: int = 16
    cols: int = 16
    k_order: str = "chw"

    name = "systolic"
    default_site = "product"

    def __post_init__(self) -> None:
        for f in ("rows", "cols"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise HaschedError(f"systolic: {f} must be an integer >= 1, got {v!r}")
        if self.k_order not in K_ORDERS:
            raise HaschedError(f"k_order must be one of {', '.join(K_ORDERS)}")

    @property
    def pe_shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def sites(self) -> tuple[str, ...]:
        return ("product", "accumulator")

    def plan(self, shape: GemmShape) -> LayerPlan:
        n_t = -(-shape.k // self.cols)
        arow = torch.arange(shape.rows) % self.rows  # (rows,)
        pe = arow[:, None] * self.cols + torch.arange(self.cols)[None, :]  # (rows, cols)
        return LayerPlan(shape.rows, shape.k, self.cols, n_t, _k_perm(shape, self.k_order),
                         None, pe[:, None, :])

    def spec(self) -> str:
        s = f"systolic:{self.rows}x{self.cols}"
        return s + (f",k_order={self.k_order}" if self.k_order != "chw" else "")


def create_mapping(name: str = "gpu-tiles", **params) -> Mapping:
    """Builds a registered mapping, e.g. ``create_mapping("systolic", rows=8, cols=8)``."""
    return MAPPINGS.create(name, **params)
