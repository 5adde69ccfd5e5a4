"""Schedules as deployable models: fold the permutations into the weights.

A schedule ``perm`` (``perm[slot] = weight row``) makes slot ``s`` compute row ``perm[s]``.
The simulator applies it as a gather on the fault rates; a deployed model should need no
gather at all. :func:`fold_schedule` therefore rewrites the weights:

* the scheduled layer's rows (output channels / features) and bias are permuted:
  ``W'[s] = W[perm[s]]``, so row ``s`` of the exported layer is the row the schedule put on
  slot ``s``, and the plain identity mapping runs it there;
* its outputs now come in the order ``perm``, so the next layer that consumes them gets its
  input columns permuted to match: ``W_next'[:, s] = W_next[:, perm[s]]`` for a Linear or
  Conv2d right after it, channel blocks of ``H * W`` columns after a ``Flatten``;
* modules in between must act per channel: elementwise activations, dropout, identity and
  pooling pass through, batch-norm gets its per-channel parameters permuted. Anything else
  (or no consumer: the layer's outputs are the model's outputs) is an error, since the
  function could not be kept.

The exported model computes the original function (up to float rounding: a consumer's
sums run in another order) and, on the identity mapping, every weight row sees exactly the
fault rates the schedule gave it. One caveat is physical, not numerical: if the consumer is
itself faulty, its K-blocks now group its input columns differently, so its own partial
products (and their fault exposure) change; :func:`fold_schedule` reports such layers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

from hasched.errors import HaschedError

__all__ = ["export_schedule", "fold_schedule", "load_exported"]

_PASS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
         nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Softplus, nn.Mish,
         nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _trace_shapes(model: nn.Module, example: torch.Tensor | None) -> dict[str, tuple]:
    """Output shape (without the batch dimension) of every submodule on ``example``."""
    if example is None:
        return {}
    shapes: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: shapes.__setitem__(n, o.shape[1:]))
             for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _consumer(model: nn.Module, name: str) -> tuple[list[tuple[str, nn.Module]], str, nn.Module]:
    """The modules after ``name`` up to and including the layer that consumes its output."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        raise HaschedError(f"cannot fold the schedule of {name}: export follows nn.Sequential "
                           f"chains, and its parent is a {type(parent).__name__}")
    names = [n for n, _ in parent.named_children()]
    prefix = f"{parent_name}." if parent_name else ""
    between = []
    for n in names[names.index(child) + 1:]:
        m = getattr(parent, n)
        if isinstance(m, nn.Linear | nn.Conv2d):
            return between, prefix + n, m
        if not isinstance(m, _PASS + _BN + (nn.Flatten,)):
            raise HaschedError(
                f"cannot fold the schedule of {name}: its output goes through {prefix + n} "
                f"({type(m).__name__}), which does not act per channel")
        between.append((prefix + n, m))
    raise HaschedError(f"cannot fold the schedule of {name}: nothing after it consumes its "
                       "outputs (they are the model's outputs, whose order must not change)")


def _permute_rows(layer: nn.Module, perm: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(layer.weight[perm])
        if layer.bias is not None:
            layer.bias.copy_(layer.bias[perm])


def _permute_consumer(layer: nn.Module, cname: str, perm: torch.Tensor, block: int) -> None:
    if isinstance(layer, nn.Conv2d):
        if block != 1 or layer.groups != 1:
            raise HaschedError(f"cannot fold into {cname}: a grouped convolution or a "
                               "convolution after a flatten cannot take permuted channels")
        with torch.no_grad():
            layer.weight.copy_(layer.weight[:, perm])
        return
    cols = (perm[:, None] * block + torch.arange(block)).reshape(-1)  # (C * block,)
    if cols.numel() != layer.in_features:
        raise HaschedError(f"cannot fold into {cname}: it takes {layer.in_features} inputs, "
                           f"the permuted layer gives {perm.numel()} channels x {block}")
    with torch.no_grad():
        layer.weight.copy_(layer.weight[:, cols])


def fold_schedule(
    model: nn.Module,
    perms: dict[str, torch.Tensor],
    example: torch.Tensor | None = None,
) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` with the schedules folded into its weights.

    Args:
        model: the original model (not modified).
        perms: ``{layer: LongTensor[rows]}`` (or ``[1, rows]``), ``perm[slot] = row``.
        example: one input batch, needed only when a ``Flatten`` lies between a scheduled
            layer and its consumer (to know each channel's ``H * W`` block).

    Returns:
        ``(folded model, {scheduled layer: its consumer})``.

    Raises:
        HaschedError: unknown layer, not a permutation, or a consumer that cannot be
            determined or cannot take permuted inputs.
    """
    folded = copy.deepcopy(model).eval()
    modules = dict(folded.named_modules())
    shapes = None
    consumers = {}
    for name, perm in perms.items():
        perm = torch.as_tensor(perm).reshape(-1).long()
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear | nn.Conv2d):
            raise HaschedError(f"schedule names {name!r}, which is not a Linear/Conv2d layer")
        rows = layer.weight.shape[0]
        if not torch.equal(perm.sort().values, torch.arange(rows)):
            raise HaschedError(f"schedule of {name} is not a permutation of 0..{rows - 1}")
        between, cname, consumer = _consumer(folded, name)
        block = 1
        for bname, m in between:
            if isinstance(m, _BN):
                with torch.no_grad():
                    for t in (m.weight, m.bias, m.running_mean, m.running_var):
                        if t is not None:
                            t.copy_(t[perm])
            elif isinstance(m, nn.Flatten):
                if shapes is None:
                    shapes = _trace_shapes(model, example)
                if bname not in shapes:
                    raise HaschedError(f"cannot fold the schedule of {name}: a flatten follows "
                                       "it, so an example input is needed to size its blocks")
                block = int(shapes[bname][0]) // rows
        _permute_rows(layer, perm)
        _permute_consumer(consumer, cname, perm, block)
        consumers[name] = cname
    return folded, consumers


def export_schedule(
    schedule: str | Path,
    out: str | Path,
    *,
    model_name: str | None = None,
    seed: int | None = None,
    models_dir: str | Path | None = None,
) -> dict:
    """Fold a ``schedule.json`` into its model's weights and write ``out`` (safetensors).

    The model and seed come from the schedule file unless given. The exported file holds
    the model's state dict under the original keys (so the registered architecture loads
    it) and, as metadata, where it came from.

    Returns:
        A report: model, seed, folded layers and consumers, and the largest output
        difference against the original on 16 random inputs.

    Raises:
        HaschedError: ``out`` exists, the schedule or model is unusable, or folding fails;
            all checked before anything is written.
    """
    from safetensors.torch import save

    from hasched.io import atomic_write, check_out_file, make_dirs
    from hasched.study.build import load_schedule, read_schedule
    from hasched.zoo.models import get_model_spec
    from hasched.zoo.train import load_checkpoint

    out = Path(out)
    check_out_file(out, option="--out")
    path = Path(schedule) / "schedule.json" if Path(schedule).is_dir() else Path(schedule)
    _, raw = read_schedule(path)
    model_name = model_name or raw.get("model")
    seed = seed if seed is not None else raw.get("seed")
    if model_name is None or seed is None:
        raise HaschedError(f"schedule {path} names no model/seed; pass --model and --seed")
    model, meta = load_checkpoint(model_name, int(seed), models_dir)
    rows = {n: m.weight.shape[0] for n, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Conv2d)}
    perms, _ = load_schedule(path, rows)
    example = torch.rand(16, *get_model_spec(model_name).input_shape,
                         generator=torch.Generator().manual_seed(0))
    folded, consumers = fold_schedule(model, perms, example)
    with torch.no_grad():
        diff = float((folded(example) - model(example)).abs().max())
    report = {"model": model_name, "seed": int(seed), "schedule": str(path),
              "folded": consumers, "max_output_difference": diff,
              "faulty_consumers": sorted(c for c in consumers.values() if c in perms
                                         or c in raw.get("layers", []))}
    state = {k: v.detach().contiguous() for k, v in folded.state_dict().items()}
    data = save(state, metadata={"hasched": json.dumps(
        {**report, "checkpoint_test_accuracy": meta.get("test_accuracy")})})
    make_dirs(out.parent)
    atomic_write(out, data)
    return report


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a model written by :func:`export_schedule`: ``(model in eval mode, metadata)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from hasched.zoo.models import create_model

    path = Path(path)
    if not path.is_file():
        raise HaschedError(f"exported model not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("hasched", "{}"))
        state = load_file(str(path))
        model = create_model(meta["model"])
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise HaschedError(f"{path} is not a hasched export: {err}".splitlines()[0]) from None
    return model.eval(), meta

