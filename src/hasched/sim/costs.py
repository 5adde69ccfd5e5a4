"""Which path evaluates a faulty layer fastest: a cost model from hits, shapes and MACs.

The paths (see the README's *Speed*) cost, per chunk of ``N`` images and ``P`` members:

* **dense**: every partial product of every member is drawn, corrupted and summed:
  ``P * N * (pp * DENSE_PP_NS + (layer + downstream MACs) * MAC_NS)``;
* **sparse**: the clean layer once, each hit's chain gathered and recomputed, everything
  downstream per member: ``N * layer MACs * MAC_NS + hits * hit_ns + P * N * downstream``;
* **incremental**: the hits, then only the rows they changed downstream:
  ``hits * hit_ns + affected rows * downstream MACs * MAC_NS``, where a member-image with
  ``h`` expected hits is affected with probability ``1 - exp(-h)``.

``hit_ns = HIT_NS + chain * HIT_ELEM_NS``: a hit gathers its chain's operands, except on the
incremental path for one-chain layers at the output site, whose chain value is the cached
clean output itself (chain 0). The constants were fitted on the reference machine (one CPU
thread, ``mnist32-cnn`` h0 and c0 across FR_max 1e-4..0.5; the dense constant sits between
its one- and two-thread values, 107 and 63 ns); only their ratios matter, and
they are fixed so that the same scenario always takes the same path (hence the same
draws). ``make bench`` shows, per FR_max, the chosen path's time beside the others'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DENSE_PP_NS", "HIT_ELEM_NS", "HIT_NS", "MAC_NS", "LayerCost", "path_costs",
           "sparse_is_cheaper"]

DENSE_PP_NS = 90.0  # per partial product and member: GEMM share, uniform, mask, fault, sum
HIT_NS = 300.0  # per hit: draw, decode, fault model, scatter
HIT_ELEM_NS = 50.0  # per chain element a hit gathers and multiplies (float64)
MAC_NS = 0.1  # one multiply-accumulate of a clean GEMM (conv or linear)


@dataclass(frozen=True)
class LayerCost:
    """What a faulty layer costs per image.

    Attributes:
        pp: Partial products (rows x output columns x chains).
        chain: Elements per chain (what a sparse hit gathers).
        macs: The layer's own multiply-accumulates.
        downstream_macs: Multiply-accumulates of every layer after it.
        cached_chain: One chain per output at the output site: the incremental path reads
            the chain's value from the cached clean output instead of gathering it.
    """

    pp: int
    chain: int
    macs: int
    downstream_macs: int
    cached_chain: bool = False


def sparse_is_cheaper(mean_rate: float, chain: int) -> bool:
    """Layer-level choice: draw hits (sparse) or every partial product (dense)?

    Per partial product the sparse path pays ``mean_rate * hit_ns``, the dense path
    ``DENSE_PP_NS``; the clean GEMM is the same on both.
    """
    return mean_rate * (HIT_NS + chain * HIT_ELEM_NS) < DENSE_PP_NS


def path_costs(lc: LayerCost, hits_per_image: float, population: int, images: int
               ) -> dict[str, float]:
    """Estimated nanoseconds of each path for ``images`` images and ``population`` members.

    Args:
        lc: The first faulty layer's costs.
        hits_per_image: Expected hits per image, summed over all members.
    """
    P, N = population, images
    gather = 0 if lc.cached_chain else lc.chain
    hits_ns = hits_per_image * N * (HIT_NS + lc.chain * HIT_ELEM_NS)
    affected = P * N * (1.0 - math.exp(-hits_per_image / max(P, 1)))
    down = lc.downstream_macs * MAC_NS
    return {
        "dense": P * N * (lc.pp * DENSE_PP_NS + lc.macs * MAC_NS + down),
        "sparse": N * lc.macs * MAC_NS + hits_ns + P * N * down,
        "incremental": hits_per_image * N * (HIT_NS + gather * HIT_ELEM_NS) + affected * down,
    }
