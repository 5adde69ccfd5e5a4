"""What a resilience map and a per-chip retraining run share: the model, its layers on a
systolic array, the images, and how FAP+T fine-tunes.

Three disjoint image sets, each with one job:

- *fine-tuning* images: training images (default the first 10 000) that FAP+T trains on;
- *validation* images: test images ``8000:10000`` by default. The resilience map is measured
  on them and the Reduce policy verifies a retrained chip on them;
- *test* images: ``:2000`` by default, on which every policy's yield is reported, so no
  decision of any policy ever sees them.

Example:
    >>> s = FapStudy(model="mnist32-cnn", mapping="systolic:16x16")
    >>> s.validate().identity()["mapping"]
    'systolic:16x16'
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hasched.errors import HaschedError
from hasched.sim.profile import ChipMap
from hasched.study.fapt import FineTune, top1
from hasched.study.scenario import Scenario

__all__ = ["FapStudy", "FapContext", "load_context", "load_chip_dir", "natural_key"]


@dataclass(frozen=True)
class FapStudy:
    """The settings both commands share (what makes a resilience map apply to a chip).

    Attributes:
        model: Model reference (``mnist32-cnn``, ``torchvision:...``, ``module:...``).
        seed: Model seed. checkpoint/num_classes/dataset: As in :class:`Scenario`.
        layers: Accelerated layers (all weight layers by default).
        mapping: A mapping where each weight sits on one PE (``systolic:RxC``).
        k_order: Reduction order of the mapping.
        fine_tune: How FAP+T trains.
        val_images: Validation (decision) images. images: Test (yield) images.
    """

    model: str = "mnist32-cnn"
    seed: int = 1
    checkpoint: str | None = None
    num_classes: int | None = None
    dataset: str | None = None
    layers: tuple[str, ...] | str = "all"
    mapping: str = "systolic:16x16"
    k_order: str = "chw"
    fine_tune: FineTune = field(default_factory=FineTune)
    val_images: str = "8000:10000"
    images: str = ":2000"

    def scenario(self) -> Scenario:
        layers = ("?",) if isinstance(self.layers, str) else tuple(self.layers)
        return Scenario(model=self.model, seed=self.seed, checkpoint=self.checkpoint,
                        num_classes=self.num_classes, dataset=self.dataset, layers=layers,
                        mapping=self.mapping, k_order=self.k_order)

    def validate(self) -> FapStudy:
        scn = self.scenario()
        # an unknown model must be named as such, before an --out folder or a map is read
        scn.model_ref()
        mp = scn.mapping_obj()
        if mp.name != "systolic":
            raise HaschedError(f"FAP needs a weight-stationary array (--mapping systolic:RxC),"
                               f" not {self.mapping}: there a weight sits on one PE")
        self.fine_tune.validate()
        from hasched.study.build import check_image_spec

        check_image_spec(self.val_images, "--val-images")
        check_image_spec(self.images, "--images")
        check_image_spec(self.fine_tune.train_images, "--train-images")
        return self

    def identity(self) -> dict:
        """JSON of every setting that changes a number (the device does not)."""
        d = dataclasses.asdict(self)
        d["layers"] = self.layers if isinstance(self.layers, str) else "+".join(self.layers)
        d["mapping"] = self.scenario().mapping_obj().spec()
        return d

    @classmethod
    def from_identity(cls, d: dict) -> FapStudy:
        d = dict(d)
        d["fine_tune"] = FineTune(**d["fine_tune"])
        if d["layers"] != "all":
            d["layers"] = tuple(d["layers"].split("+"))
        return cls(**d)


@dataclass
class FapContext:
    """A loaded study: model, layers, mapping and the three image sets on one device."""

    study: FapStudy
    model: nn.Module
    meta: dict
    recipe: object
    layers: list[str]
    mapping: object
    spatial: dict
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    clean_val: float = 0.0
    clean_test: float = 0.0
    device: torch.device = torch.device("cpu")

    def accuracies(self, model: nn.Module) -> tuple[float, float]:
        """``(validation, test)`` top-1 of ``model``."""
        return top1(model, *self.val), top1(model, *self.test)


def load_context(study: FapStudy, *, device: str | torch.device | None = "cpu",
                 models_dir: str | Path | None = None, data_dir: str | Path | None = None,
                 train: bool = False, log=None) -> FapContext:
    """Loads the model and the images of a study (a missing checkpoint is an error unless
    ``train``)."""
    from hasched.sim.arithmetic import create_arithmetic
    from hasched.sim.layers import weight_layer_names
    from hasched.sim.probe import activation_probe
    from hasched.study.build import resolve_device
    from hasched.study.scenario import parse_layer_groups
    from hasched.zoo.load import eval_data, load_model
    from hasched.zoo.train import recipe_for

    study.validate()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    scn = study.scenario()
    ref = scn.model_ref()
    model, meta = load_model(ref, study.seed, models_dir=models_dir, data_dir=data_dir,
                             train=train, log=log)
    known = weight_layer_names(model)
    layers = list(parse_layer_groups(study.layers if isinstance(study.layers, str)
                                     else [study.layers], known)[0])
    model = model.to(dev).eval()
    mapping = scn.mapping_obj()
    sets = [eval_data(ref, spec, data_dir, dev, model=model, split=split)[:2]
            for spec, split in ((study.fine_tune.train_images, "train"),
                                (study.val_images, "test"), (study.images, "test"))]
    probe = activation_probe(model, layers, sets[1][0], None, create_arithmetic("fp32"),
                             mapping)
    ctx = FapContext(study, model, meta, recipe_for(ref), layers, mapping, probe.spatial,
                     *sets, device=dev)
    ctx.clean_val, ctx.clean_test = ctx.accuracies(model)
    return ctx


def natural_key(name: str) -> list:
    """``chip_f0.1_s10`` after ``chip_f0.1_s9``: digit runs compare as numbers."""
    return [(0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
            for t in re.split(r"(\d+(?:\.\d+)?)", name) if t]


def load_chip_dir(folder: str | Path, pe_shape: tuple[int, int] | None = None,
                  mapping_spec: str | None = None) -> list[tuple[str, ChipMap]]:
    """Every chip map (``.json``/``.npy``) in a folder, checked, in natural name order.

    Raises:
        HaschedError: not a folder, no chip files, a file that is not a chip map (one line
            naming it), or a chip drawn for another array.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HaschedError(f"--chips {folder} is not a folder of chip maps (hasched chips)")
    files = sorted((p for p in folder.iterdir() if p.suffix in (".json", ".npy")
                    and p.is_file()), key=lambda p: natural_key(p.name))
    if not files:
        raise HaschedError(f"--chips {folder} holds no chip maps (.json or .npy files); "
                           "sample some with `hasched chips`")
    chips = []
    for path in files:
        chip = ChipMap.load(path)
        if pe_shape is not None and chip.shape != tuple(pe_shape):
            raise HaschedError(f"chip map {path} has {chip.shape[0]}x{chip.shape[1]} PEs, "
                               f"the array ({mapping_spec}) has "
                               f"{pe_shape[0]}x{pe_shape[1]}")
        chips.append((path.stem, chip))
    names = [n for n, _ in chips]
    if len(set(names)) != len(names):
        raise HaschedError(f"--chips {folder}: two chip files share a name "
                           "(x.json and x.npy); keep one")
    return chips
