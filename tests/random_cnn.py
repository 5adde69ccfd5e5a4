"""A seeded, randomly initialised mnist32-cnn with synthetic images (shared by test modules)."""

from __future__ import annotations

import torch

from hasched.zoo.models import create_model, init_weights


def random_cnn(n: int, flip_every: int = 0):
    """``(model in eval mode, x (n, 1, 32, 32), labels)``; labels are the model's own
    predictions, shifted by one class on every ``flip_every``-th image (0: none)."""
    with torch.random.fork_rng():
        m = create_model("mnist32-cnn")
    init_weights(m, "he_uniform", torch.Generator().manual_seed(0))
    x = torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m.eval()(x).argmax(-1)
    if flip_every:
        y = torch.where(torch.arange(n) % flip_every == 0, (y + 1) % 10, y)
    return m, x, y
