"""Computation reuse across consecutive frames with per-neuron quantisation (Mquans).

:mod:`~hasched.reuse.quant` (neurons, quantisers), :mod:`~hasched.reuse.engine` (the delta
engine and its MAC counts), :mod:`~hasched.reuse.criticality` (per-neuron fault tolerance
by perturbation populations), :mod:`~hasched.reuse.allocate` (uniform and Mquans bits).
"""
