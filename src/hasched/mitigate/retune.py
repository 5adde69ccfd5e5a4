"""Fal-reTune's weight mapping function: retune the int8 weights held by faulty PEs.

A weight ``w`` on a faulty PE never contributes ``w * x``: the PE's multiplier computes the
approximate product ``T[w, x]`` and its stuck bit turns it into ``F[w, x] = fault(T[w, x])``.
Knowing the fault map, each such weight is replaced by the int8 value

    ``w' = argmin_{v in -127..127}  sum_x h_j(x) (F[v, x] - w x)^2``

where ``h_j`` is the histogram of the quantised activations that meet the weight's input
``j`` on calibration images (every column of a convolution counts). The *intended* product
is the exact ``w x``: what the trained network wants, so a retuned weight can also undo
part of the multiplier's own error. Expanding the square,

    ``cost_j(v; w) = A_j[v] - 2 w B_j[v] + w^2 C_j``,  ``A = H F^2ᵀ``, ``B = H (F x)ᵀ``,

so one pair of ``(J, 255) @ (255, 255)`` products per fault configuration (kind, bit,
value) scores all 255 candidates of every weight at once. The sums are integers below
2^53, exact in float64, so ties are decided exactly: the weight keeps its value when no
candidate is strictly better, else the candidate nearest to it (the smaller on a tie).

Only the product site has a per-weight fault; accumulator and output faults act on sums of
several weights and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.sim.arithmetic import Int8, pin_int8_scales
from hasched.sim.fap import weight_pes
from hasched.sim.faults import ChipFault
from hasched.sim.layers import FaultState, inject_faults
from hasched.sim.mapping import Mapping
from hasched.sim.multipliers import Multiplier
from hasched.sim.operands import ConvInput, LinearInput
from hasched.sim.probe import activation_probe
from hasched.sim.profile import ChipMap

__all__ = ["LEVELS", "retune_codes", "fault_table", "activation_histograms", "retune_model",
           "LayerRetune"]

LEVELS = torch.arange(-127, 128)  # the int8 values symmetric PTQ produces
_CHUNK = 1 << 15  # weights scored per block: (chunk, 255) float64 temporaries


def retune_codes(wq: torch.Tensor, hist_row: torch.Tensor, hist: torch.Tensor,
                 faulty: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """The mapping function for weights that share one fault configuration.

    Args:
        wq: ``LongTensor[n]`` int8 weights (-127..127).
        hist_row: ``LongTensor[n]``: the row of ``hist`` holding each weight's activations.
        hist: ``(J, 255)`` activation counts per input, values -127..127.
        faulty: ``(255, 255)`` float64 ``F[v + 127, x + 127]``: the faulty approximate product
            of candidate ``v`` and activation ``x``.
        centered: Minimise the error's variance instead of its mean square (when its mean
            is removed afterwards, e.g. folded into the bias).

    Returns:
        ``LongTensor[n]``: the retuned weights (see the module docstring for ties).
    """
    hist = hist.double()
    x = LEVELS.to(hist.device, torch.float64)  # (255,)
    used, inv = torch.unique(hist_row, return_inverse=True)
    h = hist[used]  # (U, 255)
    a = h @ (faulty ** 2).T  # (U, 255): sum_x h F[v, x]^2
    b = h @ (faulty * x).T  # (U, 255): sum_x h x F[v, x]
    c = h @ x ** 2  # (U,)
    if centered:
        m = h @ faulty.T  # (U, 255): sum_x h F[v, x]
        d = h @ x  # (U,): sum_x h x
        n = h.sum(1).clamp(min=1.0)  # (U,)
    out = torch.empty_like(wq)
    for i in range(0, wq.numel(), _CHUNK):
        w, j = wq[i:i + _CHUNK].double(), inv[i:i + _CHUNK]
        cost = a[j] - 2.0 * w[:, None] * b[j] + (w ** 2 * c[j])[:, None]  # (n, 255)
        if centered:  # minus n * mean^2: the summed squared deviation from the mean error
            cost = cost - (m[j] - (w * d[j])[:, None]) ** 2 / n[j, None]
        best = cost.min(1, keepdim=True).values
        own = cost.gather(1, (w.long() + 127)[:, None])
        dist = 2.0 * (x[None, :] - w[:, None]).abs() + (x[None, :] > w[:, None])
        pick = torch.where(cost == best, dist, torch.inf).argmin(1)  # nearest of the best
        out[i:i + _CHUNK] = torch.where(own[:, 0] == best[:, 0], w.long(), pick - 127)
    return out


def fault_table(mult: Multiplier, chip: ChipMap, pe: int, word) -> torch.Tensor:
    """``F[v + 127, x + 127]``: what faulty PE ``pe`` makes of every int8 product (float64).

    The chip's own fault model corrupts the multiplier's table, so the mapping function
    sees exactly what the simulator computes.
    """
    t = torch.from_numpy(np.ascontiguousarray(mult.signed_table()[1:, 1:])).double()
    pes = torch.full(t.shape, pe, dtype=torch.long)
    return ChipFault(chip).corrupt(t, word, pes, None, None)


@torch.no_grad()
def activation_histograms(faulty: nn.Module, state: FaultState, images: torch.Tensor,
                          batch: int = 64) -> dict[str, torch.Tensor]:
    """Counts of each quantised input value per layer input, fault-free int8 run.

    Returns:
        ``{layer: (J, 255)}`` float64 counts; ``J`` is ``in_features`` for a Linear and
        ``groups * in_channels/groups * kh * kw`` (row ``g * Kg + j``) for a convolution.
    """
    hists: dict[str, torch.Tensor] = {}

    def hook(layer):
        def pre(_mod, args) -> None:
            view = layer._input_view(args[0], 1)
            if isinstance(view, LinearInput):
                xs = view.x.long()  # (N, T, K)
                j = torch.arange(xs.shape[-1], device=xs.device)
            elif isinstance(view, ConvInput):
                xs = view.cols().long()  # (N, G, Kg, C)
                j = torch.arange(xs.shape[1] * xs.shape[2], device=xs.device).reshape(
                    1, xs.shape[1], xs.shape[2], 1)
            else:  # pragma: no cover - every faulty layer type has one of the two views
                raise HaschedError(f"retune: cannot read the inputs of {layer.layer_name}")
            n_j = int(j.numel())
            idx = (j * 255 + xs + 127).reshape(-1)
            counts = torch.bincount(idx, minlength=n_j * 255).reshape(n_j, 255).double()
            name = layer.layer_name
            hists[name] = hists[name] + counts if name in hists else counts
        return pre

    handles = [layer.register_forward_pre_hook(hook(layer)) for layer in state.layers.values()]
    state.faults_on = False
    try:
        for i in range(0, images.shape[0], batch):
            state.expanded = False
            faulty(images[i:i + batch])
    finally:
        state.faults_on = True
        for h in handles:
            h.remove()
    return hists


@dataclass(frozen=True)
class LayerRetune:
    """What the mapping function did to one layer.

    Attributes:
        faulty_weights: Weights on faulty PEs. changed: Of those, how many got a new value.
        sse_before, sse_after: Summed squared product error of the faulty weights over the
            calibration activations, ``sum h (F[w, x] - w x)^2``, before and after.
        bias_shift: Largest change of a bias (output units; 0 without bias correction).
    """

    faulty_weights: int
    changed: int
    sse_before: float
    sse_after: float
    bias_shift: float = 0.0

    def to_dict(self) -> dict:
        return {"faulty_weights": self.faulty_weights, "changed": self.changed,
                "sse_before": self.sse_before, "sse_after": self.sse_after,
                "bias_shift": self.bias_shift}


def _errors(wq: torch.Tensor, rows: torch.Tensor, hist: torch.Tensor, faulty: torch.Tensor
            ) -> tuple[float, torch.Tensor]:
    """Summed squared error and, per weight, the summed error ``sum h (F[w, x] - w x)``."""
    x = LEVELS.to(hist.device, torch.float64)
    total, sums = 0.0, torch.empty(wq.numel(), dtype=torch.float64, device=hist.device)
    for i in range(0, wq.numel(), _CHUNK):
        w, r = wq[i:i + _CHUNK], rows[i:i + _CHUNK]
        err = faulty[w + 127] - w.double()[:, None] * x  # (n, 255)
        total += float((hist[r] * err ** 2).sum())
        sums[i:i + _CHUNK] = (hist[r] * err).sum(1)
    return total, sums


def _retune_layer(module: nn.Module, layer, mapping: Mapping, chip: ChipMap, hist: torch.Tensor,
                  mult: Multiplier, spatial, bias: bool) -> LayerRetune:
    """Maps the weights of one layer that sit on faulty PEs (in place, pinned scales) and,
    with ``bias``, moves the mean residual error of its faulty products into the bias."""
    wq = layer.arith.w.long()  # (R, K) PyTorch order, pinned scales
    R, K = wq.shape
    pes = weight_pes(module, mapping, None, spatial).reshape(R, K).cpu()
    kind = torch.from_numpy(chip.kind.reshape(-1).astype(np.int64))[pes]
    bit = torch.from_numpy(chip.bit.reshape(-1).astype(np.int64))[pes]
    val = torch.from_numpy(chip.value.reshape(-1).astype(np.int64))[pes]
    groups = getattr(module, "groups", 1)
    row_of = (torch.arange(R)[:, None] * groups // R) * K + torch.arange(K)[None, :]  # (R, K)
    word = layer.arith.word("product")
    new = wq.clone()
    before = after = 0.0
    row_err = torch.zeros(R, dtype=torch.float64)  # summed residual product error per row
    config = kind * 4096 + bit * 2 + val  # one code per fault configuration
    for code in torch.unique(config[kind != 0]).tolist():
        sel = (config == code).nonzero(as_tuple=True)
        table = fault_table(mult, chip, int(pes[sel][0]), word).to(hist.device)
        w, rows = wq[sel].to(hist.device), row_of[sel].to(hist.device)
        mapped = retune_codes(w, rows, hist, table, centered=bias)
        new[sel] = mapped.cpu()
        before += _errors(w, rows, hist, table)[0]
        sse, err = _errors(mapped, rows, hist, table)
        after += sse
        row_err.index_add_(0, sel[0], err.cpu())
    changed = new != wq
    scale = pin_int8_scales(module)
    if bool(changed.any()):
        with torch.no_grad():
            flat = module.weight.view(R, K)
            edited = (new.to(flat.device).double() * scale.to(flat.device)[:, None]).to(
                flat.dtype)
            flat[changed] = edited[changed.to(flat.device)]
    shift = 0.0
    if bias and module.bias is not None and bool(row_err.any()):
        # the mean residual error of a row's faulty products, per output value, folded
        # into the bias (added outside the array, fault-free)
        n_values = float(hist[0].sum())  # (sample, column) pairs behind every histogram
        delta = row_err / n_values * scale.cpu() * layer.arith.s_x  # (R,) output units
        with torch.no_grad():
            module.bias -= delta.to(module.bias.device, module.bias.dtype)
        shift = float(delta.abs().max())
    return LayerRetune(int((kind != 0).sum()), int(changed.sum()), before, after, shift)


def retune_model(model: nn.Module, layers: list[str], mapping: Mapping, chip: ChipMap,
                 arith: Int8, calibration: torch.Tensor, batch: int = 64, bias: bool = False
                 ) -> dict[str, LayerRetune]:
    """Fal-reTune: retunes, in place, every weight of ``layers`` that sits on a faulty PE.

    Args:
        model: The fp32 model (its accelerated layers get pinned int8 scales).
        layers: Accelerated layers. mapping: Weight placement. chip: The fault map (product
            site). arith: The int8 arithmetic (its multiplier). calibration: Images whose
            activations weigh the candidates (training images).
        batch: Images per forward pass while counting activations.
        bias: Also fold each row's mean residual error of its faulty products into its bias
            (an addition to the weight mapping function; a stuck bit that is set on a zero
            product is an offset no weight value can undo); the mapping then minimises the
            error's variance instead of its mean square.

    Returns:
        What happened per layer.
    """
    site = mapping.check_site(chip.site)
    if site != "product":
        raise HaschedError(f"retune maps weights through their faulty product; the chip's "
                           f"faults sit at the {site} site (use site=product)")
    if not isinstance(arith, Int8):
        raise HaschedError("retune needs int8 arithmetic (--arithmetic int8)")
    chip.check(mapping.pe_shape)
    mods = dict(model.named_modules())
    for name in layers:
        pin_int8_scales(mods[name])
    model.eval()
    probe = activation_probe(model, layers, calibration, calibration, arith, mapping)
    rates = torch.from_numpy(chip.faulty.reshape(-1).astype(np.float64))
    faulty, state = inject_faults(model, layers, mapping, rates, ChipFault(chip), arith,
                                  in_absmax=probe.absmax, spatial=probe.spatial)
    state.configure()
    hists = activation_histograms(faulty, state, calibration, batch)
    return {name: _retune_layer(mods[name], state.layers[name], mapping, chip, hists[name],
                                arith.multiplier, probe.spatial.get(name), bias)
            for name in layers}
