"""The paper's DNN models (§4.1) and a small timm-style registry.

Both models are :class:`torch.nn.Sequential` containers built from an ``OrderedDict`` so that
the paper's layer names (``c0``, ``h0``, ``op``...) are the module names. The fault simulator
relies on this: it swaps faulty modules in by name and caches the clean prefix of a network by
slicing the Sequential, so the order and names here are part of the public contract.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from hasched.registry import Registry

__all__ = [
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
        init: ``"he_uniform"`` (Kaiming-uniform for ReLU, zero biases) or ``"default"``
            (Keras defaults: Glorot-uniform weights, zero biases).
    """

    optimizer: Literal["sgd", "adam"]
    lr: float
    momentum: float = 0.0
    batch_size: int = 128
    epochs: int = 25
    reference_train_size: int = 60000
    init: Literal["he_uniform", "default"] = "default"


@dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
        name: Registry name, e.g. ``"mnist32-cnn"``.
        builder: Zero-argument callable returning a freshly built (untrained) module.
        dataset: Name of the dataset it is trained on (see :mod:`hasched.zoo.data`).
        input_shape: Shape of one input image, ``(C, H, W)``.
        recipe: Training recipe.
    """

    name: str
    builder: Callable[[], nn.Module]
    dataset: str
    input_shape: tuple[int, int, int]
    recipe: TrainRecipe


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(
    name: str, *, dataset: str, input_shape: tuple[int, int, int], recipe: TrainRecipe
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator registering a model builder under ``name``.

    Args:
        name: Registry name; must be new.
        dataset: Dataset name the model is trained on.
        input_shape: ``(C, H, W)`` of one input.
        recipe: Training recipe.

    Returns:
        The decorator, which returns the builder unchanged.
    """

    def decorator(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
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


def create_model(name: str) -> nn.Module:
    """Build a fresh, untrained instance of a registered model.

    The weights come from PyTorch's default initialisation, i.e. from the global RNG; callers
    wanting reproducible weights call :func:`init_weights` with an explicit generator.

    Raises:
        HaschedError: If ``name`` is not registered.
    """
    return get_model_spec(name).builder()


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
        generator: A :class:`torch.Generator` so the result depends only on its seed.

    Raises:
        ValueError: For an unknown ``init``.
    """
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
