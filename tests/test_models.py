"""Tests for hasched.zoo.models: architectures, layer names, parameter counts, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hasched.errors import HaschedError
from hasched.zoo import models
from hasched.zoo.models import (
    TrainRecipe,
    create_model,
    get_model_spec,
    init_weights,
    list_models,
    register_model,
    weight_layers,
)

# torch notes that even-kernel 'same' padding copies the input; expected for fashion-cnn.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def amax(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


def test_registry_lists_the_zoo():
    assert list_models() == ["fashion-cnn", "mlp", "mnist32-cnn", "mobilenet_v3_small",
                             "resnet18"]
    spec = get_model_spec("mnist32-cnn")
    assert (spec.dataset, spec.input_shape) == ("mnist32", (1, 32, 32))
    assert spec.recipe == TrainRecipe("sgd", 0.01, 0.9, 1024, 25, 60000, "he_uniform")
    spec = get_model_spec("fashion-cnn")
    assert (spec.dataset, spec.input_shape) == ("fashion-mnist", (1, 28, 28))
    assert spec.recipe == TrainRecipe("adam", 1e-3, 0.0, 128, 25, 60000, "default")


def test_unknown_model_lists_known_ones():
    with pytest.raises(HaschedError, match="unknown model 'lenet'; known: mnist32-cnn, fash.*mlp"):
        create_model("lenet")
    with pytest.raises(HaschedError, match="unknown model ''"):
        get_model_spec("")


def test_register_model_rejects_duplicates(monkeypatch):
    monkeypatch.setattr(models.MODELS, "_entries", dict(models.MODELS._entries))
    recipe = TrainRecipe("sgd", 0.1)

    @register_model("tiny", dataset="mnist", input_shape=(1, 28, 28), recipe=recipe)
    def tiny() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    assert "tiny" in list_models() and isinstance(create_model("tiny"), nn.Sequential)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny", dataset="mnist", input_shape=(1, 28, 28), recipe=recipe)(tiny)


def test_mnist32_cnn_structure():
    model = create_model("mnist32-cnn")
    assert isinstance(model, nn.Sequential)
    assert [n for n, _ in model.named_children()] == [
        "c0", "c0_relu", "pool0", "flatten", "h0", "h0_relu",
        "h1", "h1_relu", "h2", "h2_relu", "op",
    ]  # fmt: skip
    assert weight_layers(model) == ["c0", "h0", "h1", "h2", "op"]
    expected = {
        "c0": 32 * 1 * 4 * 4 + 32,
        "h0": 6272 * 1024 + 1024,
        "h1": 1024 * 256 + 256,
        "h2": 256 * 64 + 64,
        "op": 64 * 10 + 10,
    }
    assert {name: n_params(getattr(model, name)) for name in expected} == expected
    assert n_params(model) == sum(expected.values())
    out = model(torch.zeros(3, 1, 32, 32))
    assert out.shape == (3, 10)
    # 32 - 4 + 1 = 29 (valid), pooled to 14: 32 * 14 * 14 = 6272 features.
    assert model[:3](torch.zeros(1, 1, 32, 32)).shape == (1, 32, 14, 14)


def test_fashion_cnn_structure():
    model = create_model("fashion-cnn")
    assert [n for n, _ in model.named_children()] == [
        "c0", "c0_relu", "pool0", "drop0", "c1", "c1_relu", "pool1", "drop1",
        "flatten", "h0", "h0_relu", "drop2", "op",
    ]  # fmt: skip
    assert weight_layers(model) == ["c0", "c1", "h0", "op"]
    expected = {
        "c0": 32 * 16 + 32,
        "c1": 32 * 32 * 16 + 32,
        "h0": 1568 * 1024 + 1024,
        "op": 1024 * 10 + 10,
    }
    assert {name: n_params(getattr(model, name)) for name in expected} == expected
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))
    model.eval()
    # 'same' padding keeps 28x28, two pools: 7x7.
    assert model[:1](torch.zeros(1, 1, 28, 28)).shape == (1, 32, 28, 28)
    assert model[:7](torch.zeros(1, 1, 28, 28)).shape == (1, 32, 7, 7)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.parametrize("name", ["mnist32-cnn", "fashion-cnn"])
def test_sequential_prefix_plus_suffix_equals_forward(name):
    model = create_model(name).eval()
    x = torch.rand(2, *get_model_spec(name).input_shape, generator=torch.Generator().manual_seed(0))
    cut = list(dict(model.named_children())).index("h0")
    torch.testing.assert_close(model[cut:](model[:cut](x)), model(x))


def test_weight_layers_on_any_module():
    net = nn.Module()
    net.block = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    net.head = nn.Linear(2, 2)
    assert weight_layers(net) == ["block.0", "head"]


def test_init_weights_is_seeded_and_within_keras_bounds():
    a, b, c = (create_model("mnist32-cnn") for _ in range(3))
    init_weights(a, "he_uniform", torch.Generator().manual_seed(7))
    init_weights(b, "he_uniform", torch.Generator().manual_seed(7))
    init_weights(c, "he_uniform", torch.Generator().manual_seed(8))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.h0.weight, c.h0.weight)
    assert amax(a.h0.weight) <= math.sqrt(6 / 6272)
    assert amax(a.h0.weight) > 0.9 * math.sqrt(6 / 6272)
    assert amax(a.c0.weight) <= math.sqrt(6 / 16)
    assert all(amax(getattr(a, n).bias) == 0 for n in weight_layers(a))

    f = create_model("fashion-cnn")
    init_weights(f, "default", torch.Generator().manual_seed(0))
    bound = math.sqrt(6 / (1568 + 1024))  # glorot_uniform
    assert 0.9 * bound < amax(f.h0.weight) <= bound
    assert amax(f.op.bias) == 0
    with pytest.raises(ValueError, match="unknown init"):
        init_weights(f, "orthogonal", torch.Generator())


def test_builders_take_keyword_arguments():
    model = create_model("mlp", hidden=(32,), num_classes=4, in_channels=3, image_size=8)
    assert [n for n, _ in model.named_children()] == ["flatten", "h0", "h0_relu", "op"]
    assert (model.h0.in_features, model.h0.out_features, model.op.out_features) == (192, 32, 4)
    with pytest.raises(HaschedError, match="model 'mlp': bad parameters.*takes: hidden, num_cl"):
        create_model("mlp", depth=3)
    with pytest.raises(HaschedError, match="model 'mnist32-cnn': bad parameters.*takes: none"):
        create_model("mnist32-cnn", num_classes=3)


def test_mlp_default_is_784_256_128_10():
    model = create_model("mlp")
    assert weight_layers(model) == ["h0", "h1", "op"]
    shapes = [tuple(getattr(model, n).weight.shape) for n in weight_layers(model)]
    assert shapes == [(256, 784), (128, 256), (10, 128)]
    assert n_params(model) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    spec = get_model_spec("mlp")
    assert (spec.dataset, spec.input_shape, spec.recipe.init) == ("mnist", (1, 28, 28),
                                                                  "he_uniform")
    assert spec.input_shape_for({"in_channels": 3, "image_size": 32}) == (3, 32, 32)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cut = list(dict(model.named_children())).index("h1")
    torch.testing.assert_close(model[cut:](model[:cut](x)), model(x))
