"""Order crossover (OX; Davis 1985), exactly DEAP's ``tools.cxOrdered`` semantics.

Variant (Goldberg 1989, as in DEAP): two distinct cut points ``lo < hi`` are drawn
uniformly and the segment ``[lo, hi]`` is *inclusive*. For a pair of parents ``(a, b)``:

* ``c1[lo:hi+1] = b[lo:hi+1]``; the remaining positions, starting at ``hi + 1`` and
  wrapping around, receive the genes of ``a`` that are not in that segment, in the order
  they appear in ``a`` when read from ``hi + 1`` with wrap-around.
* ``c2`` is the same with the roles of ``a`` and ``b`` exchanged.

So each child keeps one parent's segment in place and the other parent's relative order.
(pymoo's ``OrderCrossover`` differs: it fills from position 0, not from ``hi + 1``.)

Worked example (Goldberg 1989, 1-based genes, ``lo=3, hi=5``)::

    a  = 9 8 4 | 5 6  7 | 1 3 2 10      c1 = 5 6 7 | 2 3 10 | 1 9 8 4
    b  = 8 7 1 | 2 3 10 | 9 5 4  6      c2 = 2 3 10 | 5 6 7 | 9 4 8 1

The implementation is vectorised over the batch of pairs: rotate every row so that it
starts at ``hi + 1``; then the segment occupies the last ``L = hi - lo + 1`` rotated slots
and the fill is a stable compaction of the other parent's kept genes into the first
``n - L`` slots.
"""

from __future__ import annotations

import torch


def order_crossover_at(
    a: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """OX with given cut points (deterministic core of :func:`order_crossover`).

    Args:
        a, b: parents, ``LongTensor[M, n]`` (row ``m`` of each forms pair ``m``).
        lo, hi: ``LongTensor[M]`` with ``0 <= lo <= hi < n``; segment ``[lo, hi]`` inclusive.

    Returns:
        ``(c1, c2)``, each ``LongTensor[M, n]``: ``c1`` carries ``b``'s segment and ``a``'s
        order, ``c2`` carries ``a``'s segment and ``b``'s order.
    """
    m, n = a.shape
    k = torch.arange(n).unsqueeze(0)  # (1, n) rotated slot index
    rot = (k + hi.unsqueeze(1) + 1) % n  # (M, n) actual position of rotated slot k
    seg_len = (hi - lo + 1).unsqueeze(1)  # (M, 1)
    in_seg = k >= n - seg_len  # (M, n) rotated slots that lie in [lo, hi]

    def child(order_from: torch.Tensor, seg_from: torch.Tensor) -> torch.Tensor:
        seg_rot = seg_from.gather(1, rot)  # (M, n)
        # Mark, by gene value, which genes the segment already provides.
        provided = torch.zeros(m, n, dtype=torch.bool).scatter_(1, seg_rot, in_seg)  # (M, n)
        ord_rot = order_from.gather(1, rot)  # (M, n)
        drop = provided.gather(1, ord_rot).to(torch.uint8)  # (M, n)
        # Stable sort on the 0/1 drop flag moves kept genes to the front, order preserved.
        fill = ord_rot.gather(1, torch.argsort(drop, dim=1, stable=True))  # (M, n)
        child_rot = torch.where(in_seg, seg_rot, fill)  # (M, n)
        return torch.empty_like(order_from).scatter_(1, rot, child_rot)

    return child(a, b), child(b, a)


def random_cut_points(
    m: int, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct cut points per pair, uniform over unordered pairs (like DEAP's
    ``random.sample(range(n), 2)`` sorted). Needs ``n >= 2``.

    Returns:
        ``(lo, hi)``, each ``LongTensor[M]`` with ``lo < hi``.
    """
    x = torch.randint(0, n, (m,), generator=generator)  # (M,)
    y = torch.randint(0, n - 1, (m,), generator=generator)  # (M,)
    y = y + (y >= x).long()  # uniform over values != x
    return torch.minimum(x, y), torch.maximum(x, y)


def order_crossover(
    a: torch.Tensor, b: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """OX on a batch of parent pairs with random cut points (see module docstring).

    Args:
        a, b: ``LongTensor[M, n]`` parents; inputs are not modified.
        generator: source of randomness.

    Returns:
        ``(c1, c2)``, each ``LongTensor[M, n]``. With ``n == 1`` there is only one
        permutation, so the children are copies of the parents.
    """
    m, n = a.shape
    if b.shape != a.shape:
        raise ValueError(f"parent shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if n < 2 or m == 0:
        return a.clone(), b.clone()
    lo, hi = random_cut_points(m, n, generator)
    return order_crossover_at(a, b, lo, hi)
