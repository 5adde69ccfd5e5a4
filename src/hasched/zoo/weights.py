"""Reading weight files and loading them strictly into a model.

Two formats: ``.safetensors`` and a ``torch.save``-d state dict (``.pt``/``.pth``), read with
``weights_only=True`` so a checkpoint can never run code. A ``.pt`` file may hold the state
dict itself or a dict with it under ``"state_dict"``, ``"model_state_dict"`` or ``"model"``
(the usual training-script layouts). Loading is strict: every key of the model present,
nothing extra, every shape equal; a mismatch is one line naming a few keys.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from hasched.errors import HaschedError

__all__ = ["check_state", "file_sha256", "load_strict", "read_state_file"]

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_SHOWN = 3  # keys named in a mismatch message


def _is_state(obj: object) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (on CPU).

    Raises:
        HaschedError: If the file is missing, corrupt, of another suffix, a pickled module
            (refused by ``weights_only``), or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise HaschedError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
            raise HaschedError(f"corrupt checkpoint weights {path}: {exc}") from None
    if path.suffix not in (".pt", ".pth"):
        raise HaschedError(f"checkpoint {path}: use a .safetensors, .pt or .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HaschedError(f"checkpoint {path} is not a plain state dict (weights_only=True"
                           f" refused it: {first}); save model.state_dict() instead") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise HaschedError(f"corrupt checkpoint weights {path}: {exc}") from None
    if _is_state(obj):
        return obj
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if _is_state(obj.get(key)):
                return obj[key]
    raise HaschedError(f"checkpoint {path} holds no state dict (a dict of tensors, or one under"
                       f" {', '.join(repr(k) for k in _NESTED_KEYS)})")


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def check_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str | Path,
    label: str,
    *,
    exact_dtype: bool = True,
    hint: str = "",
) -> None:
    """Check that ``state`` fits ``model`` exactly, raising one line if not.

    Args:
        model: The freshly built model.
        state: The weights to load.
        source: Where they came from (for the message).
        label: The model's name (for the message).
        exact_dtype: Require equal dtypes (the store); else floating-point weights of another
            precision are accepted and converted by ``load_state_dict``.
        hint: Appended to every message (e.g. what to delete to retrain).

    Raises:
        HaschedError: For missing or unexpected keys, or a shape/dtype mismatch.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if not exact_dtype:
        # BatchNorm fills a missing counter itself (older torch versions did not save it).
        missing = [k for k in missing if not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing {_few(missing)}"] if missing else []
        parts += [f"unexpected {_few(unexpected)}"] if unexpected else []
        raise HaschedError(f"checkpoint {source} does not match {label}: keys differ"
                           f" ({'; '.join(parts)}){hint}")
    for key, want in expected.items():  # the model's order, whatever the file's
        tensor = state.get(key, want)
        same_dtype = tensor.dtype == want.dtype or (
            not exact_dtype and tensor.is_floating_point() and want.is_floating_point()
        )
        if tensor.shape != want.shape or not same_dtype:
            raise HaschedError(
                f"checkpoint {source} does not match {label}: {key} is"
                f" {tuple(tensor.shape)} {tensor.dtype}, expected"
                f" {tuple(want.shape)} {want.dtype}{hint}"
            )


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                label: str, *, exact_dtype: bool = True, hint: str = "") -> nn.Module:
    """:func:`check_state`, then load ``state`` into ``model``; returns ``model``."""
    check_state(model, state, source, label, exact_dtype=exact_dtype, hint=hint)
    model.load_state_dict(state, strict=True)
    return model


def file_sha256(path: str | Path) -> str:
    """Short sha256 hex (16 digits) of a file, to identify the weights used."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]
