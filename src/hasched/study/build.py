"""The composition layer: model store + data + fault scenario -> evaluator.

The CLI, the sensitivity campaigns and the schedule search all build their evaluators
here, so "evaluate mnist32-cnn seed 1 with c0 faulty" means the same thing everywhere.

Example:
    >>> from hasched.study.build import build_evaluator, evaluate
    >>> from hasched.study.scenario import Scenario
    >>> ev = build_evaluator(Scenario(layers=("c0",), fault="flip-to-1", fr_max=5e-3))
    >>> evaluate(ev, repeats=3, error_seed=0)["accuracy_mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from hasched.errors import HaschedError
from hasched.io import atomic_write, check_type, read_json, require
from hasched.sim.evaluator import EvalConfig, FaultyEvaluator, summarize
from hasched.sim.layers import weight_layer_names
from hasched.study.scenario import Scenario, parse_layer_groups
from hasched.zoo.data import parse_image_range

__all__ = [
    "resolve_device",
    "calibration_images",
    "parse_image_range",
    "check_image_spec",
    "load_images",
    "build_evaluator",
    "accuracy_mismatch",
    "check_layers",
    "evaluate",
    "save_schedule",
    "read_schedule",
    "load_schedule",
]


def resolve_device(device: str | None = None) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).

    On CUDA, TF32 matmuls are switched off: TF32 is one of the simulated errors, so the
    simulator itself must compute in true FP32.
    """
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise HaschedError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HaschedError("--device cuda was asked for, but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif dev.type != "cpu":
        raise HaschedError(f"unsupported device {device!r}; use cpu or cuda")
    return dev




def check_image_spec(spec: str, option: str = "--images") -> None:
    """Syntax and order of an image range, before the dataset (and its size) is loaded."""
    text = str(spec).strip()
    try:
        parse_image_range(text, 1 << 62)
    except HaschedError:
        raise HaschedError(f"{option} must be N >= 1, A:B, A: or :B with A < B, got "
                           f"{text!r}") from None


def _ref(model: str | Scenario):
    from hasched.zoo.ref import ModelRef

    return model.model_ref() if isinstance(model, Scenario) else ModelRef(model)


def load_images(
    model: str | Scenario,
    spec: str | int | None = None,
    data_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Test images of the model's dataset, shaped for it: ``(images, labels, info)``."""
    from hasched.zoo.load import eval_data

    return eval_data(_ref(model), spec, data_dir, device)


def model_layer_names(model: str | Scenario) -> list[str]:
    """Accelerable layer names of a model (no weights are loaded)."""
    from hasched.zoo.ref import build_model

    return weight_layer_names(build_model(_ref(model), 0))


def require_model(scn: Scenario, models_dir: str | Path | None = None) -> None:
    """Checks the scenario's model can be loaded (missing, corrupt or NaN checkpoint) before
    any output exists; a checkpoint file is loaded strictly."""
    from hasched.zoo.load import load_model
    from hasched.zoo.train import require_stored

    ref = scn.model_ref()
    if ref.checkpoint is not None:
        load_model(ref, scn.seed)
    else:
        require_stored(ref, scn.seed, models_dir)


def calibration_images(model: str | Scenario, data_dir: str | Path | None, device,
                       n: int = 512) -> torch.Tensor:
    """The first ``n`` training images of the model's dataset (int8 activation scales)."""
    from hasched.zoo.data import load_dataset
    from hasched.zoo.load import eval_data

    ref = _ref(model)
    n = min(n, len(load_dataset(ref.dataset, "train", data_dir)))
    return eval_data(ref, f":{n}", data_dir, device, split="train")[0]


def build_evaluator(
    scn: Scenario,
    *,
    device: str | torch.device | None = "cpu",
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    config: EvalConfig | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    data: tuple[torch.Tensor, torch.Tensor, dict] | None = None,
    train: bool = False,
) -> FaultyEvaluator:
    """Loads the model and its data and returns a ready evaluator.

    ``data`` lets callers that evaluate many scenarios share one loaded image set (it
    replaces ``scn.images``). The evaluator carries ``.info`` (model metadata, images,
    scenario) for reports. A missing checkpoint is an error unless ``train`` is set
    (training takes minutes).
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    from hasched.zoo.load import load_model

    scn.validate()
    model, meta = load_model(scn.model_ref(), scn.seed, models_dir=models_dir,
                             data_dir=data_dir, train=train, log=log, progress=progress)
    parse_layer_groups([scn.layers], weight_layer_names(model))
    x, y, img_info = data if data is not None else load_images(scn, scn.images, data_dir, dev)
    arith = scn.arithmetic_obj()
    calib = calibration_images(scn, data_dir, dev) if arith.needs_calibration else None
    fault, profile, chip = scn.fault_data()
    ev = FaultyEvaluator(model, x.to(dev), y.to(dev), list(scn.layers), fault, profile,
                         chip=chip, mapping=scn.mapping_obj(), arithmetic=arith,
                         calibration=calib, metric=scn.metric, config=config)
    ev.info = {"images": img_info, "checkpoint": meta, "scenario": scn.to_dict(),
               "mapping": ev.mapping.describe(), "fault": ev.fault_model.describe()}
    if log is not None and scn.metric == "top1":
        warning = accuracy_mismatch(ev.reference_score, meta, img_info)
        if warning:
            log(f"warning: {scn.model} seed {scn.seed}: {warning}")
    return ev


def accuracy_mismatch(clean: float, meta: dict, images: dict, tolerance: float = 0.02) -> str:
    """Compares a measured clean accuracy with the checkpoint's recorded test accuracy.

    Only a measurement on the full test set (the one ``test_accuracy`` was measured on,
    same dataset fingerprint) is compared; it is free, since every evaluator computes its
    clean predictions anyway.

    Returns:
        A one-line warning when they differ by more than ``tolerance``, else ``""``.
    """
    recorded = meta.get("test_accuracy")
    fingerprint = (meta.get("dataset_fingerprint") or {}).get("test")
    full = (images.get("start") == 0 and images.get("stop") == meta.get("test_images")
            and fingerprint is not None and images.get("fingerprint") == fingerprint)
    if not full or not isinstance(recorded, int | float) or abs(clean - recorded) <= tolerance:
        return ""
    return (f"clean accuracy {100 * clean:.1f} % on the full test set, but the checkpoint "
            f"records {100 * recorded:.1f} %; the weights may be damaged or from another run")


def check_layers(model_name: str | Scenario, spec: str | list) -> list[tuple[str, ...]]:
    """Validates layer groups against a registered model without loading any checkpoint."""
    return parse_layer_groups(spec, model_layer_names(model_name))


def evaluate(
    ev: FaultyEvaluator,
    repeats: int = 3,
    error_seed: int = 0,
    perms: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Clean and faulty metric of one evaluator (the JSON of ``hasched evaluate``).

    The record holds the whole scenario (``scenario``), so that
    ``Scenario.from_dict(record["scenario"])`` re-runs it.
    """
    g = torch.Generator(device=ev.device).manual_seed(error_seed)
    if ev.fault_model.permanent:
        repeats = 1  # a chip is deterministic: more repeats would repeat the same number
    acc = ev.accuracy(perms, repeats=repeats, generator=g)[0].tolist()
    stats = summarize(acc)
    info = getattr(ev, "info", {})
    scn = dict(info.get("scenario", {}))
    scn.update(repeats=repeats, error_seed=error_seed)
    return {
        "scenario": scn,
        "model": scn.get("model"),
        "seed": scn.get("seed"),
        "layers": ev.layers,
        "error": scn.get("fault"),
        "fr_max": scn.get("fr_max"),
        "profile_seed": scn.get("profile_seed"),
        "mapping": ev.mapping.spec(),
        "arithmetic": ev.arithmetic.spec(),
        "fault": ev.fault_model.describe(),
        "metric": ev.metric_name,
        "repeats": repeats,
        "images": ev.n_images,
        "error_seed": error_seed,
        "scheduled": sorted(perms) if perms else [],
        "path": ev.last_path,
        "fallback": ev.fallback_reason or None,
        "layer_paths": ev.layer_modes(),
        "reference_accuracy": ev.reference_score,
        "clean_accuracy": ev.clean_accuracy,
        "accuracy_mean": stats["mean"],
        "accuracy_std": stats["std"],
        "accuracy_ci95": stats["ci95"],
        "accuracies": acc,
    }


def save_schedule(path: str | Path, perms: dict[str, torch.Tensor], **meta) -> Path:
    """Writes a schedule file: ``{"permutations": {layer: [row per slot]}, ...meta}``."""
    obj = dict(meta)
    obj["permutations"] = {k: [int(i) for i in v.reshape(-1).tolist()] for k, v in perms.items()}
    return atomic_write(path, json.dumps(obj, indent=1))


def read_schedule(path: str | Path) -> tuple[dict[str, list[int]], dict]:
    """Reads a schedule file and checks its schema (no model needed, so it can run first).

    The file is ``{"permutations": {layer: [row, ...]}, ...metadata}``; every entry must be
    a JSON integer (``0.9``, ``true`` and ``"1"`` are refused, never coerced) and at least
    one layer must be scheduled. A folder stands for its ``schedule.json``.

    Returns:
        ``({layer: [row per slot]}, the file's metadata)``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "schedule.json"
    name = f"schedule {path}"
    obj = read_json(path, what="schedule file")
    perms = require(obj, "permutations", dict, file=name)
    if not perms:
        raise HaschedError(f"{name}: 'permutations' is empty; it must map at least one "
                           "faulty layer to a permutation")
    for layer, perm in perms.items():
        check_type(perm, list[int], file=name, name=f"permutations.{layer}")
    return perms, {k: v for k, v in obj.items() if k != "permutations"}


def load_schedule(path: str | Path, rows: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a schedule file (:func:`read_schedule`) and checks it against the faulty
    layers' row counts.

    Returns:
        ``({layer: LongTensor[1, rows]}, the file's metadata)``.
    """
    perms, meta = read_schedule(path)
    name = f"schedule {Path(path) / 'schedule.json' if Path(path).is_dir() else path}"
    out = {}
    for layer, perm in perms.items():
        if layer not in rows:
            raise HaschedError(f"{name} names layer {layer!r}, which is not among the "
                               f"faulty layers {sorted(rows)}")
        n = rows[layer]
        if len(perm) != n or sorted(perm) != list(range(n)):
            raise HaschedError(f"{name}: layer {layer} needs a permutation of 0..{n - 1} "
                               f"(each row once), got {len(perm)} entries")
        out[layer] = torch.tensor(perm, dtype=torch.long)[None]
    return out, meta
