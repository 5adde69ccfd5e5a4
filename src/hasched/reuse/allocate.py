"""Bit allocation: uniform bits (the reuse baseline) and Mquans (criticality-ranked bits).

**Mquans greedy allocation.** Neurons of all layers are ranked by criticality, least
critical first (ties: layer order, then neuron index). Every neuron starts at ``bits_max``.
Then, level by level for ``b = bits_max - 1, ..., bits_min``, the neurons currently at
``b + 1`` -- always a prefix of the ranking -- are lowered to ``b`` as far down the ranking
as the budget allows: the largest prefix length ``m_b <= m_{b+1}`` whose configuration
(first ``m_b`` neurons at ``b``, the rest unchanged) keeps the accuracy drop on the
calibration set within ``budget``, found by binary search (the drop is assumed to grow with
``m``; every accepted configuration was evaluated, so the final one is within budget
whether or not it does). The search stops early when a level can lower no neuron. The
result is a staircase: the ``m_{bits_min}`` least critical neurons get ``bits_min`` bits,
the next ``m_{bits_min + 1} - m_{bits_min}`` get one bit more, and so on; neurons beyond
``m_{bits_max - 1}`` keep ``bits_max``. Cost: at most ``(bits_max - bits_min) * (1 +
ceil(log2 N))`` evaluations of the quantised model on the calibration set.

**Ranking keys** (:data:`RANKS`). ``criticality`` ranks by the score alone, as the Mquans
abstract describes. ``per-mac`` (the default of ``hasched reuse``) ranks by the score
divided by the MACs a neuron's input feeds (:func:`per_mac`): a neuron's bits decide how
often *its* products are recomputed, so a convolution channel that feeds 80k MACs per
image and a classifier input that feeds 10 should not be lowered at the same price. In our
runs (recipe-trained paper models, 0.5-point budget) ``per-mac`` stayed within the budget
on the evaluation frames on both models (drops 0.42 and 0.35); ``criticality`` did on
mnist32-cnn (0.18) but not on fashion-cnn (0.96), where its neurons averaged 2.7 bits but
its MACs 3.4: most of its lowering went to inputs that feed few MACs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hasched.errors import HaschedError

__all__ = ["Allocation", "RANKS", "per_mac", "rank_neurons", "greedy_allocation",
           "staircase_bits"]

RANKS = ("criticality", "per-mac")


@dataclass
class Allocation:
    """A bit allocation and how it was found.

    Attributes:
        bits: Layer -> ``LongTensor[neurons]``.
        thresholds: Level ``b`` -> ``m_b`` (neurons at ``b`` bits or fewer).
        drop: Accuracy drop of the final configuration on the calibration set (points).
        evaluations: Calibration evaluations spent.
        trace: One ``{"bits", "m", "drop", "accepted"}`` per evaluation.
    """

    bits: dict[str, torch.Tensor]
    thresholds: dict[int, int] = field(default_factory=dict)
    drop: float = 0.0
    evaluations: int = 0
    trace: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"bits": {k: v.tolist() for k, v in self.bits.items()},
                "thresholds": {str(k): v for k, v in self.thresholds.items()},
                "drop": self.drop, "evaluations": self.evaluations, "trace": self.trace}


def per_mac(criticality: dict[str, torch.Tensor], macs_per_neuron: dict[str, float]
            ) -> dict[str, torch.Tensor]:
    """Criticality per MAC: every layer's scores divided by the MACs one neuron feeds.

    Args:
        criticality: Layer -> ``Tensor[neurons]``.
        macs_per_neuron: Layer -> dense MACs per image that one neuron's input feeds.
    """
    out = {}
    for layer, crit in criticality.items():
        macs = float(macs_per_neuron[layer])
        if not macs > 0:
            raise HaschedError(f"layer {layer} feeds no MACs; it cannot be ranked per MAC")
        out[layer] = crit.double() / macs
    return out


def rank_neurons(criticality: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """``(layer, neuron)`` pairs, least critical first; ties by layer order, then index.

    Args:
        criticality: Layer -> ``Tensor[neurons]`` of scores (dict order is layer order).
    """
    keyed = []
    for li, (layer, crit) in enumerate(criticality.items()):
        if bool(torch.isnan(crit).any()):
            raise HaschedError(f"criticality of layer {layer} holds NaN")
        keyed += [(float(c), li, n, layer) for n, c in enumerate(crit.tolist())]
    keyed.sort()
    return [(layer, n) for _, _, n, layer in keyed]


def staircase_bits(order: list[tuple[str, int]], sizes: dict[str, int],
                   thresholds: dict[int, int], bits_max: int) -> dict[str, torch.Tensor]:
    """Bits of every neuron from the levels' prefix lengths (``thresholds[b] = m_b``)."""
    bits = {layer: torch.full((n,), bits_max, dtype=torch.long) for layer, n in sizes.items()}
    for b in sorted(thresholds, reverse=True):  # high levels first, lower ones overwrite
        for layer, n in order[:thresholds[b]]:
            bits[layer][n] = b
    return bits


def greedy_allocation(criticality: dict[str, torch.Tensor],
                      drop_of: Callable[[dict[str, torch.Tensor]], float], budget: float,
                      bits_max: int = 8, bits_min: int = 2,
                      log: Callable[[str], None] | None = None) -> Allocation:
    """Mquans: lower the least critical neurons' bits while the drop stays within budget.

    Args:
        criticality: Layer -> ``Tensor[neurons]`` (higher = more critical).
        drop_of: Bits per layer -> accuracy drop on the calibration set (points).
        budget: Largest accepted drop (points).
        bits_max: Start (and most) bits. bits_min: Fewest bits.
        log: One line per level.
    """
    if not 1 <= bits_min <= bits_max:
        raise HaschedError(f"need 1 <= bits_min <= bits_max, got {bits_min}..{bits_max}")
    if budget < 0:
        raise HaschedError(f"the accuracy-drop budget must be >= 0, got {budget}")
    order = rank_neurons(criticality)
    sizes = {k: int(v.numel()) for k, v in criticality.items()}
    res = Allocation(bits={})
    thresholds: dict[int, int] = {}

    def feasible(b: int, m: int) -> tuple[bool, float]:
        bits = staircase_bits(order, sizes, {**thresholds, b: m}, bits_max)
        d = float(drop_of(bits))
        res.evaluations += 1
        res.trace.append({"bits": b, "m": m, "drop": d, "accepted": d <= budget})
        return d <= budget, d

    res.drop = float(drop_of(staircase_bits(order, sizes, {}, bits_max)))
    res.evaluations += 1
    if res.drop > budget:
        raise HaschedError(f"already {bits_max} bits everywhere lose {res.drop:.3f} points "
                           f"(> budget {budget}); raise the budget or bits_max")
    upper = len(order)
    for b in range(bits_max - 1, bits_min - 1, -1):
        ok, d = feasible(b, upper)
        if ok:
            lo, lo_drop = upper, d
        else:
            lo, hi, lo_drop = 0, upper, res.drop
            while hi - lo > 1:
                mid = (lo + hi) // 2
                ok, d = feasible(b, mid)
                if ok:
                    lo, lo_drop = mid, d
                else:
                    hi = mid
        if lo == 0:
            break
        thresholds[b], upper, res.drop = lo, lo, lo_drop
        if log is not None:
            log(f"mquans: {lo} of {len(order)} neurons at <= {b} bits (drop {lo_drop:.3f})")
    res.bits = staircase_bits(order, sizes, thresholds, bits_max)
    res.thresholds = thresholds
    return res
