"""One frozen description of a fault scenario, shared by every command.

A :class:`Scenario` names the model (and its trained instance), the layers that run on the
accelerator, the accelerator (mapping, arithmetic, multiplier), what goes wrong (fault model
and the per-PE fault data: a generated or loaded transient profile, or a sampled or loaded
chip map), and how it is measured (images, repeats, metric, error seed). Results record
``scenario.to_dict()``, and ``Scenario.from_dict`` of that record re-runs the row exactly.

Layer syntax, everywhere: ``,`` separates layer *groups* that are studied separately, ``+``
joins layers that are faulty together; ``all`` is every weight layer together, ``each`` is
every weight layer separately. A Scenario holds one group.

Example:
    >>> s = Scenario(layers=("c0",), fault="flip-to-1", fr_max=5e-3)
    >>> s.replace(mapping="systolic:16x16", arithmetic="int8", fault="stuck-at",
    ...           fault_params=(("bit", 14), ("value", 1)), faulty_pes=0.05).fault_kind
    'permanent'
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hasched.errors import HaschedError
from hasched.sim.arithmetic import Arithmetic, create_arithmetic
from hasched.sim.faults import FaultModel, PermanentFault, create_fault
from hasched.sim.mapping import Mapping, create_mapping
from hasched.sim.metrics import METRICS
from hasched.sim.profile import ChipMap, FaultProfile

__all__ = ["Scenario", "parse_layer_groups", "parse_mapping", "parse_fault", "split_fault_list"]


def parse_layer_groups(spec: str | list | tuple, known: list[str]) -> list[tuple[str, ...]]:
    """``"c0,h2+op"`` -> ``[("c0",), ("h2", "op")]``; ``all``; ``each``.

    Raises:
        HaschedError: unknown layer, empty spec, a layer twice in a group, a group twice.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return [tuple(known)]
        if text == "each":
            return [(n,) for n in known]
        groups = [tuple(p.strip() for p in g.split("+")) for g in text.split(",") if g.strip()]
    else:
        groups = [tuple(g) if isinstance(g, list | tuple) else tuple(str(g).split("+"))
                  for g in spec]
    if not groups:
        raise HaschedError("no layer given (--layers)")
    for g in groups:
        for name in g:
            if name not in known:
                raise HaschedError(f"unknown layer {name!r}; this model's layers: "
                                   f"{', '.join(known)}")
        if len(set(g)) != len(g):
            raise HaschedError(f"layer group {'+'.join(g)!r} names a layer twice")
    if len(set(groups)) != len(groups):
        raise HaschedError(f"--layers lists a group twice: {spec!r}")
    return groups


def _value(text: str) -> Any:
    """``"14"`` -> 14, ``"0.5"`` -> 0.5, ``"random"`` -> "random"."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _params(text: str, what: str) -> tuple[tuple[str, Any], ...]:
    out = []
    for item in [p for p in text.split(",") if p.strip()]:
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise HaschedError(f"{what}: parameters are key=value pairs, got {item!r}")
        out.append((key.strip().replace("-", "_"), _value(val.strip())))
    return tuple(out)


def parse_fault(spec: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """``"stuck-at:bit=14,value=1"`` -> ``("stuck-at", (("bit", 14), ("value", 1)))``."""
    name, _, rest = spec.partition(":")
    return name.strip(), _params(rest, f"--fault {spec!r}")


def split_fault_list(text: str) -> list[str]:
    """``"bitflip:high_bit=30,low_bit=20,zero"`` -> ``["bitflip:high_bit=30,low_bit=20",
    "zero"]``: a comma separates faults, except before another ``key=value``."""
    out: list[str] = []
    for tok in [t.strip() for t in text.split(",") if t.strip()]:
        if "=" in tok and ":" not in tok and out:
            out[-1] += "," + tok
        else:
            out.append(tok)
    return out


def parse_mapping(spec: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """``gpu-tiles``, ``gpu-tiles:sms=10``, ``systolic:16x16``, ``systolic:8x4,k_order=hwc``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    items = [p.strip() for p in rest.split(",") if p.strip()]
    params: list[tuple[str, Any]] = []
    if name == "systolic" and items and "=" not in items[0]:
        dims = items.pop(0).lower().split("x")
        if len(dims) != 2 or not all(d.isdigit() for d in dims):
            raise HaschedError(f"--mapping {spec!r}: use systolic:RxC, e.g. systolic:16x16")
        params += [("rows", int(dims[0])), ("cols", int(dims[1]))]
    params += list(_params(",".join(items), f"--mapping {spec!r}"))
    renames = {"sms": "n_sms", "pes": "pes_per_sm"}
    return name, tuple((renames.get(k, k), v) for k, v in params)


@dataclass(frozen=True)
class Scenario:
    """What to evaluate: model, accelerated layers, accelerator, faults, measurement.

    Attributes:
        model: Registered model name (see ``hasched list``), ``torchvision:NAME`` or
            ``module:pkg.mod:fn`` (see :mod:`hasched.zoo.ref`).
        seed: Model seed (which trained instance).
        checkpoint: A weights file (``.safetensors``/``.pt``) instead of the store.
        num_classes: Outputs of a torchvision/module model (default: the dataset's).
        dataset: Dataset of a torchvision/module model (registered models have their own).
        layers: The layer group on the accelerator (faulty together).
        mapping: Mapping spec (``gpu-tiles``, ``systolic:16x16``, ...).
        n_sms: SMs of the gpu-tiles mapping (paper: 20; the authors' code: 10).
        k_order: Reduction order: ``chw`` (PyTorch) or ``hwc`` (the authors' code).
        arithmetic: ``fp32`` or ``int8``.
        multiplier: int8 multiplier (``exact``, ``drum4``, ``lut:PATH``...).
        fault: Fault model name (transient: flip-to-1, ...; permanent: stuck-at, dead).
        fault_params: Extra parameters of the fault model, e.g. ``(("high_bit", 30),)``.
        fr_max: Transient: maximum per-PE rate of the generated profile.
        profile_seed: Transient: seed of the generated profile.
        profile: Transient: a profile file instead of a generated one.
        faulty_pes: Permanent: share of faulty PEs of the sampled chip.
        chip_seed: Permanent: seed of the sampled chip.
        chip: Permanent: a chip-map file instead of a sampled one.
        repeats: Error instances (transient; a chip is deterministic).
        images: Test images: ``N``, ``A:B``, ``A:``, ``:B`` or ``None`` (all).
        metric: ``top1``, ``top5`` or ``sdc1``.
        error_seed: Seed of the error instances.
    """

    model: str = "mnist32-cnn"
    seed: int = 1
    checkpoint: str | None = None
    num_classes: int | None = None
    dataset: str | None = None
    layers: tuple[str, ...] = ("c0",)
    mapping: str = "gpu-tiles"
    n_sms: int = 20
    k_order: str = "chw"
    arithmetic: str = "fp32"
    multiplier: str = "exact"
    fault: str = "flip-to-1"
    fault_params: tuple[tuple[str, Any], ...] = ()
    fr_max: float = 5e-3
    profile_seed: int = 1
    profile: str | None = None
    faulty_pes: float | None = None
    chip_seed: int = 1
    chip: str | None = None
    repeats: int = 3
    images: str | None = None
    metric: str = "top1"
    error_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(self.layers.split("+")))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "fault_params", tuple(
            (str(k), v) for k, v in (self.fault_params.items()
                                     if isinstance(self.fault_params, dict)
                                     else self.fault_params)))
        for name in ("seed", "n_sms", "profile_seed", "chip_seed", "repeats", "error_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise HaschedError(f"{name.replace('_', '-')} must be an integer, got {v!r}")
        if self.repeats < 1:
            raise HaschedError(f"--repeats must be >= 1, got {self.repeats}")
        if not (isinstance(self.fr_max, int | float) and math.isfinite(self.fr_max)
                and 0.0 <= self.fr_max <= 1.0):
            raise HaschedError(f"--fr-max must lie in [0, 1], got {self.fr_max!r}")
        if self.faulty_pes is not None and not 0.0 <= self.faulty_pes <= 1.0:
            raise HaschedError(f"--faulty-pes must lie in [0, 1], got {self.faulty_pes!r}")
        if self.metric not in METRICS:
            raise HaschedError(f"unknown metric {self.metric!r}; known: "
                               f"{', '.join(METRICS.names())}")
        if not self.layers or not all(self.layers):
            raise HaschedError("no layer given (--layers)")

    # ----------------------------------------------------------------- construction
    def replace(self, **changes) -> Scenario:
        return dataclasses.replace(self, **changes)

    @property
    def layer_spec(self) -> str:
        return "+".join(self.layers)

    @property
    def fault_kind(self) -> str:
        """``transient`` or ``permanent``."""
        return "permanent" if isinstance(self.fault_obj(), PermanentFault) else "transient"

    def model_ref(self):
        """The :class:`~hasched.zoo.ref.ModelRef` of this scenario's model."""
        from hasched.zoo.ref import ModelRef

        return ModelRef(self.model, checkpoint=self.checkpoint, num_classes=self.num_classes,
                        dataset=self.dataset)

    def mapping_obj(self) -> Mapping:
        name, params = parse_mapping(self.mapping)
        kw = dict(params)
        if name == "gpu-tiles":
            kw.setdefault("n_sms", self.n_sms)
        kw.setdefault("k_order", self.k_order)
        return create_mapping(name, **kw)

    def arithmetic_obj(self) -> Arithmetic:
        return create_arithmetic(self.arithmetic, self.multiplier)

    def fault_obj(self) -> FaultModel | PermanentFault:
        return create_fault(self.fault, **dict(self.fault_params))

    def fault_data(self) -> tuple[FaultModel | None, FaultProfile | None, ChipMap | None]:
        """``(transient model, profile, None)`` or ``(None, None, chip)``.

        A permanent fault without ``chip``/``faulty_pes`` is an error; a chip file given
        with a transient fault model is used as the chip (its own faults apply).
        """
        mapping = self.mapping_obj()
        if self.chip:
            chip = ChipMap.load(self.chip)
            chip.check(mapping.pe_shape)
            return None, None, chip
        fault = self.fault_obj()
        if isinstance(fault, PermanentFault):
            if self.faulty_pes is None:
                raise HaschedError(f"--fault {self.fault} is permanent: give --faulty-pes "
                                   "(and --chip-seed) or --chip FILE")
            return None, None, fault.sample_chip(mapping.pe_shape, self.faulty_pes,
                                                 self.chip_seed, mapping.spec())
        if self.faulty_pes is not None:
            raise HaschedError(f"--faulty-pes samples permanent faults; --fault {self.fault} "
                               "is transient (use --fr-max), or choose stuck-at / dead")
        if self.profile:
            prof = FaultProfile.load(self.profile)
        else:
            prof = FaultProfile.generate(self.fr_max, self.profile_seed, mapping.pe_shape)
        prof.check(mapping.pe_shape)
        return fault, prof, None

    def validate(self) -> Scenario:
        """Builds every part once (names, parameters, files) so that mistakes surface
        before anything is loaded, trained or written. Returns ``self``."""
        self.model_ref()
        self.mapping_obj()
        self.arithmetic_obj()
        self.fault_data()
        for path, what in ((self.profile, "profile"), (self.chip, "chip"),
                           (self.checkpoint, "checkpoint")):
            if path and not Path(path).is_file():
                raise HaschedError(f"{what} file not found: {path}")
        return self

    # ------------------------------------------------------------------- recording
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["fault_params"] = dict(self.fault_params)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scenario:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise HaschedError(f"unknown scenario field(s): {', '.join(extra)}")
        d = dict(d)
        if "layers" in d:
            d["layers"] = tuple(d["layers"])
        if isinstance(d.get("fault_params"), dict):
            d["fault_params"] = tuple(d["fault_params"].items())
        return cls(**d)

    def describe(self) -> str:
        """One line for logs and table rows."""
        if self.chip or self.faulty_pes is not None:
            what = (f"chip {self.chip}" if self.chip else
                    f"{self.fault} on {self.faulty_pes:g} of PEs (chip seed {self.chip_seed})")
        else:
            what = f"{self.fault} FR_max {self.fr_max:g}" + (
                f" (profile {self.profile})" if self.profile else
                f" (profile seed {self.profile_seed})")
        acc = self.arithmetic if self.multiplier == "exact" else \
            f"{self.arithmetic}/{self.multiplier}"
        return (f"{self.model} seed {self.seed} | {self.layer_spec} | {self.mapping_obj().spec()}"
                f" {acc} | {what}")
