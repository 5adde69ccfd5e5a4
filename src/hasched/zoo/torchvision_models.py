"""Clean-room equivalents of torchvision's ``resnet18`` and ``mobilenet_v3_small``.

torchvision cannot be installed beside the CPU torch wheel this project pins (PyPI's wheel
links against the CUDA build), so the two architectures the simulator is tested on are
re-implemented here from their papers (He et al. 2016; Howard et al. 2019) with torchvision's
module names, parameter shapes, defaults and initialisation: a ``state_dict`` saved from
``torchvision.models.resnet18(num_classes=N)`` loads into :func:`resnet18` with
``num_classes=N`` and vice versa (same keys, same shapes; 11,689,512 and 2,542,856 parameters
at 1000 classes).

Two extensions, both off by default so the default is exactly torchvision's network:

- ``in_channels``: the first convolution takes this many channels (torchvision: always 3), so
  1-channel MNIST-like images need no channel repetition;
- ``small_input``: the usual adaptation for 28/32-pixel images (CIFAR-style). resnet18: the
  stem's 7x7/2 conv becomes a 3x3/1 conv (``conv1.weight`` shape ``(64, C, 3, 3)``) and the
  max-pool is dropped (an ``Identity``, no parameters). mobilenet_v3_small: the stem conv's
  stride is 1 instead of 2 (no shape changes). Keys are unchanged in both, but a resnet18
  checkpoint only loads into a model with the same ``small_input`` setting.

Without ``small_input`` a 32x32 image still runs: resnet18 reduces it to 1x1 before
``layer4``'s second stride (the adaptive average pool handles any size), mobilenet_v3_small to
1x1 at the last stage.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BasicBlock", "InvertedResidual", "MobileNetV3", "ResNet", "mobilenet_v3_small",
           "resnet18"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity (or 1x1-projected) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            # Projection shortcut (option B of the ResNet paper) named as torchvision does.
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with :class:`BasicBlock` stages (resnet18: two blocks per stage).

    Args:
        layers: Blocks per stage, e.g. ``(2, 2, 2, 2)``.
        num_classes: Outputs of ``fc``.
        in_channels: Input channels of ``conv1``.
        small_input: 3x3/1 stem without max-pool (see the module docstring).
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(inplanes, planes, stride)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: He-normal (fan_out) convs, BN weight 1 / bias 0.

        ``fc`` keeps PyTorch's default Linear initialisation. Draws from the global RNG like
        torchvision does; callers wanting reproducible weights build the model under
        :func:`torch.random.fork_rng` with a seed (see :func:`hasched.zoo.ref.build_model`).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, H/32, W/32)
        return self.fc(self.avgpool(x).flatten(1))  # (B, num_classes)


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> ResNet:
    """resnet18: torchvision-compatible ResNet-18 (11.7M parameters at 1000 classes)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, small_input)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% down.

    The MobileNet reference rule; it decides e.g. every squeeze-excitation width.
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = None) -> nn.Sequential:
    """conv (no bias) -> BN(eps 1e-3, momentum 0.01) [-> activation], keys ``0``, ``1``, ``2``."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention: global average -> 1x1 conv -> ReLU -> 1x1 conv -> hard sigmoid."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))  # (B, C, 1, 1)
        return self.scale_activation(scale) * x


class InvertedResidual(nn.Module):
    """MobileNetV3 bottleneck: [1x1 expand] -> depthwise kxk -> [SE] -> 1x1 project (+ input).

    Args:
        cin: Input channels.
        kernel: Depthwise kernel size.
        expanded: Channels after the expansion (no expansion conv when equal to ``cin``).
        cout: Output channels.
        use_se: Insert squeeze-excitation after the depthwise conv.
        use_hs: Hard-swish instead of ReLU.
        stride: Depthwise stride.
    """

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool,
                 use_hs: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_conv_bn_act(cin, expanded, 1, act=act))
        layers.append(_conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4)))
        layers.append(_conv_bn_act(expanded, cout, 1))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout
        self.out_channels = cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# MobileNetV3-Small (Howard et al. 2019, table 2):
# (in, kernel, expanded, out, squeeze-excitation, hard-swish, stride)
_SMALL = (
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
)


class MobileNetV3(nn.Module):
    """MobileNetV3 with torchvision's layout: ``features``, ``avgpool``, ``classifier``.

    Args:
        setting: Bottleneck rows ``(in, kernel, expanded, out, se, hs, stride)``.
        last_channel: Width of the classifier's hidden layer.
        num_classes: Outputs of ``classifier.3``.
        in_channels: Input channels of the stem conv.
        dropout: Dropout probability before the last Linear.
        small_input: Stem stride 1 instead of 2 (see the module docstring).
    """

    def __init__(self, setting: tuple, last_channel: int, num_classes: int = 1000,
                 in_channels: int = 3, dropout: float = 0.2, small_input: bool = False) -> None:
        super().__init__()
        first = setting[0][0]
        layers: list[nn.Module] = [
            _conv_bn_act(in_channels, first, 3, 1 if small_input else 2, act=nn.Hardswish)
        ]
        layers += [InvertedResidual(*row) for row in setting]
        last_in = setting[-1][3]
        layers.append(_conv_bn_act(last_in, 6 * last_in, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: He-normal (fan_out) convs with zero bias, BN 1/0,
        Linear N(0, 0.01) with zero bias (global RNG, as in :meth:`ResNet.reset_parameters`)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)  # (B, 576)
        return self.classifier(x)  # (B, num_classes)


def mobilenet_v3_small(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2,
                       small_input: bool = False) -> MobileNetV3:
    """mobilenet_v3_small: torchvision-compatible MobileNetV3-Small (2.5M parameters)."""
    return MobileNetV3(_SMALL, _make_divisible(1024), num_classes, in_channels, dropout,
                       small_input)
