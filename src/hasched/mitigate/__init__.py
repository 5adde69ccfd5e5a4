"""Mitigations of a chip's permanent faults, given its fault map.

* :mod:`~hasched.mitigate.retune`: Fal-reTune's weight mapping function (replace each weight
  on a faulty PE by the int8 value whose *faulty approximate* product best reproduces the
  intended product over the layer's calibration activations);
* :mod:`~hasched.mitigate.ste`: a short fine-tune with the faulty approximate GEMM in the
  loop (straight-through estimator);
* :mod:`~hasched.mitigate.methods`: the registry of mitigations side by side (``retune``,
  ``prune``, ``remap``, ``finetune``), each turning (model, chip) into an edited model, a
  schedule and the chip it then runs on.

Every mitigation edits int8 weights with their scales pinned
(:data:`hasched.sim.arithmetic.PINNED_SCALE_ATTR`), so an edit never re-quantises a row.
"""
