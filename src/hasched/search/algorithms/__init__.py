"""Searchers; importing this module registers them."""

from hasched.search.algorithms.ga import GAConfig, GeneticAlgorithm
from hasched.search.algorithms.random_search import RandomSearch, RandomSearchConfig

__all__ = ["GAConfig", "GeneticAlgorithm", "RandomSearch", "RandomSearchConfig"]
