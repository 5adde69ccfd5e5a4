"""The bundled torchvision equivalents: parameter counts, state-dict keys and shapes, inputs.

The reference numbers are torchvision's (``torchvision.models.resnet18()`` and
``mobilenet_v3_small()`` at 1000 classes), which cannot be imported beside this torch build.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hasched.zoo.models import create_model, weight_layers
from hasched.zoo.torchvision_models import _make_divisible, mobilenet_v3_small, resnet18

# Published parameter counts (torchvision's model documentation, weights tables).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "mobilenet_v3_small": 2_542_856}

# A sample of torchvision's state-dict keys with their shapes at 1000 classes.
RESNET18_KEYS = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_mean": (64,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn2.bias": (64,),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.running_var": (128,),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "fc.weight": (1000, 512),
    "fc.bias": (1000,),
}
MOBILENET_KEYS = {
    "features.0.0.weight": (16, 3, 3, 3),
    "features.0.1.bias": (16,),
    "features.1.block.0.0.weight": (16, 1, 3, 3),  # depthwise, no expansion in block 1
    "features.1.block.1.fc1.weight": (8, 16, 1, 1),  # squeeze-excitation
    "features.1.block.1.fc2.bias": (16,),
    "features.1.block.2.0.weight": (16, 16, 1, 1),
    "features.2.block.0.0.weight": (72, 16, 1, 1),
    "features.4.block.1.0.weight": (96, 1, 5, 5),
    "features.4.block.2.fc1.weight": (24, 96, 1, 1),
    "features.11.block.3.1.running_var": (96,),
    "features.12.0.weight": (576, 96, 1, 1),
    "classifier.0.weight": (1024, 576),
    "classifier.3.weight": (1000, 1024),
    "classifier.3.bias": (1000,),
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_equal_torchvision(name):
    assert n_params(create_model(name)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize(("builder", "keys"), [(resnet18, RESNET18_KEYS),
                                               (mobilenet_v3_small, MOBILENET_KEYS)])
def test_state_dict_keys_and_shapes_match_torchvision(builder, keys):
    state = builder().state_dict()
    assert {k: tuple(state[k].shape) for k in keys if k in state} == keys


def test_resnet18_state_dict_size_and_blocks():
    state = resnet18().state_dict()
    # conv1+bn1 (6) + 8 blocks x 12 + 3 downsamples x 6 + fc (2)
    assert len(state) == 6 + 8 * 12 + 3 * 6 + 2 == 122
    assert sorted({k.split(".")[0] for k in state}) == ["bn1", "conv1", "fc", "layer1",
                                                         "layer2", "layer3", "layer4"]
    assert not any(k.startswith("layer1.0.downsample") for k in state)


def test_make_divisible_rounds_like_the_reference():
    # Hand-checked: nearest multiple of 8, at least 8, bumped when more than 10% below.
    assert [_make_divisible(v) for v in (4, 18, 24, 60, 72, 144, 1024)] == [
        8, 24, 24, 64, 72, 144, 1024]
    assert _make_divisible(11) == 16  # 11 -> 8 would lose 27%


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shapes_on_small_images(name, channels):
    model = create_model(name, num_classes=10, in_channels=channels).eval()
    x = torch.rand(2, channels, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert model(x[:, :, :28, :28]).shape == (2, 10)  # 28x28 fits too


def test_in_channels_changes_only_the_stem():
    one, three = resnet18(num_classes=10, in_channels=1), resnet18(num_classes=10)
    s1, s3 = one.state_dict(), three.state_dict()
    assert s1.keys() == s3.keys()
    assert [k for k in s1 if s1[k].shape != s3[k].shape] == ["conv1.weight"]
    assert s1["conv1.weight"].shape == (64, 1, 7, 7)
    m1 = mobilenet_v3_small(in_channels=1).state_dict()
    assert [k for k in m1 if m1[k].shape != MOBILENET_KEYS.get(k, m1[k].shape)] == [
        "features.0.0.weight"]


def test_small_input_variant():
    big = resnet18(num_classes=10).eval()
    small = resnet18(num_classes=10, small_input=True).eval()
    assert big.state_dict().keys() == small.state_dict().keys()
    assert small.conv1.weight.shape == (64, 3, 3, 3) and isinstance(small.maxpool, nn.Identity)
    assert n_params(big) - n_params(small) == 64 * 3 * (49 - 9)
    mob, mob_small = mobilenet_v3_small().eval(), mobilenet_v3_small(small_input=True).eval()
    assert n_params(mob) == n_params(mob_small)
    assert (mob.features[0][0].stride, mob_small.features[0][0].stride) == ((2, 2), (1, 1))
    # Spatial size before the head: 32 -> 1 (torchvision stem) vs 32 -> 4 / 2 (small stem).
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        assert mob.features(x).shape[-1] == 1 and mob_small.features(x).shape[-1] == 2
        stem = small.maxpool(small.relu(small.bn1(small.conv1(x))))
        assert small.layer4(small.layer3(small.layer2(small.layer1(stem)))).shape[-1] == 4


def test_residual_connections_are_where_torchvision_has_them():
    mob = mobilenet_v3_small()
    blocks = list(mob.features)[1:-1]
    # Stride-1 blocks with equal in/out channels add their input: rows 3, 5, 6, 8, 10, 11.
    assert [i + 1 for i, b in enumerate(blocks) if b.use_res_connect] == [3, 5, 6, 8, 10, 11]


def test_weight_layers_of_resnet18_in_forward_order():
    names = weight_layers(resnet18(num_classes=10))
    assert names[:4] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert "layer2.0.downsample.0" in names and names[-1] == "fc" and len(names) == 21


def test_default_init_is_torchvision_scheme():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = mobilenet_v3_small()
    last = model.classifier[3]
    assert float(last.bias.detach().abs().max()) == 0.0
    assert 0.008 < float(last.weight.detach().std()) < 0.012  # N(0, 0.01)
    bn = model.features[0][1]
    assert torch.equal(bn.weight, torch.ones(16)) and (bn.eps, bn.momentum) == (0.001, 0.01)
    conv = model.features[12][0]  # He-normal, fan_out = 576: std sqrt(2/576)
    assert abs(float(conv.weight.detach().std()) - (2 / 576) ** 0.5) < 0.005
