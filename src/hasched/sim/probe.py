"""One fp32 forward pass that tells the simulator what a layer's inputs look like.

* ``absmax``: ``max |input|`` of every accelerated layer on calibration images (the int8
  activation scale is ``absmax / 127``), or the range pinned on the module
  (:data:`~hasched.sim.arithmetic.PINNED_ABSMAX_ATTR`: an edited model keeps its
  calibration);
* ``spatial``: for a Linear layer fed by ``nn.Flatten`` of a ``(C, H, W)`` map, that shape,
  so that a mapping with the authors' ``hwc`` reduction order can reorder its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hasched.sim.arithmetic import PINNED_ABSMAX_ATTR, Arithmetic
from hasched.sim.mapping import Mapping

__all__ = ["Probe", "activation_probe"]

_TRANSPARENT = (nn.Dropout, nn.Identity)


@dataclass
class Probe:
    absmax: dict[str, float] = field(default_factory=dict)
    spatial: dict[str, tuple[int, int, int]] = field(default_factory=dict)


@torch.no_grad()
def activation_probe(model: nn.Module, layers: list[str], images: torch.Tensor,
                     calibration: torch.Tensor | None, arith: Arithmetic, mapping: Mapping,
                     n_default: int = 512) -> Probe:
    """Runs ``model`` once on calibration images (only when something needs it).

    Args:
        model: The fp32 model. layers: Accelerated layer names.
        images: Evaluation images (fallback calibration data).
        calibration: Calibration images, or ``None`` for the first ``n_default`` images.
        arith: The arithmetic (int8 needs ``absmax``). mapping: Its ``k_order``.
    """
    probe = Probe()
    need_scale = arith.needs_calibration
    need_shape = mapping.k_order == "hwc"
    if not (need_scale or need_shape):
        return probe
    x = calibration if calibration is not None else images[:n_default]
    x = x.to(images.device)
    mods = dict(model.named_modules())
    log: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    wanted = set(layers)

    def hook(name: str):
        def pre(mod: nn.Module, args) -> None:
            inp = args[0]
            log.append((name, mod, tuple(inp.shape)))
            if name in wanted and need_scale:
                probe.absmax[name] = max(probe.absmax.get(name, 0.0), float(inp.abs().max()))
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()
               if n and not list(m.children())]
    try:
        for i in range(0, x.shape[0], 256):
            model(x[i:i + 256])
    finally:
        for h in handles:
            h.remove()
    for name in layers:  # a deployed int8 model keeps the ranges it was calibrated with
        pinned = getattr(mods.get(name), PINNED_ABSMAX_ATTR, None)
        if pinned is not None and need_scale:
            probe.absmax[name] = float(pinned)
    if need_shape:
        for i, (name, mod, _shape) in enumerate(log[: len(log) // max(1, -(-x.shape[0] // 256))]):
            if name not in wanted or not isinstance(mod, nn.Linear):
                continue
            j = i - 1
            while j >= 0 and isinstance(log[j][1], _TRANSPARENT):
                j -= 1
            if j >= 0 and isinstance(log[j][1], nn.Flatten) and len(log[j][2]) == 4:
                probe.spatial[name] = tuple(log[j][2][1:])  # (C, H, W)
    return probe
