"""The model zoo: a timm-style registry of builders taking ``**kwargs``.

Registered here: the paper's two models (§4.1), a small MLP, and torchvision-compatible
``resnet18`` and ``mobilenet_v3_small`` (:mod:`hasched.zoo.torchvision_models`).

The paper models and the MLP are :class:`torch.nn.Sequential` containers built from an
``OrderedDict`` so that the paper's layer names (``c0``, ``h0``, ``op``...) are the module
names. The fault simulator relies on this: it swaps faulty modules in by name and caches the
clean prefix of a network by slicing the Sequential, so the order and names here are part of
the public contract.

Builder keyword conventions (see :class:`hasched.zoo.ref.ModelRef`, which fills them from the
dataset when a builder takes them and the user did not set them): ``num_classes`` (outputs),
``in_channels`` (input channels) and ``image_size`` (input side length).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from hasched.errors import HaschedError
from hasched.registry import Registry
from hasched.zoo import torchvision_models

__all__ = [
    "GENERIC_RECIPE",
    "MODELS",
    "ModelSpec",
    "TrainRecipe",
    "create_model",
    "get_model_spec",
    "init_weights",
    "list_models",
    "register_model",
    "weight_layers",
]


@dataclass(frozen=True)
class TrainRecipe:
    """How a registered model is trained.

    Attributes:
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: Learning rate.
        momentum: SGD momentum (ignored by Adam).
        batch_size: Mini-batch size.
        epochs: Epochs over a training set of ``reference_train_size`` images.
        reference_train_size: Training-set size the recipe was written for; a smaller set gets
            proportionally more epochs so the number of optimiser steps stays the same.
        init: ``"he_uniform"`` (Kaiming-uniform for ReLU, zero biases), ``"default"`` (Keras
            defaults: Glorot-uniform weights, zero biases) or ``"builder"`` (the builder's own
            initialisation, e.g. torchvision's, drawn from a seeded fork of the global RNG).
    """

    optimizer: Literal["sgd", "adam"]
    lr: float
    momentum: float = 0.0
    batch_size: int = 128
    epochs: int = 25
    reference_train_size: int = 60000
    init: Literal["he_uniform", "default", "builder"] = "default"


# Any model the registry does not describe (torchvision names, ``module:`` builders) is
# trained with this: Adam is forgiving across architectures, and the builder's own init is
# the one its author chose.
GENERIC_RECIPE = TrainRecipe(optimizer="adam", lr=1e-3, batch_size=128, epochs=5,
                             init="builder")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
        name: Registry name, e.g. ``"mnist32-cnn"``.
        builder: Callable taking keyword arguments and returning a freshly built (untrained)
            module.
        dataset: Name of the dataset it is trained on (see :mod:`hasched.zoo.data`), or None
            for architectures with no dataset of their own (a reference must name one).
        input_shape: Shape of one input image, ``(C, H, W)``, with the builder's defaults;
            see :meth:`input_shape_for`.
        recipe: Training recipe.
    """

    name: str
    builder: Callable[..., nn.Module]
    dataset: str | None
    input_shape: tuple[int, int, int]
    recipe: TrainRecipe

    def parameters(self) -> tuple[str, ...]:
        """Names of the keyword arguments the builder accepts."""
        return tuple(inspect.signature(self.builder).parameters)

    def input_shape_for(self, kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input for a model built with ``kwargs``.

        ``in_channels`` replaces C and ``image_size`` replaces H and W when given.
        """
        c, h, w = self.input_shape
        c = int(kwargs.get("in_channels", c))
        if "image_size" in kwargs:
            h = w = int(kwargs["image_size"])
        return (c, h, w)


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(
    name: str,
    *,
    dataset: str | None,
    input_shape: tuple[int, int, int],
    recipe: TrainRecipe,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under ``name``.

    Args:
        name: Registry name; must be new.
        dataset: Dataset name the model is trained on, or None (must be given per use).
        input_shape: ``(C, H, W)`` of one input with the builder's default arguments.
        recipe: Training recipe.

    Returns:
        The decorator, which returns the builder unchanged.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        spec = ModelSpec(name, builder, dataset, tuple(input_shape), recipe)
        MODELS.add(name, spec, (builder.__doc__ or "").strip().split("\n")[0])
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(MODELS.names())


def get_model_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` of a registered model.

    Raises:
        HaschedError: If ``name`` is not registered.
    """
    return MODELS.get(name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a fresh, untrained instance of a registered model.

    The weights come from the builder's initialisation, i.e. from the global RNG; callers
    wanting reproducible weights call :func:`init_weights` with an explicit generator, or
    build through :func:`hasched.zoo.ref.build_model`, which seeds a fork of the global RNG.

    Args:
        name: Registered model name.
        **kwargs: Builder arguments, e.g. ``num_classes=10, in_channels=1``.

    Raises:
        HaschedError: If ``name`` is not registered or the builder does not take ``kwargs``.
    """
    spec = get_model_spec(name)
    try:
        inspect.signature(spec.builder).bind(**kwargs)
    except TypeError as err:
        known = ", ".join(spec.parameters()) or "none"
        raise HaschedError(
            f"model {name!r}: bad parameters ({err}); it takes: {known}"
        ) from None
    return spec.builder(**kwargs)


def weight_layers(model: nn.Module) -> list[str]:
    """Qualified names of the Conv2d/Linear modules of ``model``, in registration order.

    For the registered Sequential models registration order is forward order.
    """
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def init_weights(model: nn.Module, init: str, generator) -> None:
    """Re-initialise every Conv2d/Linear layer of ``model`` in place from ``generator``.

    Args:
        model: The module to initialise.
        init: ``"he_uniform"`` (Keras ``he_uniform``: U(±sqrt(6/fan_in))) or ``"default"``
            (Keras ``glorot_uniform``: U(±sqrt(6/(fan_in+fan_out)))); biases are zeroed in both.
            ``"builder"`` leaves the model as built.
        generator: A :class:`torch.Generator` so the result depends only on its seed.

    Raises:
        ValueError: For an unknown ``init``.
    """
    if init == "builder":
        return
    for _, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if init == "he_uniform":
            nn.init.kaiming_uniform_(module.weight, nonlinearity="relu", generator=generator)
        elif init == "default":
            nn.init.xavier_uniform_(module.weight, generator=generator)
        else:
            raise ValueError(f"unknown init {init!r}")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model(
    "mnist32-cnn",
    dataset="mnist32",
    input_shape=(1, 32, 32),
    recipe=TrainRecipe(
        optimizer="sgd", lr=0.01, momentum=0.9, batch_size=1024, epochs=25, init="he_uniform"
    ),
)
def mnist32_cnn() -> nn.Sequential:
    """mnist32-cnn: one 4x4 conv (32 ch, valid: 32->29), 2x2 max-pool (->14), three dense, op."""
    return nn.Sequential(
        OrderedDict(
            [
                ("c0", nn.Conv2d(1, 32, 4)),
                ("c0_relu", nn.ReLU()),
                ("pool0", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("h0", nn.Linear(32 * 14 * 14, 1024)),
                ("h0_relu", nn.ReLU()),
                ("h1", nn.Linear(1024, 256)),
                ("h1_relu", nn.ReLU()),
                ("h2", nn.Linear(256, 64)),
                ("h2_relu", nn.ReLU()),
                ("op", nn.Linear(64, 10)),
            ]
        )
    )


@register_model(
    "fashion-cnn",
    dataset="fashion-mnist",
    input_shape=(1, 28, 28),
    recipe=TrainRecipe(optimizer="adam", lr=1e-3, batch_size=128, epochs=25, init="default"),
)
def fashion_cnn() -> nn.Sequential:
    """fashion-cnn: two 4x4 'same' convs (32 ch) each with pool+dropout, one dense, op."""
    return nn.Sequential(
        OrderedDict(
            [
                ("c0", nn.Conv2d(1, 32, 4, padding="same")),
                ("c0_relu", nn.ReLU()),
                ("pool0", nn.MaxPool2d(2)),
                ("drop0", nn.Dropout(0.3)),
                ("c1", nn.Conv2d(32, 32, 4, padding="same")),
                ("c1_relu", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("drop1", nn.Dropout(0.3)),
                ("flatten", nn.Flatten()),
                ("h0", nn.Linear(32 * 7 * 7, 1024)),
                ("h0_relu", nn.ReLU()),
                ("drop2", nn.Dropout(0.3)),
                ("op", nn.Linear(1024, 10)),
            ]
        )
    )


@register_model(
    "mlp",
    dataset="mnist",
    input_shape=(1, 28, 28),
    recipe=TrainRecipe(optimizer="adam", lr=1e-3, batch_size=128, epochs=20, init="he_uniform"),
)
def mlp(
    hidden: tuple[int, ...] = (256, 128),
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
) -> nn.Sequential:
    """mlp: flatten, dense ReLU layers h0, h1... (default 784-256-128-10), op."""
    widths = [in_channels * image_size * image_size, *(int(h) for h in hidden)]
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:], strict=False)):
        layers += [(f"h{i}", nn.Linear(fan_in, fan_out)), (f"h{i}_relu", nn.ReLU())]
    layers.append(("op", nn.Linear(widths[-1], num_classes)))
    return nn.Sequential(OrderedDict(layers))


# The torchvision architectures have no dataset of their own; the expected input says what
# they are fed: 32x32 (the smallest size their five stride-2 stages reduce to exactly 1x1).
_TORCHVISION_RECIPE = TrainRecipe(optimizer="adam", lr=1e-3, batch_size=128, epochs=5,
                                  init="builder")
register_model("resnet18", dataset=None, input_shape=(3, 32, 32), recipe=_TORCHVISION_RECIPE)(
    torchvision_models.resnet18
)
register_model(
    "mobilenet_v3_small", dataset=None, input_shape=(3, 32, 32), recipe=_TORCHVISION_RECIPE
)(torchvision_models.mobilenet_v3_small)
