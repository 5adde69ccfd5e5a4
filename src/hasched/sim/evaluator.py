"""Accuracy of a model on the faulty accelerator: the one evaluation engine.

:class:`FaultyEvaluator` is what ``hasched evaluate``, the sensitivity campaigns and the
schedule search all call. It loads nothing by itself (see :mod:`hasched.study.build` for that) and
does the expensive parts once:

* the clean *prefix* of an ``nn.Sequential`` model (the modules before the first faulty
  layer) runs once, and its output is cached;
* the clean predictions are cached, so the clean accuracy costs nothing later;
* a whole population of schedules x repeats is evaluated in one pass over the images,
  in chunks sized to a memory budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.sim.faults import ErrorModel
from hasched.sim.gemm import choose_mode
from hasched.sim.hardware import AcceleratorConfig, FaultProfile
from hasched.sim.incremental import IncrementalEngine
from hasched.sim.layers import FaultState, inject_faults

__all__ = ["EvalConfig", "FaultyEvaluator", "summarize"]


@dataclass(frozen=True)
class EvalConfig:
    """How the engine runs (not *what* it simulates).

    Attributes:
        mode: Injection mode, ``"auto"``, ``"dense"`` or ``"sparse"``.
        memory_mb: Working-set budget of one chunk of images.
        prefix_batch: Images per batch when the clean prefix and predictions are computed.
        incremental: Use delta propagation (:mod:`hasched.sim.incremental`) when the first
            faulty layer is on the sparse path and the model is an ``nn.Sequential``.
        max_hits: Cap on sampled hits per chunk on the incremental path (memory).
    """

    mode: str = "auto"
    memory_mb: int = 512
    prefix_batch: int = 1024
    incremental: bool = True
    max_hits: int = 4_000_000


def _first_faulty_child(model: nn.Sequential, layers: list[str]) -> int:
    names = [n for n, _ in model.named_children()]
    heads = {layer.split(".")[0] for layer in layers}
    return min(names.index(h) for h in heads)


class FaultyEvaluator:
    """Top-1 accuracy of ``model`` with ``layers`` on a faulty accelerator.

    Args:
        model: Any classifier ``nn.Module`` (evaluated in eval mode, on ``images.device``).
        images: ``(N, ...)`` inputs; their device is the device of every computation.
        labels: ``(N,)`` class indices.
        layers: Names of the layers that run on the faulty accelerator.
        profile: Per-PE fault rates.
        error_model: What a hit does to a partial product.
        accel: Accelerator geometry.
        config: Engine settings.
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        layers: list[str],
        profile: FaultProfile,
        error_model: ErrorModel,
        accel: AcceleratorConfig | None = None,
        config: EvalConfig | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise HaschedError(f"need as many labels as images (got {images.shape[0]} images, "
                               f"{labels.shape[0]} labels)")
        self.config = config or EvalConfig()
        self.device = images.device
        self.layers = list(layers)
        model = model.to(self.device).eval()
        self.faulty, self.state = inject_faults(
            model, self.layers, profile, error_model, accel, mode=self.config.mode
        )
        self.faulty.eval()
        self.labels = labels.to(self.device)
        with torch.no_grad():
            if isinstance(model, nn.Sequential):
                first = _first_faulty_child(model, self.layers)
                prefix = model[:first]
                self.suffix: nn.Module = self.faulty[first:]
                self.inputs = torch.cat([prefix(b) for b in self._batches(images)])
                self._expand_input = False
            else:
                self.suffix, self.inputs, self._expand_input = self.faulty, images, True
            self.state.enabled = False
            self.clean_pred = torch.cat(
                [self.suffix(b).argmax(-1) for b in self._batches(self.inputs)]
            )
            self.state.enabled = True
            self._per_sample_bytes = self._probe_bytes()
        self.clean_ok = self.clean_pred == self.labels
        self._engine: IncrementalEngine | None = None
        self.last_path = ""

    def _incremental(self) -> IncrementalEngine | None:
        """The delta engine, built on first use (it caches clean activations)."""
        if self._expand_input or not self.config.incremental:
            return None
        first = next(iter(self.suffix))
        if first not in self.state.layers.values():
            return None
        if choose_mode(first.rates, self.config.mode) != "sparse":
            return None
        if self._engine is None:
            self._engine = IncrementalEngine(self.suffix, self.inputs, self.state,
                                             self.config.prefix_batch)
        return self._engine

    @property
    def n_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float((self.clean_pred == self.labels).float().mean())

    @property
    def rows(self) -> dict[str, int]:
        """Chromosome length (weight rows) of every faulty layer."""
        return {n: layer.tiling.rows for n, layer in self.state.layers.items()}

    def slot_exposure(self) -> dict[str, torch.Tensor]:
        """Summed fault rate each slot's row sees across its K-blocks, per faulty layer.

        What a model-aware searcher plans with: under a schedule, the row placed on slot
        ``s`` has every one of its partial products hit at that slot's rates, so its
        expected number of hits per output element is ``exposure[s]``.

        Returns:
            Layer name -> float64 CPU ``Tensor[rows]``.
        """
        return {n: layer.slot_rate.detach().double().sum(1).cpu()
                for n, layer in self.state.layers.items()}

    def _batches(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        step = self.config.prefix_batch
        for i in range(0, x.shape[0], step):
            yield x[i:i + step]

    def _probe_bytes(self) -> int:
        """Bytes one image needs per population member in the faulty suffix (estimate)."""
        sizes: list[int] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: sizes.append(o[0].numel()))
                 for m in self.suffix.modules() if not list(m.children())]
        self.state.enabled = False
        try:
            self.suffix(self.inputs[:1])
        finally:
            self.state.enabled = True
            for h in hooks:
                h.remove()
        act = max(sizes + [int(self.inputs[0].numel())])
        pp = max(layer.tiling.n_k for layer in self.state.layers.values()) * act
        # Activations in flight (x3) plus, on the dense path, the partial products with
        # their random numbers and mask (x3).
        return 4 * (3 * act + 3 * pp)

    def _chunk(self, population: int) -> int:
        budget = self.config.memory_mb * 2**20
        return max(1, min(self.n_images, budget // (population * self._per_sample_bytes)))

    @torch.no_grad()
    def correct(
        self,
        perms: dict[str, torch.Tensor] | None = None,
        repeats: int = 1,
        generator: torch.Generator | None = None,
        *,
        rates: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Number of correctly classified images for every schedule and repeat.

        Args:
            perms: Layer name -> ``LongTensor[P, rows]`` schedules (``perm[slot] = row``);
                omitted layers keep the identity order.
            repeats: Independent error instances per schedule.
            generator: Source of every error draw.
            rates: Instead of ``perms``: layer name -> ``Tensor[P, rows, n_k]`` rate maps
                per weight row (:meth:`FaultState.configure_rates`), e.g. probes that put
                one row at a chosen rate and keep the others clean.

        Returns:
            ``LongTensor[P, repeats]``.
        """
        if repeats < 1:
            raise HaschedError(f"repeats must be >= 1, got {repeats}")
        if perms and rates is not None:
            raise HaschedError("give schedules or rate maps, not both")
        if perms:
            perms = {k: v.to(self.device) for k, v in perms.items()}
        st: FaultState = self.state
        st.generator = generator
        pop = st.configure(perms, repeats) if rates is None else st.configure_rates(rates, repeats)
        step = self._chunk(pop)
        correct = torch.zeros(pop, dtype=torch.long, device=self.device)
        engine = self._incremental()
        self.last_path = "incremental" if engine is not None else "dense-suffix"
        if engine is not None:
            first = engine.first
            cols = engine.acts[1][0].numel() // first.tiling.rows
            hits_per_image = float(first.rates.sum()) * cols
            # Only the hits and the affected rows are materialised here, so the chunk is
            # bounded by the hit budget, not by the dense path's activation estimate.
            step = max(1, int(self.config.max_hits / max(hits_per_image, 1.0)))
            budget = self.config.memory_mb * 2**20
            step = min(step, max(1, budget // (pop * 12 * engine.dense_width)))
            if engine.later_faulty:
                step = min(step, self._chunk(pop))
            for i in range(0, self.n_images, step):
                nb = min(step, self.n_images - i)
                st.expanded = False
                correct += engine.correct(i, nb, self.labels, self.clean_ok)
            return correct.reshape(-1, repeats)
        for i in range(0, self.n_images, step):
            x = self.inputs[i:i + step]
            y = self.labels[i:i + step]
            st.expanded = self._expand_input
            if self._expand_input:
                x = x.repeat(pop, *([1] * (x.dim() - 1)))
            logits = self.suffix(x)  # (pop*b, classes)
            pred = logits.argmax(-1).reshape(pop, -1)
            correct += (pred == y).sum(1)
        return correct.reshape(-1, repeats)

    def accuracy(
        self,
        perms: dict[str, torch.Tensor] | None = None,
        repeats: int = 1,
        generator: torch.Generator | None = None,
        *,
        rates: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Top-1 accuracy in [0, 1]: ``Tensor[P, repeats]`` (see :meth:`correct`)."""
        return self.correct(perms, repeats, generator, rates=rates).double() / self.n_images


def summarize(values: list[float] | torch.Tensor) -> dict:
    """Mean, sample std and a 95% t-interval of repeated accuracies."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = int(v.numel())
    mean = float(v.mean())
    std = float(v.std(unbiased=True)) if n > 1 else 0.0
    half = _t975(n - 1) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def _t975(df: int) -> float:
    """Two-sided 95% Student-t quantile (exact table to 30 df, normal beyond)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
             2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
             2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
    return table[df - 1] if 1 <= df <= 30 else 1.960
