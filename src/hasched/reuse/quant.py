"""Per-neuron input quantisation of a model's Linear and convolution layers.

**What a neuron is.** A layer's neurons are the units of its *input* that carry their own
bit width:

* ``nn.Linear`` (``in_features = K``, input ``(N, ..., K)``): neuron ``k`` is input feature
  ``k`` (the last axis; shared by all leading positions). For a Linear fed by ``nn.Flatten``
  of a ``(C, H, W)`` map this is one element ``(c, h, w)`` of that map.
* ``nn.Conv1d`` / ``nn.Conv2d`` (``in_channels = C``): neuron ``c`` is input channel ``c``;
  every position of the channel shares its bits. A convolution applies the same weights at
  every position, and objects move between frames, so a per-position bit width would
  describe where the object happened to be rather than what the channel encodes.

**The quantiser of a layer** has one range from calibration data, ``hi = max |x|`` over
the layer's inputs, and is unsigned when no calibration input was negative (after a ReLU,
an image), signed otherwise. A neuron with ``b`` bits has the step and codes

* unsigned: ``step = hi / (2^b - 1)``, ``q = clamp(round(x / step), 0, 2^b - 1)``;
* signed (``b >= 2``): ``step = hi / (2^(b-1) - 1)``,
  ``q = clamp(round(x / step), -(2^(b-1) - 1), 2^(b-1) - 1)``;

and the layer sees ``x_hat = q * step`` (float32). Zero is exactly representable, so a
ReLU's zeros stay zeros (and are reused).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.sim.layers import weight_layer_names

__all__ = ["LayerSpec", "LayerQuantizer", "MAX_BITS", "calibrate", "check_layers",
           "uniform_bits", "neuron_axis"]

MAX_BITS = 16


@dataclass(frozen=True)
class LayerSpec:
    """What the quantiser of one layer needs to know.

    Attributes:
        name: Module name. kind: ``"linear"`` or ``"conv"``.
        neurons: Number of neurons (input features or input channels).
        hi: ``max |input|`` on calibration data. signed: Calibration saw a negative input.
        macs_per_neuron: Dense MACs one image spends on each neuron's input (a share of the
            layer's MACs; padding taps of a convolution excluded), for reports.
    """

    name: str
    kind: str
    neurons: int
    hi: float
    signed: bool
    macs_per_neuron: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def neuron_axis(module: nn.Module) -> int:
    """Axis of a layer input that indexes its neurons (-1 for Linear, 1 for convs)."""
    return -1 if isinstance(module, nn.Linear) else 1


def check_layers(model: nn.Module, layers: Iterable[str]) -> list[str]:
    """The named layers, checked to be Linear/Conv layers of ``model`` (no duplicates)."""
    known = weight_layer_names(model)
    layers = list(layers)
    if not layers:
        raise HaschedError("no layer given")
    for name in layers:
        if name not in known:
            raise HaschedError(f"unknown layer {name!r}; this model's layers: "
                               f"{', '.join(known)}")
    if len(set(layers)) != len(layers):
        raise HaschedError(f"layer listed twice: {', '.join(layers)}")
    return layers


@torch.no_grad()
def calibrate(model: nn.Module, layers: list[str], images: torch.Tensor,
              batch: int = 256) -> dict[str, LayerSpec]:
    """Ranges (and neuron counts) of the layers' inputs on calibration images.

    Args:
        model: The fp32 model (eval mode). layers: Linear/Conv module names.
        images: ``(N, ...)`` calibration inputs.
        batch: Images per forward pass.
    """
    layers = check_layers(model, layers)
    mods = dict(model.named_modules())
    hi = dict.fromkeys(layers, 0.0)
    neg = dict.fromkeys(layers, False)
    macs = dict.fromkeys(layers, 0.0)

    def hook(name: str):
        def pre(mod: nn.Module, args) -> None:
            x = args[0]
            hi[name] = max(hi[name], float(x.abs().max()))
            neg[name] = neg[name] or bool((x < 0).any())
            if not macs[name]:
                macs[name] = _macs_per_image(mod, x) / _neurons(mod)
        return pre

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in layers]
    try:
        for i in range(0, images.shape[0], batch):
            model(images[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return {n: LayerSpec(n, "linear" if isinstance(mods[n], nn.Linear) else "conv",
                         _neurons(mods[n]), hi[n], neg[n], macs[n]) for n in layers}


def _neurons(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def _macs_per_image(mod: nn.Module, x: torch.Tensor) -> float:
    """Dense MACs of one image (padding taps excluded), from a batch of inputs."""
    from hasched.reuse.engine import conv_uses

    if isinstance(mod, nn.Linear):
        return x[:1].numel() // mod.in_features * mod.in_features * mod.out_features
    uses = conv_uses(mod, tuple(x.shape[2:]))
    return float(uses.count.sum()) * mod.in_channels * mod.out_channels // mod.groups


def uniform_bits(specs: dict[str, LayerSpec], bits: int) -> dict[str, torch.Tensor]:
    """Every neuron of every layer at ``bits`` bits."""
    return {n: torch.full((s.neurons,), bits, dtype=torch.long) for n, s in specs.items()}


class LayerQuantizer:
    """Codes and values of one layer's inputs under per-neuron bit widths.

    Args:
        spec: The layer's range and neuron count.
        bits: ``LongTensor[neurons]`` bits per neuron.
        axis: Input axis of the neurons (-1: Linear, 1: convolutions).
    """

    def __init__(self, spec: LayerSpec, bits: torch.Tensor, axis: int) -> None:
        bits = torch.as_tensor(bits, dtype=torch.long).reshape(-1)
        if bits.numel() != spec.neurons:
            raise HaschedError(f"layer {spec.name}: {bits.numel()} bit widths for "
                               f"{spec.neurons} neurons")
        low = 2 if spec.signed else 1
        if bool((bits < low).any()) or bool((bits > MAX_BITS).any()):
            raise HaschedError(f"layer {spec.name}: bits must be in {low}..{MAX_BITS} "
                               f"({'signed' if spec.signed else 'unsigned'} inputs), got "
                               f"{int(bits.min())}..{int(bits.max())}")
        self.spec, self.bits, self.axis = spec, bits, axis
        levels = (2.0 ** (bits - 1) - 1) if spec.signed else (2.0 ** bits - 1)
        self.qmax = levels.double()  # (neurons,)
        self.qmin = -self.qmax if spec.signed else torch.zeros_like(self.qmax)
        self.step = max(spec.hi, 1e-12) / self.qmax  # float64 (neurons,)
        self._cache: dict = {}

    def _shaped(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        key = (id(v), x.dim(), x.device)
        if key not in self._cache:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            self._cache[key] = v.to(x.device).reshape(shape)
        return self._cache[key]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (float64, integer-valued, same shape)."""
        step = self._shaped(self.step, x)
        q = torch.round(x.double() / step)
        return torch.minimum(torch.maximum(q, self._shaped(self.qmin, x)),
                             self._shaped(self.qmax, x))

    def values(self, q: torch.Tensor) -> torch.Tensor:
        """The quantised inputs ``q * step`` as float32."""
        return (q * self._shaped(self.step, q)).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.values(self.codes(x))
