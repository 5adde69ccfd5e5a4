"""Initial permutations: random (batched) and identity."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def random_permutations(count: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` independent uniform permutations of ``range(n)``.

    Argsort of i.i.d. uniforms is uniform over permutations (ties have probability ~0 at
    float32 for the row counts of real layers) and draws everything in one call.

    Returns:
        ``LongTensor[count, n]``.
    """
    return torch.argsort(torch.rand(count, n, generator=generator), dim=1)  # (count, n)


def identity_permutations(count: int, n: int) -> torch.Tensor:
    """``count`` copies of the unshuffled order ``0..n-1``: ``LongTensor[count, n]``."""
    return torch.arange(n).expand(count, n).clone()  # (count, n)


def sample_population(
    sizes: Mapping[str, int],
    count: int,
    generator: torch.Generator,
    include_identity: bool,
) -> dict[str, torch.Tensor]:
    """A population of ``count`` individuals, one permutation per layer each.

    Args:
        sizes: ``{layer: n}``; layers are drawn in this order.
        count: number of individuals ``P``.
        generator: source of randomness.
        include_identity: make individual 0 the identity in every layer, the reference
            schedule, so a search can never report worse than running unshuffled.

    Returns:
        ``{layer: LongTensor[count, n]}``.
    """
    out: dict[str, torch.Tensor] = {}
    for layer, n in sizes.items():
        perms = random_permutations(count, n, generator)  # (P, n)
        if include_identity and count > 0:
            perms[0] = torch.arange(n)
        out[layer] = perms
    return out
