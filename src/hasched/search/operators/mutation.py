"""Swap mutation: exchange two distinct positions of a permutation."""

from __future__ import annotations

import torch


def swap_positions(
    x: torch.Tensor, rows: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """Copy of ``x`` with ``x[rows[k], i[k]]`` and ``x[rows[k], j[k]]`` exchanged.

    Args:
        x: ``LongTensor[P, n]``.
        rows, i, j: ``LongTensor[K]``; ``rows`` must not repeat (one swap per row).
    """
    out = x.clone()
    vi = out[rows, i].clone()  # (K,)
    out[rows, i] = out[rows, j]
    out[rows, j] = vi
    return out


def swap_mutation(
    x: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Swap two distinct random positions in each row of ``x`` where ``mask`` is true.

    Positions are drawn for every row, masked or not, so how much randomness is consumed
    does not depend on the mask (keeps runs comparable across mutation rates).
    With ``n == 1`` there is nothing to swap and rows come back unchanged.

    Args:
        x: ``LongTensor[P, n]`` of permutations (not modified).
        mask: ``BoolTensor[P]``, which rows mutate.
        generator: source of randomness.

    Returns:
        ``LongTensor[P, n]``; every mutated row differs from its input in exactly two places.
    """
    p, n = x.shape
    if n < 2:
        return x.clone()
    i = torch.randint(0, n, (p,), generator=generator)  # (P,)
    # Drawing j from n-1 values and skipping i gives a uniform j != i without rejection.
    j = torch.randint(0, n - 1, (p,), generator=generator)  # (P,)
    j = j + (j >= i).long()
    rows = mask.nonzero().squeeze(1)  # (K,)
    return swap_positions(x, rows, i[rows], j[rows])
