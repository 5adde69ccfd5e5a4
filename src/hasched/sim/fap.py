"""Which weights a chip's faulty PEs hold: the masks behind fault-aware pruning (FAP).

On a weight-stationary array every weight ``W[r, j]`` sits on one PE for the whole run
(:mod:`hasched.sim.mapping`). Fault-aware pruning bypasses a faulty PE, i.e. sets the weights
it holds to zero; fault-aware retraining (FAP+T) then fine-tunes with those weights held at
zero. :func:`faulty_weight_masks` gives, per layer, the boolean mask of weights on faulty
PEs in the layer's own weight shape, for any schedule of rows (a schedule moves rows, so it
moves which weights are pruned).

Example:
    >>> import torch.nn as nn
    >>> from hasched.sim.mapping import Systolic
    >>> from hasched.sim.profile import ChipMap
    >>> chip = ChipMap.sample((4, 4), 0.25, seed=1, kind="dead", site="product")
    >>> m = nn.Sequential(nn.Linear(8, 6))
    >>> mask = faulty_weight_masks(m, ["0"], Systolic(4, 4), chip)["0"]
    >>> mask.shape, int(mask.sum()) == sum(bool(chip.faulty[r % 4, j % 4])
    ...                                    for r in range(6) for j in range(8))
    (torch.Size([6, 8]), True)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.sim.layers import gemm_shape_of
from hasched.sim.mapping import Mapping
from hasched.sim.profile import ChipMap

__all__ = ["weight_pes", "faulty_weight_masks", "apply_masks"]


def weight_pes(module: nn.Module, mapping: Mapping, perm: torch.Tensor | None = None,
               spatial: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The flat PE index that holds every weight of one layer (weight-shaped LongTensor).

    Args:
        module: A Linear or convolution. mapping: Where its GEMM runs (``gpu-tiles``: the
            thread that computes the weight's K-block).
        perm: Optional schedule ``LongTensor[rows]`` with ``perm[slot] = row``.
        spatial: For a Linear fed by a flattened ``(C, H, W)`` map, that shape.
    """
    plan = mapping.plan(gemm_shape_of(module, spatial))
    pe = plan.pe_pos.expand(plan.rows, plan.n_chains, plan.chain).reshape(plan.rows, -1)
    slot_pe = pe[:, :plan.k]  # (rows, K) in the mapping's K order, per slot
    if perm is not None:  # row perm[s] runs in slot s
        by_row = torch.empty_like(slot_pe)
        by_row[perm.reshape(-1)] = slot_pe
    else:
        by_row = slot_pe
    if plan.k_perm is not None:  # back to PyTorch's reduction order
        unperm = torch.empty_like(by_row)
        unperm[:, plan.k_perm] = by_row
        by_row = unperm
    return by_row.reshape(module.weight.shape).to(module.weight.device)


def faulty_weight_masks(model: nn.Module, layers: list[str], mapping: Mapping, chip: ChipMap,
                        perms: dict[str, torch.Tensor] | None = None,
                        spatial: dict[str, tuple[int, int, int]] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Per layer, ``True`` where a weight sits on a faulty PE (weight-shaped BoolTensor).

    Args:
        model: The model. layers: Layers on the accelerator.
        mapping: A mapping where each weight has one PE (``systolic``; for ``gpu-tiles`` a
            faulty thread computes whole K-blocks, and the mask marks their weights).
        chip: The chip's faulty PEs.
        perms: Optional schedules, ``{layer: LongTensor[rows]}`` with ``perm[slot] = row``.
        spatial: For Linear layers fed by a flattened ``(C, H, W)`` map, that shape (only
            the ``hwc`` reduction order needs it; see :mod:`hasched.sim.probe`).
    """
    chip.check(mapping.pe_shape)
    faulty = torch.from_numpy(chip.faulty.reshape(-1))
    mods = dict(model.named_modules())
    out = {}
    for name in layers:
        if name not in mods:
            raise HaschedError(f"unknown layer {name!r}")
        pes = weight_pes(mods[name], mapping, (perms or {}).get(name),
                         (spatial or {}).get(name))
        out[name] = faulty.to(pes.device)[pes]
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zeroes the masked weights in place (FAP)."""
    mods = dict(model.named_modules())
    for name, mask in masks.items():
        mods[name].weight.masked_fill_(mask, 0.0)
