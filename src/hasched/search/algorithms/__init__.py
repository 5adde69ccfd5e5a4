"""Searchers; importing this module registers them."""

from hasched.search.algorithms.cma_es import CMAES, CMAConfig
from hasched.search.algorithms.criticality import CriticalityConfig, CriticalitySearch
from hasched.search.algorithms.ga import GAConfig, GeneticAlgorithm
from hasched.search.algorithms.hybrid import HybridConfig, HybridSearch
from hasched.search.algorithms.random_search import RandomSearch, RandomSearchConfig

__all__ = [
    "CMAConfig",
    "CMAES",
    "CriticalityConfig",
    "CriticalitySearch",
    "GAConfig",
    "GeneticAlgorithm",
    "HybridConfig",
    "HybridSearch",
    "RandomSearch",
    "RandomSearchConfig",
]
