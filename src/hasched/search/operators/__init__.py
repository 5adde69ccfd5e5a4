"""Permutation operators: sampling, order crossover, swap mutation (all batched)."""

from hasched.search.operators.crossover import order_crossover, order_crossover_at
from hasched.search.operators.mutation import swap_mutation
from hasched.search.operators.sampling import (
    identity_permutations,
    random_permutations,
    sample_population,
)

__all__ = [
    "identity_permutations",
    "order_crossover",
    "order_crossover_at",
    "random_permutations",
    "sample_population",
    "swap_mutation",
]
