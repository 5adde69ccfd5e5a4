"""Model references: which network to build, from where, for which data.

A :class:`ModelRef` names a model in one of three ways:

- a registered name (``"mnist32-cnn"``, ``"mlp"``, ``"resnet18"``...; see
  :func:`hasched.zoo.models.list_models`), trained into the checkpoint store on first use;
- ``"torchvision:NAME"``: torchvision's builder when torchvision imports, else the bundled
  state-dict-compatible equivalent (``resnet18``, ``mobilenet_v3_small``;
  :mod:`hasched.zoo.torchvision_models`);
- ``"module:pkg.mod:fn"``: ``fn(**kwargs)`` from an importable module, which must return an
  :class:`torch.nn.Module`. The module is imported by Python's normal rules (installed, on
  ``PYTHONPATH``, or in the working directory under ``python -m hasched``); nothing is added
  to ``sys.path``.

plus optional weights (``checkpoint``: ``.safetensors`` or a ``torch.save``-d state dict),
``num_classes``, ``dataset`` and extra builder keyword arguments. A reference is validated
and normalised when constructed, so two references to the same network compare equal and
map to the same checkpoint-store folder (:attr:`ModelRef.store_name`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hasched.errors import HaschedError
from hasched.zoo import torchvision_models
from hasched.zoo.data import InputAdapter, dataset_classes, dataset_shape, list_datasets
from hasched.zoo.models import get_model_spec

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "ModelRef",
    "adapter_for",
    "build_model",
    "builder_origin",
    "expected_input",
]

TORCHVISION = "torchvision:"
MODULE = "module:"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
# Bundled clean-room equivalents, used when torchvision itself cannot be imported.
_BUNDLED = {
    "mobilenet_v3_small": torchvision_models.mobilenet_v3_small,
    "resnet18": torchvision_models.resnet18,
}
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_RE = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.+-]+")


@functools.cache
def _torchvision_models() -> tuple[Any, str] | None:
    """``(torchvision.models, torchvision's version)``, or None when it is absent or broken.

    A torchvision wheel built for another torch fails at import with a RuntimeError
    ("operator torchvision::nms does not exist"), not an ImportError, hence the broad catch.
    """
    try:
        import torchvision
        import torchvision.models as tvm
    except Exception:  # any import failure means "not usable here"
        return None
    return tvm, str(torchvision.__version__)


def _freeze(value: Any, where: str) -> Any:
    """A JSON-able, hashable copy of a builder argument (lists become tuples)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return tuple(_freeze(v, where) for v in value)
    raise HaschedError(f"{where}: builder argument values must be numbers, strings, booleans"
                       f" or lists of them, got {type(value).__name__}")


@dataclass(frozen=True)
class ModelRef:
    """A reference to one network (see the module docstring).

    Constructing one validates it and fills defaults: a registered model's dataset; and,
    for builders that take them and where they are not given, ``num_classes`` (the dataset's
    class count), ``in_channels`` and ``image_size`` (the dataset's image shape). A
    torchvision reference gets ``num_classes`` the same way (its input stays torchvision's
    3 channels; grey images are repeated by the :class:`~hasched.zoo.data.InputAdapter`).

    Attributes:
        name: ``"mnist32-cnn"``, ``"torchvision:resnet18"`` or ``"module:pkg.mod:fn"``.
        checkpoint: Weights file (``.safetensors``, ``.pt``, ``.pth``), or None for the
            checkpoint store.
        num_classes: Number of outputs, passed to the builder as ``num_classes``.
        dataset: Dataset the model is trained and evaluated on.
        kwargs: Extra builder keyword arguments, as sorted ``(name, value)`` pairs (a
            mapping is accepted and converted).
        input_shape: ``(C, H, W)`` the model expects, overriding the inferred one.

    Raises:
        HaschedError: For an unknown name, a malformed field, or a missing dataset.
    """

    name: str
    checkpoint: str | None = None
    num_classes: int | None = None
    dataset: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = field(default=())
    input_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        if not isinstance(self.name, str) or not self.name.strip():
            raise HaschedError("a model reference needs a name")
        set_("name", self.name.strip())
        set_("kwargs", self._checked_kwargs())
        self._check_target()
        if self.checkpoint is not None:
            path = str(self.checkpoint)
            if not path.endswith(CHECKPOINT_SUFFIXES):
                raise HaschedError(f"checkpoint {path!r}: use a .safetensors, .pt or .pth file")
            set_("checkpoint", path)
        n = self.num_classes
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise HaschedError(f"num_classes must be a positive integer, got {self.num_classes}")
        if self.input_shape is not None:
            shape = tuple(int(v) for v in self.input_shape)
            if len(shape) != 3 or min(shape) < 1:
                raise HaschedError(f"input_shape must be (C, H, W), got {self.input_shape}")
            set_("input_shape", shape)
        self._fill_defaults()

    # --- validation ------------------------------------------------------------------------

    def _checked_kwargs(self) -> tuple[tuple[str, Any], ...]:
        items = self.kwargs.items() if isinstance(self.kwargs, Mapping) else self.kwargs
        out = {}
        for key, value in items:
            if not isinstance(key, str) or not re.fullmatch(_IDENT, key):
                raise HaschedError(f"{self.name}: bad builder argument name {key!r}")
            if key == "num_classes":
                raise HaschedError(f"{self.name}: give num_classes as its own field")
            if key == "weights" and self.kind == "torchvision":
                raise HaschedError("pretrained torchvision weights cannot be downloaded here;"
                                   " pass a checkpoint file instead")
            out[key] = _freeze(value, self.name)
        return tuple(sorted(out.items()))

    def _check_target(self) -> None:
        if self.kind == "registered":
            get_model_spec(self.name)  # unknown names list the known ones
        elif self.kind == "torchvision":
            torchvision_builder(self.target)
        elif not _MODULE_RE.fullmatch(self.target):
            raise HaschedError(f"bad module reference {self.target!r}; use pkg.module:function")

    def _fill_defaults(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        if self.kind == "registered":
            spec = get_model_spec(self.name)
            set_("dataset", self.dataset or spec.dataset)
            takes = spec.parameters()
        else:
            takes = ("num_classes",) if self.kind == "torchvision" else ()
        if self.dataset is None:
            raise HaschedError(f"{self.name} has no dataset of its own; name one"
                               f" ({', '.join(list_datasets())})")
        channels, side, _ = dataset_shape(self.dataset)  # also validates the name
        if self.num_classes is not None and "num_classes" not in takes and self.kind != "module":
            raise HaschedError(f"{self.name} has a fixed output layer; num_classes does not apply")
        filled = {"num_classes": dataset_classes(self.dataset), "in_channels": channels,
                  "image_size": side}
        if self.num_classes is None and "num_classes" in takes:
            set_("num_classes", filled["num_classes"])
        given = dict(self.kwargs)
        if self.kind == "registered":
            for key in ("in_channels", "image_size"):
                if key in takes and key not in given:
                    given[key] = filled[key]
            set_("kwargs", tuple(sorted(given.items())))

    # --- derived names ---------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``"registered"``, ``"torchvision"`` or ``"module"``."""
        if self.name.startswith(TORCHVISION):
            return "torchvision"
        if self.name.startswith(MODULE):
            return "module"
        return "registered"

    @property
    def target(self) -> str:
        """The name without its ``torchvision:`` / ``module:`` prefix."""
        return self.name.split(":", 1)[1] if self.kind != "registered" else self.name

    def builder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the builder is called with."""
        kwargs = dict(self.kwargs)
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        return kwargs

    @property
    def store_name(self) -> str:
        """Checkpoint-store folder name: the bare name for a registered model with its own
        dataset and default arguments, else the name plus what differs, e.g.
        ``resnet18@fashion-mnist_c10_in_channels=1``."""
        defaults: dict[str, Any] = {}
        own_dataset = None
        base = self.name.replace(":", "-")
        if self.kind == "registered":
            spec = get_model_spec(self.name)
            own_dataset = spec.dataset
            defaults = {k: p.default for k, p in inspect.signature(spec.builder).parameters.items()}
        elif self.kind == "torchvision":
            defaults = {"num_classes": 1000}
        parts = [base if self.dataset == own_dataset else f"{base}@{self.dataset}"]
        for key, value in sorted(self.builder_kwargs().items()):
            if key in defaults and _freeze(defaults[key], key) == value:
                continue
            if key == "num_classes":
                parts.append(f"c{value}")
            elif isinstance(value, bool | int | float | str) and _SAFE_VALUE.fullmatch(str(value)):
                parts.append(f"{key}={value}")
            else:
                digest = hashlib.sha256(json.dumps([key, value]).encode()).hexdigest()[:8]
                parts.append(f"{key}={digest}")
        if self.input_shape is not None:
            parts.append("in" + "x".join(map(str, self.input_shape)))
        return "_".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; :meth:`from_dict` gives back an equal reference."""
        return {"name": self.name, "checkpoint": self.checkpoint,
                "num_classes": self.num_classes, "dataset": self.dataset,
                "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs},
                "input_shape": list(self.input_shape) if self.input_shape else None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRef:
        """Inverse of :meth:`to_dict`."""
        shape = data.get("input_shape")
        return cls(data["name"], data.get("checkpoint"), data.get("num_classes"),
                   data.get("dataset"), data.get("kwargs") or {},
                   tuple(shape) if shape else None)

    @classmethod
    def from_options(
        cls,
        model: str | None = None,
        torchvision: str | None = None,
        module: str | None = None,
        checkpoint: str | Path | None = None,
        num_classes: int | None = None,
        dataset: str | None = None,
        *,
        kwargs: Mapping[str, Any] | None = None,
        input_shape: tuple[int, int, int] | None = None,
        default_model: str | None = None,
    ) -> ModelRef:
        """The reference described by the CLI's model options.

        Args:
            model: Registered model name (``--model``).
            torchvision: torchvision model name, without prefix (``--torchvision``).
            module: ``pkg.mod:fn`` (``--module``).
            checkpoint: Weights file (``--checkpoint``).
            num_classes: Number of outputs (``--num-classes``).
            dataset: Dataset name (``--dataset``).
            kwargs: Extra builder arguments.
            input_shape: ``(C, H, W)`` override.
            default_model: Registered name used when none of the three sources is given.

        Raises:
            HaschedError: If no source or more than one is given, or the reference is invalid.
        """
        given = [(flag, v) for flag, v in (("--model", model), ("--torchvision", torchvision),
                                            ("--module", module)) if v]
        if len(given) > 1:
            raise HaschedError(f"give one model source, not {' and '.join(f for f, _ in given)}")
        if not given:
            if default_model is None:
                raise HaschedError("name a model: --model NAME, --torchvision NAME or"
                                   " --module PKG.MODULE:FUNCTION")
            given = [("--model", default_model)]
        flag, value = given[0]
        value = value.strip()
        prefix = {"--model": "", "--torchvision": TORCHVISION, "--module": MODULE}[flag]
        name = value if not prefix or value.startswith(prefix) else prefix + value
        return cls(name, None if checkpoint is None else str(checkpoint), num_classes, dataset,
                   dict(kwargs or {}), input_shape)


def torchvision_builder(name: str) -> tuple[Callable[..., nn.Module], str]:
    """torchvision's builder for ``name`` and where it comes from.

    Returns:
        ``(builder, origin)``; ``origin`` is ``"torchvision X.Y"`` for the real one or
        ``"hasched (torchvision-compatible)"`` for a bundled equivalent.

    Raises:
        HaschedError: For a name neither torchvision (if importable) nor the bundle knows.
    """
    found = _torchvision_models()
    if found is not None:
        tvm, version = found
        if name in tvm.list_models(module=tvm):
            return tvm.get_model_builder(name), f"torchvision {version}"
        raise HaschedError(f"torchvision {version} has no classification model {name!r}")
    if name in _BUNDLED:
        return _BUNDLED[name], "hasched (torchvision-compatible)"
    raise HaschedError(f"torchvision is not importable here, and {name!r} is not among its"
                       f" bundled equivalents: {', '.join(sorted(_BUNDLED))}")


def builder_origin(ref: ModelRef) -> str:
    """Where ``ref``'s builder comes from, for metadata."""
    if ref.kind == "torchvision":
        return torchvision_builder(ref.target)[1]
    return "hasched registry" if ref.kind == "registered" else ref.target


def _import_builder(target: str) -> Callable[..., Any]:
    """The function ``fn`` of ``"pkg.mod:fn"``, with one-line errors for every failure."""
    mod_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        if err.name and (mod_name == err.name or mod_name.startswith(err.name + ".")):
            raise HaschedError(f"cannot import {mod_name!r}: no module named {err.name!r} (it"
                               " must be importable: installed, on PYTHONPATH, or in the working"
                               " directory with `python -m hasched`)") from None
        raise HaschedError(f"importing {mod_name!r} failed: {err}") from None
    except Exception as err:  # the user's module raised while importing
        raise HaschedError(f"importing {mod_name!r} failed: {type(err).__name__}: {err}") from None
    if not hasattr(module, attr):
        raise HaschedError(f"module {mod_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise HaschedError(f"{target} is not callable ({type(fn).__name__})")
    return fn


def _call_builder(label: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as err:
        raise HaschedError(f"{label}: bad parameters ({err})") from None
    except ValueError:
        pass  # no signature to check (a builtin); the call itself will tell
    try:
        model = fn(**kwargs)
    except HaschedError:
        raise
    except Exception as err:  # a foreign builder failed; say so on one line
        raise HaschedError(f"{label}({', '.join(kwargs)}) failed: {type(err).__name__}:"
                           f" {err}") from None
    if not isinstance(model, nn.Module):
        raise HaschedError(f"{label} returned {type(model).__name__!r}, not a torch.nn.Module")
    return model


def build_model(ref: ModelRef, seed: int | None = None) -> nn.Module:
    """A fresh, untrained instance of ``ref`` (on CPU, in training mode).

    Args:
        ref: The reference.
        seed: With a seed, the builder's own initialisation draws from a fork of the global
            RNG seeded with it, so the weights depend on the seed only and the caller's RNG
            state is left as it was (any builder, including foreign ones, initialises from the
            global RNG). Without one, it draws from the global RNG as is.

    Raises:
        HaschedError: If the builder cannot be found, rejects its arguments, fails, or
            returns something that is not a module.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(ref, None)
    kwargs = ref.builder_kwargs()
    if ref.kind == "registered":
        fn: Callable[..., Any] = get_model_spec(ref.name).builder
    elif ref.kind == "torchvision":
        fn = torchvision_builder(ref.target)[0]
    else:
        fn = _import_builder(ref.target)
    return _call_builder(ref.name, fn, kwargs)


def expected_input(ref: ModelRef, model: nn.Module | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input of ``ref``'s model.

    An explicit ``ref.input_shape`` wins. Registered models declare it (adjusted for
    ``in_channels``/``image_size``); torchvision models take 3 channels at 32x32 for the
    bundled pair and 224x224 (their ImageNet size) otherwise. For ``module:`` models it is
    inferred from ``model``'s first weight layer: a Conv2d gives the channels (the size is
    the dataset's), a Linear on flattened images gives channels and size when
    ``in_features`` is C*S*S for C in (1, 3) and S in (the dataset's side, 28, 32); else the
    dataset's own shape.
    """
    if ref.input_shape is not None:
        return ref.input_shape
    if ref.kind == "registered":
        return get_model_spec(ref.name).input_shape_for(dict(ref.kwargs))
    if ref.kind == "torchvision":
        return (3, 32, 32) if ref.target in _BUNDLED else (3, 224, 224)
    native = dataset_shape(ref.dataset)
    if model is None:
        model = build_model(ref, seed=0)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)), None)
    if isinstance(first, nn.Conv2d):
        return (first.in_channels, native[1], native[2])
    if isinstance(first, nn.Linear):
        for side in dict.fromkeys((native[1], 28, 32)):
            for channels in (1, 3):
                if channels * side * side == first.in_features:
                    return (channels, side, side)
    return native


def adapter_for(ref: ModelRef, model: nn.Module | None = None) -> InputAdapter:
    """The :class:`InputAdapter` from ``ref.dataset``'s images to ``ref``'s model input."""
    return InputAdapter(dataset_shape(ref.dataset), expected_input(ref, model))
