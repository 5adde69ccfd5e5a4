"""The scenario options shared by every CLI command, declared once.

``@scenario_options()`` adds the options below to a Typer command and hands them to the
command as one ``scn: dict`` argument; :func:`scenario_from` turns that into a
:class:`~hasched.study.scenario.Scenario`. Every command that evaluates something therefore
spells every scenario field the same way (a test checks it). With ``sweep=True`` (used by
``sensitivity``) the swept fields take comma-separated lists.

(No ``from __future__ import annotations`` here: Typer reads these annotations as objects.)
"""

import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated

import typer

from hasched.errors import HaschedError

__all__ = ["SCENARIO_OPTION_NAMES", "scenario_options", "scenario_from", "parse_int_list"]


def _opt(*names: str, help: str, hidden: tuple[str, ...] = ()) -> typer.models.OptionInfo:
    return typer.Option(*names, *hidden, help=help)


# name -> (annotation, default); the option names are the field names with dashes.
_SCALAR = {
    "model": (Annotated[str, _opt("--model", "-m", help="Registered model (hasched list).")],
              "mnist32-cnn"),
    "seed": (Annotated[int, _opt("--seed", help="Model seed (one trained instance).")], 1),
    "torchvision": (Annotated[typing.Optional[str], _opt(  # noqa: UP045
        "--torchvision", help="A torchvision model instead of --model (bundled equivalents "
        "here: resnet18, mobilenet_v3_small).")], None),
    "module": (Annotated[typing.Optional[str], _opt(  # noqa: UP045
        "--module", help="PKG.MODULE:FUNCTION returning an nn.Module, instead of --model.")],
        None),
    "checkpoint": (Annotated[typing.Optional[Path], _opt(  # noqa: UP045
        "--checkpoint", help="Weights file (.safetensors/.pt) instead of the store.")], None),
    "num_classes": (Annotated[typing.Optional[int], _opt(  # noqa: UP045
        "--num-classes", help="Outputs of a torchvision/module model.")], None),
    "dataset": (Annotated[typing.Optional[str], _opt(  # noqa: UP045
        "--dataset", help="mnist, mnist32 or fashion-mnist (torchvision/module models).")],
        None),
    "layers": (Annotated[str, _opt(
        "--layers", help="Layers on the accelerator: c0 | c0+h2 (faulty together) | all "
        "(every layer together); a comma separates groups evaluated one after the other; "
        "each = every layer separately.")], "c0"),
    "mapping": (Annotated[str, _opt(
        "--mapping", help="gpu-tiles (HAS paper) | gpu-tiles:sms=10 | systolic:RxC "
        "(weight-stationary, e.g. systolic:16x16).")], "gpu-tiles"),
    "n_sms": (Annotated[int, _opt("--n-sms", help="SMs of the gpu-tiles mapping.")], 20),
    "k_order": (Annotated[str, _opt(
        "--k-order", help="Reduction order in the chains: chw (PyTorch) or hwc (the authors' "
        "code).")], "chw"),
    "arithmetic": (Annotated[str, _opt("--arithmetic", help="fp32 or int8 (PTQ).")], "fp32"),
    "multiplier": (Annotated[str, _opt(
        "--multiplier", help="int8 multiplier: exact | trunc4 | bam8 | drum4 | mitchell | "
        "lut:FILE[,signed|unsigned] (256x256 .npy or raw .bin).")], "exact"),
    "fault": (Annotated[str, _opt(
        "--fault", help="Fault model, with parameters after a colon: flip-to-1 | "
        "bitflip:high_bit=30 | bf16 | zero | stuck-at:bit=14,value=1[,site=accumulator] | "
        "dead (hasched list).", hidden=("--error", "-e"))], "flip-to-1"),
    "fr_max": (Annotated[float, _opt("--fr-max", help="Transient: maximum per-PE rate.")],
               5e-3),
    "profile_seed": (Annotated[int, _opt("--profile-seed", help="Transient: profile seed.")],
                     1),
    "profile": (Annotated[typing.Optional[Path], _opt(  # noqa: UP045 - Typer needs Optional
        "--profile", help="Transient: a .npy/.json profile instead of a generated one.")],
        None),
    "faulty_pes": (Annotated[typing.Optional[float], _opt(  # noqa: UP045
        "--faulty-pes", help="Permanent: share of faulty PEs of the sampled chip.")], None),
    "chip_seed": (Annotated[int, _opt("--chip-seed", help="Permanent: chip seed.")], 1),
    "chip": (Annotated[typing.Optional[Path], _opt(  # noqa: UP045
        "--chip", help="Permanent: a chip-map file (hasched chips).")], None),
    "repeats": (Annotated[int, _opt("--repeats", help="Fresh error instances.")], 3),
    "images": (Annotated[typing.Optional[str], _opt(  # noqa: UP045
        "--images", help="Test images: N (first N), A:B, A: or :B [default: all].")], None),
    "metric": (Annotated[str, _opt("--metric", help="top1, top5 or sdc1.")], "top1"),
    "error_seed": (Annotated[int, _opt("--error-seed", help="Seed of the error instances.")],
                   0),
}

# sensitivity sweeps these: the same option names, comma-separated lists
_SWEEP = {
    "seed": (Annotated[str, _opt("--seed", help="Model seeds, e.g. 1,2,3.",
                                  hidden=("--seeds",))], "1,2,3"),
    "layers": (Annotated[str, _opt(
        "--layers", help="each | all | c0,h2 (one at a time) | c0+c1 (faulted together).")],
        "each"),
    "fault": (Annotated[str, _opt(
        "--fault", help="all (the paper's five) | flip-to-1,bitflip.",
        hidden=("--errors", "--error", "-e"))], "all"),
    "fr_max": (Annotated[str, _opt(
        "--fr-max", help="paper (Table 1 per error) | sweep (Table 1 + 1e-4..0.5) | "
        "1e-3,2e-3,5e-3.")], "paper"),
    "profile_seed": (Annotated[str, _opt("--profile-seed", help="Fault-profile seeds.",
                                          hidden=("--profile-seeds",))], "1,2"),
    "images": (Annotated[typing.Optional[str], _opt(  # noqa: UP045
        "--images", help="Test images: N, A:B or all.")], "1000"),
}

SCENARIO_OPTION_NAMES = ["--" + k.replace("_", "-") for k in _SCALAR]


def scenario_options(sweep: bool = False, exclude: tuple[str, ...] = (),
                     defaults: dict | None = None, override: tuple[str, ...] = ()):
    """Decorator adding the scenario options to a command, passed on as ``scn: dict``.

    Args:
        sweep: Use the list-valued variants of the swept fields (``sensitivity``).
        exclude: Fields the command sets itself (they are not offered).
        defaults: Command-specific defaults.
        override: Fields the command declares itself with another type (e.g. a list of
            faulty-PE shares); it receives them as its own parameters, not in ``scn``.

    Raises:
        TypeError: a parameter of the command has a scenario field's name without being
            listed in ``override`` (it would silently hide that scenario option).
    """

    def deco(fn):
        spec = {**_SCALAR, **(_SWEEP if sweep else {})}
        spec = {k: v for k, v in spec.items() if k not in exclude}
        own = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        params = [p.replace(annotation=hints.get(p.name, p.annotation))
                  for p in own.parameters.values() if p.name != "scn"]
        taken = {p.name for p in params}
        clash = sorted((taken & spec.keys()) - set(override))
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {clash} hide scenario options; "
                            "rename them or list them in override=")
        for name, (ann, default) in spec.items():
            if name in taken:
                continue
            default = (defaults or {}).get(name, default)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                            annotation=ann, default=default))

        @functools.wraps(fn)
        def wrapper(**kw):
            scn = {k: kw.pop(k) for k in spec if k in kw and k not in taken}
            return fn(scn=scn, **kw)

        wrapper.__signature__ = own.replace(parameters=_ordered(params))
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must see the new signature, not fn's
        return wrapper

    return deco


def _ordered(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Positional parameters first (inspect insists), then keyword-only ones."""
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
           and p.default is inspect.Parameter.empty]
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params if p not in pos]
    return pos + rest


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise HaschedError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not out:
        raise HaschedError(f"--{what} is empty")
    return out


def scenario_from(scn: dict, layers: tuple[str, ...] | None = None, **override):
    """The :class:`~hasched.study.scenario.Scenario` of scalar scenario options.

    ``layers`` replaces the ``--layers`` text (after the caller resolved groups); the
    fault text ``name:k=v,...`` is split into name and parameters.
    """
    from hasched.study.scenario import Scenario, parse_fault

    d = dict(scn)
    d.update(override)
    sources = [f"{k}:{d[k]}" for k in ("torchvision", "module") if d.get(k)]
    d.pop("torchvision", None)
    d.pop("module", None)
    if sources:
        if len(sources) > 1 or d.get("model", "mnist32-cnn") != "mnist32-cnn":
            raise HaschedError("give one model source: --model, --torchvision or --module")
        d["model"] = sources[0]
    if "fault" in d:
        d["fault"], params = parse_fault(d["fault"])
        d["fault_params"] = params
    for key in ("profile", "chip", "checkpoint"):
        if d.get(key) is not None:
            d[key] = str(d[key])
    if layers is not None:
        d["layers"] = layers
    elif isinstance(d.get("layers"), str):
        d["layers"] = tuple(d["layers"].split("+"))
    return Scenario(**d)


ExecutorOpt = Annotated[str, typer.Option(
    "--executor", help="Where jobs run: local (worker processes) or ray[:ADDRESS] (a local "
    "Ray instance, or a running cluster at ADDRESS / auto); needs pip install 'hasched[ray]'.")]


def executor_from(spec: str, workers: int):
    """``local`` or ``ray[:ADDRESS]`` -> an executor (``--workers`` sizes the local ones)."""
    from hasched.study.executor import LocalExecutor, RayExecutor

    kind, _, address = spec.partition(":")
    if kind == "local" and not address:
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address or None, num_cpus=workers if workers > 1 else None)
    raise HaschedError(f"--executor must be local or ray[:ADDRESS], got {spec!r}")
