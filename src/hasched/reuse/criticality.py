"""Neuron criticality: how much a network's output suffers when one neuron's value is off.

A neuron (see :mod:`hasched.reuse.quant`) is *perturbed* on its layer's input, for every
image of a calibration set, and the network's outputs are compared with the unperturbed
ones. The perturbation is one of

* ``quant`` (default, ``bits`` = 2): the neuron alone is quantised to ``bits`` bits with
  its layer's range -- exactly the error that lowering its bits introduces;
* ``noise``: additive Gaussian noise with standard deviation ``sigma * hi`` (``hi`` is the
  layer's input range);
* ``fault``: a transient fault model of the injector (:func:`hasched.sim.faults.create_fault`:
  ``bitflip``, ``flip-to-0``, ``flip-to-1``, ``zero``, ``tf32``, ``bf16``) acting on the
  neuron's float32 values, each value hit with probability ``rate``.

**Populations.** ``P`` neurons of one layer are evaluated in one forward pass: the batch is
folded as ``P`` members of ``B`` images (member-major), and member ``p`` carries the
perturbation of neuron ``n_p``. The layer's output is not recomputed per member: a forward
hook adds each member's exact delta to the clean output, ``W[:, k] * e`` for a Linear input
feature ``k`` and the convolution of the perturbed channel's error with that channel's
weights for a convolution (the layer is linear in its input). Only the layers after it run
on the folded batch. For a direct child of an ``nn.Sequential`` the hook expands the batch
itself; elsewhere (e.g. inside a residual block) the model input is expanded first.

**Scores** per neuron, over the ``B`` images: ``criticality`` = mean KL divergence
``KL(p_clean || p_perturbed)`` of the softmax outputs (smooth and label-free, so it still
ranks neurons whose perturbation flips no prediction), ``acc_drop`` = clean minus perturbed
top-1 accuracy (points), ``flip_rate`` = share of images whose top-1 class changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hasched.errors import HaschedError
from hasched.reuse.quant import LayerQuantizer, LayerSpec

__all__ = ["Perturbation", "neuron_scores", "PERTURBATIONS"]

PERTURBATIONS = ("quant", "noise", "fault")


@dataclass(frozen=True)
class Perturbation:
    """What a perturbed neuron's value becomes (see the module docstring).

    Attributes:
        kind: ``quant``, ``noise`` or ``fault``.
        bits: ``quant``: the bit width.
        sigma: ``noise``: standard deviation as a share of the layer's range.
        fault: ``fault``: a transient fault model name. params: its parameters.
        rate: ``fault``: probability that a value is hit.
    """

    kind: str = "quant"
    bits: int = 2
    sigma: float = 0.1
    fault: str = ""
    params: tuple[tuple[str, object], ...] = ()
    rate: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATIONS:
            raise HaschedError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, "
                               f"got {self.kind!r}")
        if self.kind == "quant" and not 1 <= self.bits <= 16:
            raise HaschedError(f"quant perturbation: bits must be 1..16, got {self.bits}")
        if self.kind == "noise" and not self.sigma > 0:
            raise HaschedError(f"noise perturbation: sigma must be > 0, got {self.sigma}")
        if self.kind == "fault":
            if not 0 < self.rate <= 1:
                raise HaschedError(f"fault perturbation: rate must be in (0, 1], got "
                                   f"{self.rate}")
            if getattr(self.model(), "permanent", False):
                raise HaschedError(f"{self.fault} is a permanent fault; perturb neurons with "
                                   "a transient one (bitflip, flip-to-1, zero, ...)")

    def model(self):
        from hasched.sim.faults import create_fault

        return create_fault(self.fault, **dict(self.params))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = [list(p) for p in self.params]
        return d

    def apply(self, x: torch.Tensor, spec: LayerSpec,
              generator: torch.Generator | None) -> torch.Tensor:
        """The perturbed version of values ``x`` of one neuron (any shape, float32)."""
        if self.kind == "quant":
            bits = 2 if spec.signed and self.bits < 2 else self.bits
            single = LayerSpec(spec.name, spec.kind, 1, spec.hi, spec.signed)
            return LayerQuantizer(single, torch.tensor([bits]), -1)(x[..., None])[..., 0]
        if self.kind == "noise":
            e = torch.randn(x.shape, generator=generator, device=x.device)
            return x + self.sigma * spec.hi * e
        from hasched.sim.arithmetic import Word

        hit = torch.rand(x.shape, generator=generator, device=x.device) < self.rate
        bad = self.model().corrupt(x.float().contiguous(), Word("float32"), None, None,
                                   generator)
        return torch.where(hit, bad.to(x.dtype), x)


# ------------------------------------------------------------------------ member deltas

def _linear_delta(mod: nn.Linear, xs: torch.Tensor, members: torch.Tensor, pert, spec,
                  gen) -> torch.Tensor:
    """``(P, B, ..., R)`` output change of member ``p`` perturbing input feature ``k_p``."""
    P = members.numel()
    xv = torch.stack([xs[p, ..., int(k)] for p, k in enumerate(members)])  # (P, B, ...)
    e = pert.apply(xv, spec, gen) - xv
    wc = mod.weight.detach()[:, members].t()  # (P, R)
    return e[..., None] * wc.reshape(P, *([1] * (e.dim() - 1)), -1)


def _conv_delta(mod: nn.Module, xs: torch.Tensor, members: torch.Tensor, pert, spec, gen,
                y_shape: tuple[int, ...]) -> torch.Tensor:
    """``(P, B, Cout, ...)`` output change of member ``p`` perturbing input channel
    ``c_p`` (zero outside the channel's group)."""
    one = isinstance(mod, nn.Conv1d)
    xv = torch.stack([xs[p, :, int(c)] for p, c in enumerate(members)])  # (P, B, *sp)
    e = pert.apply(xv, spec, gen) - xv
    P, B = e.shape[:2]
    e = e.transpose(0, 1)  # (B, P, *sp): members as channels of a grouped convolution
    if one:
        e = e[:, :, None, :]
    pads = list(mod._reversed_padding_repeated_twice)
    pads = pads + [0, 0] if len(pads) == 2 else pads
    if any(pads):
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        e = F.pad(e, pads, mode=mode)
    G = mod.groups
    co_g, ci_g = mod.out_channels // G, mod.in_channels // G
    w = mod.weight.detach()
    w = w[:, :, None, :] if one else w
    groups = members // ci_g
    wm = torch.stack([w[g * co_g:(g + 1) * co_g, c % ci_g] for g, c in
                      zip(groups.tolist(), members.tolist(), strict=True)])  # (P, Co/G, kh, kw)
    stride = (1, mod.stride[0]) if one else mod.stride
    dil = (1, mod.dilation[0]) if one else mod.dilation
    out = F.conv2d(e, wm.reshape(P * co_g, 1, *wm.shape[2:]), stride=stride, dilation=dil,
                   groups=P)  # (B, P*Co/G, oh, ow)
    out = out.reshape(B, P, co_g, *out.shape[2:]).transpose(0, 1)  # (P, B, Co/G, oh, ow)
    if one:
        out = out[..., 0, :]
    if G == 1:
        return out
    full = torch.zeros(P, B, *y_shape, dtype=out.dtype, device=out.device)
    for p, g in enumerate(groups.tolist()):
        full[p, :, g * co_g:(g + 1) * co_g] = out[p]
    return full


def _member_hook(mod: nn.Module, members: torch.Tensor | None, B: int, pert: Perturbation,
                 spec: LayerSpec, gen: torch.Generator | None):
    """Forward hook folding ``P`` perturbed members into the layer's output.

    ``members=None`` perturbs every neuron of the layer at once (one member)."""
    P = 1 if members is None else members.numel()

    def hook(_m, args, y):
        x = args[0]
        if x.shape[0] == B:  # the hook expands the batch
            x = x.repeat(P, *([1] * (x.dim() - 1)))
            y = y.repeat(P, *([1] * (y.dim() - 1)))
        xs = x.reshape(P, B, *x.shape[1:])
        ys = y.reshape(P, B, *y.shape[1:])
        if members is None:
            xp = pert.apply(xs, spec, gen)
            return _m._conv_forward(xp.reshape(x.shape), _m.weight, _m.bias) if not isinstance(
                _m, nn.Linear) else F.linear(xp.reshape(x.shape), _m.weight, _m.bias)
        if isinstance(_m, nn.Linear):
            d = _linear_delta(_m, xs, members, pert, spec, gen)
        else:
            d = _conv_delta(_m, xs, members, pert, spec, gen, tuple(y.shape[1:]))
        return (ys + d).reshape(y.shape)

    return hook


# ------------------------------------------------------------------------------- scores

@torch.no_grad()
def neuron_scores(model: nn.Module, layer: str, spec: LayerSpec, images: torch.Tensor,
                  labels: torch.Tensor, members: list[int] | None, pert: Perturbation,
                  generator: torch.Generator | None = None, population: int = 64,
                  ) -> list[dict]:
    """Criticality of the given neurons of ``layer`` (or of the whole layer).

    Args:
        model: The fp32 model (eval mode). layer: Module name. spec: Its quantiser spec.
        images: ``(B, ...)`` calibration images. labels: ``(B,)``.
        members: Neuron indices, or ``None`` for the whole layer as one member.
        pert: The perturbation. generator: Source of its randomness.
        population: Members per forward pass.

    Returns:
        One row per member: ``neuron`` (-1 for the whole layer), ``criticality``,
        ``acc_drop`` (points), ``flip_rate``.
    """
    mod = model.get_submodule(layer)
    B = images.shape[0]
    ref = model(images)  # (B, classes)
    logp_ref = F.log_softmax(ref.double(), -1)
    pred_ref = ref.argmax(-1)
    acc_ref = (pred_ref == labels).double().mean()
    direct = isinstance(model, nn.Sequential) and "." not in layer
    groups = [None] if members is None else [
        torch.tensor(members[i:i + population], dtype=torch.long)
        for i in range(0, len(members), population)]
    rows = []
    for grp in groups:
        P = 1 if grp is None else grp.numel()
        handle = mod.register_forward_hook(_member_hook(mod, grp, B, pert, spec, generator))
        try:
            x = images if direct else images.repeat(P, *([1] * (images.dim() - 1)))
            out = model(x).reshape(P, B, -1)
        finally:
            handle.remove()
        logp = F.log_softmax(out.double(), -1)
        kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean(1)  # (P,)
        pred = out.argmax(-1)
        acc = (pred == labels).double().mean(1)
        flips = (pred != pred_ref).double().mean(1)
        ids = [-1] if grp is None else grp.tolist()
        for p, n in enumerate(ids):
            rows.append({"neuron": int(n), "criticality": float(kl[p]),
                         "acc_drop": float(100 * (acc_ref - acc[p])),
                         "flip_rate": float(flips[p])})
    return rows
