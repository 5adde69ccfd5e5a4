"""The mechanics of one training run: the optimisation loop, checks, BatchNorm statistics.

:mod:`hasched.zoo.train` decides what to train (reference, recipe, data, seeds) and stores
the result; the functions here only run models on tensors and draw no random numbers except
through the generator they are given.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from hasched.errors import HaschedError
from hasched.zoo.data import Dataset, InputAdapter
from hasched.zoo.models import TrainRecipe
from hasched.zoo.ref import ModelRef

__all__ = ["BN_RECALIBRATION_IMAGES", "check_outputs", "evaluate_accuracy", "fit",
           "make_optimizer", "min_batch_size", "recalibrate_batchnorm"]

# Training images that re-estimate BatchNorm statistics after training.
BN_RECALIBRATION_IMAGES = 2048


def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 1000,
    device: str = "cpu",
    adapter: InputAdapter | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (model is put in eval mode).

    ``adapter`` turns the dataset's images into the model's input (default: as they are).
    """
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            x = dataset.images[start : start + batch_size].to(device)
            if adapter is not None:
                x = adapter(x)
            y = dataset.labels[start : start + batch_size].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / max(len(dataset), 1)


def recalibrate_batchnorm(
    model: nn.Module,
    images: torch.Tensor,
    adapter: InputAdapter,
    batch_size: int = 128,
    n_images: int = BN_RECALIBRATION_IMAGES,
) -> int:
    """Recompute BatchNorm running statistics as an equal-weight average over training images.

    After a short training run the running statistics are still close to their initial
    values when the momentum is small (torchvision's MobileNetV3 uses 0.01: after 79 steps
    45% of the running mean is still the initial zero), and the model is useless in eval
    mode. So the statistics are re-estimated from the first ``n_images`` training images in
    order ("precise BN"): only the BatchNorm layers run in training mode, without gradients,
    with ``momentum=None`` (a cumulative average); weights are untouched and no random
    number is drawn.

    Returns:
        The number of images used (0 when the model has no BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = min(n_images, int(images.shape[0]))
    used = 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = images[start : min(start + batch_size, n)]
            if batch.shape[0] < 2:  # one image at 1x1 has no batch statistics
                break
            model(adapter(batch))
            used += int(batch.shape[0])
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return used


def check_outputs(model: nn.Module, ref: ModelRef, x: torch.Tensor, n_classes: int) -> None:
    """One eval-mode forward on two images: the model must take them and score every class.

    Eval mode so that BatchNorm statistics and dropout are untouched by the probe.
    """
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise HaschedError(f"{ref.name} cannot take {ref.dataset} images shaped"
                           f" {tuple(x.shape[1:])}: {first}") from None
    if out.ndim != 2 or out.shape[1] < n_classes:
        raise HaschedError(f"{ref.name} gives outputs shaped {tuple(out.shape[1:])} per image;"
                           f" {ref.dataset} needs {n_classes} class scores (set num_classes)")


def make_optimizer(model: nn.Module, recipe: TrainRecipe, lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``model``'s parameters (``lr`` overrides the recipe's)."""
    lr = recipe.lr if lr is None else lr
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=recipe.momentum)
    # Keras' Adam epsilon is 1e-7 (PyTorch's default is 1e-8).
    return torch.optim.Adam(model.parameters(), lr=lr, eps=1e-7)


def min_batch_size(model: nn.Module) -> int:
    """Smallest mini-batch the loop trains on: BatchNorm cannot train on one image at 1x1
    (resnet18 at 32 px), so a model with BatchNorm skips a last batch of one."""
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                    for m in model.modules()) else 1


def fit(
    model: nn.Module,
    recipe: TrainRecipe,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    adapter: InputAdapter,
    total_steps: int,
    shuffle_gen: torch.Generator,
    progress: bool,
    desc: str,
) -> tuple[int, float]:
    """The optimisation loop; returns ``(steps taken, last loss)``."""
    opt = make_optimizer(model, recipe)
    loss_fn = nn.CrossEntropyLoss()
    n_train = int(y_train.shape[0])
    min_batch = min_batch_size(model)
    step, loss_value = 0, float("nan")
    bar = tqdm(total=total_steps, desc=desc, file=sys.stderr, disable=not progress,
               unit="step", leave=False)
    with bar:
        while step < total_steps:
            order = torch.randperm(n_train, generator=shuffle_gen).to(x_train.device)
            for start in range(0, n_train, recipe.batch_size):
                if step >= total_steps:
                    break
                idx = order[start : start + recipe.batch_size]
                if len(idx) < min_batch:
                    continue
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(adapter(x_train[idx])), y_train[idx])
                loss.backward()
                opt.step()
                step += 1
                loss_value = float(loss.detach())
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
    return step, loss_value
