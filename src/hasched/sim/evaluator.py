"""A model on the faulty accelerator: the one evaluation engine.

:class:`FaultyEvaluator` is what ``hasched evaluate``, the sensitivity campaigns and the
schedule search all call. It loads nothing by itself (see :mod:`hasched.study.build`) and
does the expensive parts once:

* the clean *prefix* of an ``nn.Sequential`` model (the modules before the first child that
  holds a faulty layer) runs once and its output is cached;
* the fault-free predictions and scores are cached;
* a whole population of schedules x repeats is evaluated in one pass over the images, in
  chunks sized to a memory budget;
* at sparse rates, when the first faulty layer is a direct child of the Sequential, only
  the changes are propagated (:mod:`hasched.sim.incremental`); otherwise the model runs
  densely on the folded population batch (residual blocks and any ``nn.Module`` included:
  the input is expanded to the population when the first faulty layer sits inside a block).

BatchNorm layers run in eval mode with their running statistics (they are not folded into
the convolutions: a fault hits the convolution's partial products, before the affine
normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from hasched.errors import HaschedError
from hasched.sim.arithmetic import Arithmetic, Fp32
from hasched.sim.costs import LayerCost, path_costs
from hasched.sim.faults import ChipFault, FaultModel
from hasched.sim.gemm import choose_mode
from hasched.sim.graph import GraphEngine, GraphUnsupported
from hasched.sim.incremental import IncrementalEngine
from hasched.sim.layers import FaultState, FaultyLayer, inject_faults
from hasched.sim.mapping import GpuTiles, Mapping
from hasched.sim.metrics import Metric, resolve_metric
from hasched.sim.probe import activation_probe
from hasched.sim.profile import ChipMap, FaultProfile

__all__ = ["EvalConfig", "FaultyEvaluator", "summarize"]


@dataclass(frozen=True)
class EvalConfig:
    """How the engine runs (not *what* it simulates).

    Attributes:
        mode: Injection mode, ``"auto"``, ``"dense"`` or ``"sparse"``.
        memory_mb: Working-set budget of one chunk of images.
        prefix_batch: Images per batch when the clean prefix and predictions are computed.
        incremental: Use delta propagation when the first faulty layer is sparse and a
            direct child of an ``nn.Sequential``.
        max_hits: Cap on sampled hits per chunk on the incremental path (memory).
        graph: Any other model (residual nets, nested faulty layers, custom forwards):
            trace it with torch.fx and run the clean part once and only the faulty part
            per member (:mod:`hasched.sim.graph`); ``False`` runs the whole suffix with
            the population folded into the batch.
        calibration_images: Images used for int8 activation scales when none are given.
    """

    mode: str = "auto"
    memory_mb: int = 512
    prefix_batch: int = 1024
    incremental: bool = True
    max_hits: int = 4_000_000
    graph: bool = True
    calibration_images: int = 512


def _fault_source(fault, profile, chip, mapping: Mapping) -> tuple[FaultModel, torch.Tensor]:
    """The fault model and per-PE hit probabilities from (fault, profile) or a chip."""
    if chip is not None:
        if profile is not None:
            raise HaschedError("give either a transient profile or a chip map, not both")
        chip.check(mapping.pe_shape)
        model = ChipFault(chip)
        return model, model.faulty_pes().double()
    if fault is None or profile is None:
        raise HaschedError("a transient fault model needs a fault profile (or pass a chip)")
    if getattr(fault, "permanent", False):
        raise HaschedError(f"{fault.name} is a permanent fault: sample a chip map for it "
                           "(ChipMap.sample / PermanentFault.sample_chip) and pass chip=")
    profile.check(mapping.pe_shape)
    return fault, torch.from_numpy(profile.flat_rates().copy())


class FaultyEvaluator:
    """A metric of ``model`` with ``layers`` on a simulated, faulty accelerator.

    Args:
        model: Any classifier ``nn.Module`` (evaluated in eval mode, on ``images.device``).
        images: ``(N, ...)`` inputs; their device is the device of every computation.
        labels: ``(N,)`` class indices.
        layers: Names of the layers that run on the accelerator.
        fault: Transient fault model (with ``profile``).
        profile: Per-PE transient rates over ``mapping.pe_shape``.
        chip: Permanent faults of one chip (instead of ``fault``/``profile``).
        mapping: Where partial products run (default: gpu-tiles, 20 SMs x 32 PEs).
        arithmetic: Datapath (default fp32).
        calibration: Images for int8 activation scales (default: the first
            ``config.calibration_images`` of ``images``; pass training images to avoid
            calibrating on the test set).
        metric: ``top1``, ``top5``, ``sdc1`` or a callable (see :mod:`hasched.sim.metrics`).
        config: Engine settings.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 layers: list[str], fault: FaultModel | None = None,
                 profile: FaultProfile | None = None, *, chip: ChipMap | None = None,
                 mapping: Mapping | None = None, arithmetic: Arithmetic | None = None,
                 calibration: torch.Tensor | None = None, metric: str | Metric = "top1",
                 config: EvalConfig | None = None) -> None:
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise HaschedError(f"need as many labels as images (got {images.shape[0]} images, "
                               f"{labels.shape[0]} labels)")
        self.config = config or EvalConfig()
        self.mapping = mapping or GpuTiles()
        self.arithmetic = arithmetic or Fp32()
        self.metric_name, self.metric = resolve_metric(metric)
        self.device = images.device
        if self.device.type == "cuda":
            # TF32 is one of the simulated errors: the simulator itself computes in FP32.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.layers = list(layers)
        self.fault_model, rates = _fault_source(fault, profile, chip, self.mapping)
        model = model.to(self.device).eval()
        probe = activation_probe(model, self.layers, images, calibration, self.arithmetic,
                                 self.mapping, self.config.calibration_images)
        self.faulty, self.state = inject_faults(
            model, self.layers, self.mapping, rates, self.fault_model, self.arithmetic,
            in_absmax=probe.absmax, spatial=probe.spatial, mode=self.config.mode)
        self.faulty.eval()
        self.labels = labels.to(self.device)
        with torch.no_grad():
            self._split(model, images)
            self._clean_pass()
            self.state.check_called(lambda: self._run(self.inputs[:1], clean=True))
        self._engine: IncrementalEngine | None = None
        self._graph_engine: GraphEngine | None = None
        self.last_path = ""
        self.fallback_reason = ""  # why the graph path is not taken (empty when it is)

    # ------------------------------------------------------------------------ set-up
    def _split(self, model: nn.Module, images: torch.Tensor) -> None:
        """Caches the clean prefix of a Sequential; decides how the batch is folded."""
        self._direct = False
        if isinstance(model, nn.Sequential):
            names = [n for n, _ in model.named_children()]
            heads = {layer.split(".")[0] for layer in self.layers}
            first = min(names.index(h) for h in heads)
            self.suffix: nn.Module = self.faulty[first:]
            self.inputs = torch.cat([model[:first](b) for b in self._batches(images)])
            self._direct = isinstance(self.suffix[0], FaultyLayer)
        else:
            self.suffix, self.inputs = self.faulty, images
        # A faulty layer nested in a block (residual branches!) needs the whole population
        # in the block's input; a direct child may expand the batch itself.
        self._expand_input = not self._direct

    def _clean_pass(self) -> None:
        """Fault-free predictions of the accelerator (and of the fp32 reference)."""
        st = self.state
        st.faults_on = False
        logits = torch.cat([self.suffix(b) for b in self._batches(self.inputs)])
        st.faults_on = True
        self.clean_pred = logits.argmax(-1)
        self.clean_score = self.metric(logits, self.labels, self.clean_pred)
        if isinstance(self.arithmetic, Fp32):
            self.reference_score = float(self.clean_score.mean())
        else:
            st.enabled = False
            ref = torch.cat([self.suffix(b) for b in self._batches(self.inputs)])
            st.enabled = True
            self.reference_score = float(self.metric(ref, self.labels, ref.argmax(-1)).mean())
        self._per_sample_bytes = self._probe_bytes()

    def _run(self, x: torch.Tensor, clean: bool = False) -> torch.Tensor:
        st = self.state
        st.faults_on = not clean
        st.expanded = self._expand_input and not clean
        try:
            if st.expanded:
                x = x.repeat(st.population, *([1] * (x.dim() - 1)))
            return self.suffix(x)
        finally:
            st.faults_on = True

    def _incremental(self) -> IncrementalEngine | None:
        """The delta engine, built on first use (it caches clean activations)."""
        if not (self._direct and self.config.incremental):
            return None
        first = self.suffix[0]
        fa = first.faults
        if fa.model.permanent:
            if fa.expected_hits(1, 1) > 1e5:
                return None
        elif self.config.mode == "dense":
            return None
        elif self.config.mode == "auto" and fa.site == "output":
            cost = self.path_costs()
            if cost["incremental"] > min(cost["dense"], cost["sparse"]):
                return None
        if self._engine is None:
            self._engine = IncrementalEngine(self.suffix, self.inputs, self.state,
                                             self.config.prefix_batch)
        return self._engine

    def path_costs(self) -> dict[str, float]:
        """Estimated ns of the dense, sparse and incremental paths for the configured
        population, from the first faulty layer's hits, shape and downstream MACs."""
        name = next(iter(self.state.layers)) if not self._direct else self.suffix[0].layer_name
        layer = self.state.layers[name]
        hits = layer.faults.expected_hits(1, self._cols[name])
        return path_costs(self._layer_cost[name], hits, layer.faults.population, self.n_images)

    def _graph(self) -> GraphEngine | None:
        """The fx split engine for models the Sequential paths cannot split (built once)."""
        if not (self._expand_input and self.config.graph) or self.fallback_reason:
            return None
        if self._graph_engine is None:
            try:
                self._graph_engine = GraphEngine(
                    self.suffix, self.state, self.inputs[:4],
                    cache_bytes=self.config.memory_mb * 2**20)
            except GraphUnsupported as err:
                self.fallback_reason = str(err)
                return None
        return self._graph_engine

    # -------------------------------------------------------------------- properties
    @property
    def n_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def clean_accuracy(self) -> float:
        """Fault-free metric of the accelerator (for int8: of the quantised model)."""
        return float(self.clean_score.mean())

    @property
    def rows(self) -> dict[str, int]:
        """Chromosome length (weight rows) of every faulty layer."""
        return {n: layer.rows for n, layer in self.state.layers.items()}

    def slot_exposure(self) -> dict[str, torch.Tensor]:
        """Per layer, the summed hit probability each slot's row sees: ``Tensor[rows]``."""
        return {n: layer.slot_exposure() for n, layer in self.state.layers.items()}

    def layer_modes(self) -> dict[str, str]:
        """The GEMM path (dense, sparse, permanent) each faulty layer takes."""
        return {n: choose_mode(layer.faults, self.config.mode)
                for n, layer in self.state.layers.items() if layer.faults is not None}

    def _batches(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        step = self.config.prefix_batch
        for i in range(0, x.shape[0], step):
            yield x[i:i + step]

    def _probe_bytes(self) -> int:
        """Bytes one image needs per population member in the faulty suffix (estimate)."""
        sizes: list[int] = []
        macs: list[tuple[nn.Module, int]] = []  # (leaf, MACs per image) in execution order

        def record(m: nn.Module, _i, o) -> None:
            sizes.append(o[0].numel())
            macs.append((m, _macs(m, o[0])))
        hooks = [m.register_forward_hook(record)
                 for m in self.suffix.modules() if not list(m.children())]
        self._cols: dict[str, int] = {}  # output columns per image of each faulty layer

        def cols(name: str, layer: FaultyLayer):
            return lambda _m, _i, o: self._cols.__setitem__(name, o[0].numel() // layer.rows)
        hooks += [layer.register_forward_hook(cols(n, layer))
                  for n, layer in self.state.layers.items()]
        self.state.enabled = False
        try:
            self.suffix(self.inputs[:1])
        finally:
            self.state.enabled = True
            for h in hooks:
                h.remove()
        # Layers that did not run are left out here; check_called names them right after.
        self._layer_cost = {n: _layer_cost(layer, self._cols[n], macs)
                            for n, layer in self.state.layers.items() if n in self._cols}
        act = max(sizes + [int(self.inputs[0].numel())])
        # Activations in flight (x3) on every path; on the dense path also the partial
        # products with their uniforms and mask (x3; the corrupted copy and the float64
        # deltas add about as much again, which the default budget leaves room for).
        self._act_bytes = 4 * 3 * act
        pp = max(layer.plan.n_chains for layer in self.state.layers.values()) * act
        return self._act_bytes + 4 * 3 * pp

    def _chunk(self, population: int, sparse_aware: bool = False) -> int:
        """Images per chunk so that ``population`` members fit the memory budget.

        ``sparse_aware`` sizes chunks of sparse layers by their hits, not by their partial
        products (the graph path; the older paths keep their chunks, hence their draws).
        """
        budget = self.config.memory_mb * 2**20
        per_sample = self._per_sample_bytes
        if sparse_aware and all(m != "dense" for m in self.layer_modes().values()):
            # Sparse layers never materialise partial products: activations plus the
            # sampled hits (about 64 bytes each with their indices and deltas).
            hits = sum(layer.faults.expected_hits(1, 1) * self._cols[n]
                       for n, layer in self.state.layers.items() if layer.faults is not None)
            per_sample = self._act_bytes + int(64 * hits / max(population, 1))
        return max(1, min(self.n_images, budget // (population * per_sample)))

    # -------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def score_sum(self, perms: dict[str, torch.Tensor] | None = None, repeats: int = 1,
                  generator: torch.Generator | None = None, *,
                  rates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Summed per-image metric for every schedule and repeat: ``float64 Tensor[P, repeats]``.

        Args:
            perms: Layer name -> ``LongTensor[P, rows]`` schedules (``perm[slot] = row``);
                omitted layers keep the identity order.
            repeats: Independent error instances per schedule.
            generator: Source of every error draw.
            rates: Instead of ``perms``: layer name -> ``Tensor[P, *slot_rate.shape]`` rate
                maps per weight row (:meth:`FaultState.configure_rates`), e.g. probes that
                put one row at a chosen rate and keep the others clean.
        """
        if repeats < 1:
            raise HaschedError(f"repeats must be >= 1, got {repeats}")
        if perms and rates is not None:
            raise HaschedError("give schedules or rate maps, not both")
        if perms:
            perms = {k: v.to(self.device) for k, v in perms.items()}
        st: FaultState = self.state
        st.generator = generator
        pop = st.configure(perms, repeats) if rates is None else st.configure_rates(rates,
                                                                                    repeats)
        total = torch.zeros(pop, dtype=torch.float64, device=self.device)
        engine = self._incremental()
        graph = self._graph() if engine is None else None
        self.last_path = ("incremental" if engine is not None else "graph" if graph else
                          "dense-expanded" if self._expand_input else "dense-suffix")
        if graph is not None:
            return self._graph_scores(graph, pop, total).reshape(-1, repeats)
        if engine is not None:
            for i, nb in self._incremental_chunks(engine, pop):
                st.expanded = False
                total += engine.score(i, nb, self.metric, self.labels, self.clean_pred,
                                      self.clean_score)
            return total.reshape(-1, repeats)
        step = self._chunk(pop)
        for i in range(0, self.n_images, step):
            x = self.inputs[i:i + step]
            logits = self._run(x)  # (pop*b, classes)
            sl = slice(i, i + x.shape[0])
            labels, clean = self.labels[sl].repeat(pop), self.clean_pred[sl].repeat(pop)
            total += self.metric(logits, labels, clean).reshape(pop, -1).sum(1)
        return total.reshape(-1, repeats)

    def _graph_scores(self, graph: GraphEngine, pop: int, total: torch.Tensor
                      ) -> torch.Tensor:
        step = self._chunk(pop, sparse_aware=True)
        for i in range(0, self.n_images, step):
            nb = min(step, self.n_images - i)
            front = graph.frontier_for(self.inputs, i, nb, self.config.prefix_batch)
            sl = slice(i, i + nb)
            total += graph.score(front, nb, self.metric, self.labels[sl], self.clean_pred[sl],
                                 self.clean_score[sl])
        return total

    def _incremental_chunks(self, engine: IncrementalEngine, pop: int):
        first = engine.first
        cols = engine.acts[1][0].numel() // first.rows
        hits_per_image = first.faults.expected_hits(1, cols)
        # Only the hits and the affected rows are materialised here, so the chunk is
        # bounded by the hit budget, not by the dense path's activation estimate.
        budget = self.config.memory_mb * 2**20
        # Hits in flight cost their indices, deltas and sort temporaries plus the gathered
        # chain operands (measured: ~1 KB per hit of a 32-element chain).
        cap = min(self.config.max_hits, budget // (128 + 28 * first.faults.plan.chain))
        step = max(1, int(cap / max(hits_per_image, 1.0)))
        step = min(step, max(1, budget // (pop * 12 * engine.dense_width)))
        if engine.later_faulty:
            step = min(step, self._chunk(pop))
        for i in range(0, self.n_images, step):
            yield i, min(step, self.n_images - i)

    def correct(self, perms: dict[str, torch.Tensor] | None = None, repeats: int = 1,
                generator: torch.Generator | None = None, *,
                rates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Correctly classified images (top-1 metric): ``LongTensor[P, repeats]``."""
        return torch.round(self.score_sum(perms, repeats, generator, rates=rates)).long()

    def accuracy(self, perms: dict[str, torch.Tensor] | None = None, repeats: int = 1,
                 generator: torch.Generator | None = None, *,
                 rates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean metric in [0, 1] (top-1 accuracy by default): ``Tensor[P, repeats]``."""
        return self.score_sum(perms, repeats, generator, rates=rates) / self.n_images


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates per image of a leaf module (0 for anything but Linear/Conv)."""
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return 0


def _layer_cost(layer: FaultyLayer, cols: int, macs: list[tuple[nn.Module, int]]) -> LayerCost:
    """The cost-model view of a faulty layer from the leaves' MACs in execution order."""
    at = next(i for i, (m, _) in enumerate(macs) if m is layer.orig)
    plan = layer.plan
    cached = (layer.site == "output" and plan.n_chains == 1 and not layer.arith.is_int
              and not layer.model.permanent)
    return LayerCost(pp=plan.n_chains * layer.rows * cols, chain=plan.chain, macs=macs[at][1],
                     downstream_macs=sum(n for _, n in macs[at + 1:]), cached_chain=cached)


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
