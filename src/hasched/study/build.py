"""The composition layer: model store + data + fault scenario -> evaluator.

The CLI, the sensitivity campaigns and the schedule search all build their evaluators
here, so "evaluate mnist32-cnn seed 1 with c0 faulty" means the same thing everywhere.

Example:
    >>> from hasched.study.build import FaultScenario, build_evaluator, evaluate
    >>> ev = build_evaluator("mnist32-cnn", 1, ["c0"], FaultScenario("flip-to-1", 5e-3, 1))
    >>> evaluate(ev, repeats=3, error_seed=0)["accuracy_mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hasched.errors import HaschedError
from hasched.sim.evaluator import EvalConfig, FaultyEvaluator, summarize
from hasched.sim.faults import create_error_model
from hasched.sim.hardware import AcceleratorConfig, FaultProfile
from hasched.sim.layers import weight_layer_names
from hasched.zoo.data import load_dataset, parse_image_range
from hasched.zoo.models import get_model_spec
from hasched.zoo.train import load_or_train

__all__ = [
    "FaultScenario",
    "resolve_device",
    "parse_layers",
    "parse_image_range",
    "load_images",
    "build_evaluator",
    "evaluate",
    "save_schedule",
    "load_schedule",
]


@dataclass(frozen=True)
class FaultScenario:
    """What is wrong with the accelerator.

    Attributes:
        error: Error model name (see :func:`hasched.sim.faults.list_error_models`).
        fr_max: Maximum per-PE fault rate of the generated profile.
        profile_seed: Seed of the generated profile.
        profile_path: Load this ``.npy``/``.json`` profile instead of generating one.
        error_params: Extra error-model parameters, e.g. ``(("high_bit", 30),)``.
        accel: Accelerator geometry.
    """

    error: str
    fr_max: float
    profile_seed: int = 1
    profile_path: str | None = None
    error_params: tuple[tuple[str, int], ...] = ()
    accel: AcceleratorConfig = field(default_factory=AcceleratorConfig)

    def error_model(self):
        return create_error_model(self.error, **dict(self.error_params))

    def profile(self) -> FaultProfile:
        if self.profile_path:
            prof = FaultProfile.load(self.profile_path)
        else:
            prof = FaultProfile.generate(self.fr_max, self.profile_seed, self.accel)
        prof.check(self.accel)
        return prof


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


def parse_layers(spec: str | list[str], known: list[str]) -> list[str]:
    """``"c0,h2"`` -> ``["c0", "h2"]``; ``"all"`` -> every weight layer."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(known)
        spec = [s.strip() for s in spec.replace("+", ",").split(",") if s.strip()]
    for name in spec:
        if name not in known:
            raise HaschedError(f"unknown layer {name!r}; known layers: {', '.join(known)}")
    if not spec:
        raise HaschedError("no layer given")
    return list(spec)


def load_images(
    model_name: str,
    spec: str | int | None = None,
    data_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Test images of the model's dataset: ``(images, labels, info)``."""
    ds = load_dataset(get_model_spec(model_name).dataset, "test", data_dir)
    sl = parse_image_range(spec, len(ds))
    info = {"dataset": ds.name, "fingerprint": ds.fingerprint, "start": sl.start,
            "stop": sl.stop}
    return ds.images[sl].to(device), ds.labels[sl].to(device), info


def build_evaluator(
    model_name: str,
    seed: int,
    layers: str | list[str],
    scenario: FaultScenario,
    images: str | int | None = None,
    *,
    device: str | torch.device | None = "cpu",
    models_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    config: EvalConfig | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    data: tuple[torch.Tensor, torch.Tensor, dict] | None = None,
) -> FaultyEvaluator:
    """Loads (or trains) the model and its data and returns a ready evaluator.

    ``data`` lets callers that evaluate many scenarios share one loaded image set.
    The evaluator carries ``.info`` (model metadata, images, scenario) for reports.
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    model, meta = load_or_train(model_name, seed, models_dir=models_dir, data_dir=data_dir,
                                progress=progress, log=log)
    layer_list = parse_layers(layers, weight_layer_names(model))
    x, y, img_info = data if data is not None else load_images(model_name, images, data_dir, dev)
    ev = FaultyEvaluator(model, x.to(dev), y.to(dev), layer_list, scenario.profile(),
                         scenario.error_model(), scenario.accel, config)
    ev.info = {"model": model_name, "seed": seed, "layers": layer_list, "images": img_info,
               "checkpoint": meta, "scenario": scenario_dict(scenario)}
    return ev


def scenario_dict(s: FaultScenario) -> dict:
    d = asdict(s)
    d["error_params"] = dict(s.error_params)
    return d


def evaluate(
    ev: FaultyEvaluator,
    repeats: int = 3,
    error_seed: int = 0,
    perms: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Clean and faulty accuracy of one evaluator (the JSON of ``hasched evaluate``)."""
    g = torch.Generator(device=ev.device).manual_seed(error_seed)
    acc = ev.accuracy(perms, repeats=repeats, generator=g)[0].tolist()
    stats = summarize(acc)
    info = getattr(ev, "info", {})
    scn = info.get("scenario", {})
    return {
        "model": info.get("model"),
        "seed": info.get("seed"),
        "layers": ev.layers,
        "error": scn.get("error"),
        "fr_max": scn.get("fr_max"),
        "profile_seed": scn.get("profile_seed"),
        "repeats": repeats,
        "images": ev.n_images,
        "error_seed": error_seed,
        "scheduled": sorted(perms) if perms else [],
        "clean_accuracy": ev.clean_accuracy,
        "accuracy_mean": stats["mean"],
        "accuracy_std": stats["std"],
        "accuracy_ci95": stats["ci95"],
        "accuracies": acc,
    }


def save_schedule(path: str | Path, perms: dict[str, torch.Tensor], **meta) -> Path:
    """Writes a schedule file: ``{"permutations": {layer: [row per slot]}, ...meta}``."""
    path = Path(path)
    obj = dict(meta)
    obj["permutations"] = {k: [int(i) for i in v.reshape(-1).tolist()] for k, v in perms.items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
    return path


def load_schedule(path: str | Path, rows: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a schedule file and checks it against the faulty layers' row counts.

    Returns:
        ``({layer: LongTensor[1, rows]}, the file's metadata)``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "schedule.json"
    if not path.is_file():
        raise HaschedError(f"schedule file not found: {path}")
    try:
        obj = json.loads(path.read_text())
        perms = obj["permutations"]
        if not isinstance(perms, dict):
            raise TypeError("'permutations' must be an object")
        out = {k: torch.tensor([int(i) for i in v], dtype=torch.long)[None]
               for k, v in perms.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HaschedError(f"schedule {path} is malformed: {err}") from None
    for name, perm in out.items():
        if name not in rows:
            raise HaschedError(f"schedule {path} names layer {name!r}, which is not among the "
                               f"faulty layers {sorted(rows)}")
        n = rows[name]
        if perm.shape[1] != n or not torch.equal(perm.sort().values[0], torch.arange(n)):
            raise HaschedError(f"schedule {path}: layer {name} needs a permutation of "
                               f"0..{n - 1}")
    meta = {k: v for k, v in obj.items() if k != "permutations"}
    return out, meta
