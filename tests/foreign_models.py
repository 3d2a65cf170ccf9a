"""Classifier architectures from outside the EfficientNet-Lite family, defined here in plain PyTorch.

The definitions follow torchvision's module layout and parameter names (``conv1``,
``layer1.0.downsample.0``, ``features.3.conv.1.0``, ``classifier.3``) so exported graphs carry
the names a PyTorch user knows; torchvision itself is not used (its wheel does not import beside
this torch). Widths and input sizes are parameters so tests can run small copies: the structure
is what matters (shared inputs read by 1x1 and 3x3 convolutions, Concat, channel shuffle, grouped
and depthwise convolutions, squeeze-excitation, LayerNorm, MatMul weights), not accuracy.

:func:`build` makes a seeded network by name; :func:`export` writes it as ONNX with the legacy
(TorchScript) or the dynamo exporter, with a free or a fixed batch dimension.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def _div(value: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: channels rounded to a multiple of ``divisor``, never below 90 %."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class ConvNormAct(nn.Sequential):
    """Conv2d + BatchNorm2d (+ activation): indices 0, 1, 2 as torchvision's Conv2dNormActivation."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: Callable[[], nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool, fc1 (1x1 conv), activation, fc2, scale."""

    def __init__(self, channels: int, squeeze: int, act=nn.ReLU, scale=nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = scale()

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


# ---------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet: the downsampling blocks' 1x1 ``downsample.0`` reads the tensor their 3x3
    (BasicBlock) or 1x1 (Bottleneck) ``conv1`` reads."""

    def __init__(
        self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], width: int = 64, classes: int = 1000
    ) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, width, layers[0])
        self.layer2 = self._layer(block, width * 2, layers[1], 2)
        self.layer3 = self._layer(block, width * 4, layers[2], 2)
        self.layer4 = self._layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, classes)

    def _layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------- MobileNet


class InvertedResidual(nn.Module):
    """MobileNetV2's block: ``conv`` = [expand ConvNormAct,] depthwise ConvNormAct, project Conv2d, BatchNorm2d."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if expand == 1 else [ConvNormAct(cin, hidden, 1, act=nn.ReLU6)]
        layers += [
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, classes: int = 1000) -> None:
        super().__init__()
        settings = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ]
        cin = _div(32 * width)
        last = _div(1280 * max(1.0, width))
        features: list[nn.Module] = [ConvNormAct(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in settings:
            cout = _div(c * width)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvNormAct(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class InvertedResidualV3(nn.Module):
    """MobileNetV3's block: ``block`` = [expand,] depthwise, [SqueezeExcitation,] project."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hs: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if expanded == cin else [ConvNormAct(cin, expanded, 1, act=act)]
        layers.append(ConvNormAct(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded, _div(expanded // 4), scale=nn.Hardsigmoid))
        layers.append(ConvNormAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3(nn.Module):
    """MobileNetV3-Small's layout (torchvision): classifier = Linear, Hardswish, Dropout, Linear."""

    def __init__(self, width: float = 1.0, classes: int = 1000) -> None:
        super().__init__()
        settings = [  # kernel, expanded, out, SE, hardswish, stride
            (3, 16, 16, True, False, 2),
            (3, 72, 24, False, False, 2),
            (3, 88, 24, False, False, 1),
            (5, 96, 40, True, True, 2),
            (5, 240, 40, True, True, 1),
            (5, 120, 48, True, True, 1),
            (5, 288, 96, True, True, 2),
            (5, 576, 96, True, True, 1),
        ]
        cin = _div(16 * width)
        features: list[nn.Module] = [ConvNormAct(3, cin, 3, 2, act=nn.Hardswish)]
        for k, e, c, se, hs, s in settings:
            cout = _div(c * width)
            features.append(InvertedResidualV3(cin, k, _div(e * width), cout, se, hs, s))
            cin = cout
        last = 6 * cin
        features.append(ConvNormAct(cin, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = _div(1024 * width)
        self.classifier = nn.Sequential(
            nn.Linear(last, hidden), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hidden, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------------------------------- EfficientNet


class MBConv(nn.Module):
    """EfficientNet's block: ``block`` = [expand,] depthwise, SqueezeExcitation (SiLU), project."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if expand == 1 else [ConvNormAct(cin, hidden, 1, act=nn.SiLU)]
        layers += [
            ConvNormAct(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4), act=nn.SiLU),
            ConvNormAct(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class EfficientNetB0(nn.Module):
    def __init__(self, width: float = 1.0, depth: float = 1.0, classes: int = 1000) -> None:
        super().__init__()
        stages = [
            (1, 3, 1, 32, 16, 1),
            (6, 3, 2, 16, 24, 2),
            (6, 5, 2, 24, 40, 2),
            (6, 3, 2, 40, 80, 3),
            (6, 5, 1, 80, 112, 3),
            (6, 5, 2, 112, 192, 4),
            (6, 3, 1, 192, 320, 1),
        ]
        features: list[nn.Module] = [ConvNormAct(3, _div(32 * width), 3, 2, act=nn.SiLU)]
        for expand, kernel, stride, cin, cout, repeats in stages:
            cin, cout = _div(cin * width), _div(cout * width)
            blocks = []
            for i in range(max(1, math.ceil(repeats * depth))):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
            features.append(nn.Sequential(*blocks))
        last = 4 * _div(320 * width)
        features.append(ConvNormAct(_div(320 * width), last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (torchvision's, for downsampling layers)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt's block: 7x7 depthwise conv, then LayerNorm and two Linear layers on channels-last values
    (MatMul with the weight as second operand), a learned layer scale, a residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
            _Permute(0, 2, 3, 1),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            _Permute(0, 3, 1, 2),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layer_scale * self.block(x)


class _Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class ConvNeXt(nn.Module):
    """ConvNeXt-Tiny's layout (depths 3, 3, 9, 3; widths 96..768 at ``width`` 96)."""

    def __init__(self, width: int = 96, depths: tuple[int, ...] = (3, 3, 9, 3), classes: int = 1000) -> None:
        super().__init__()
        dims = [width * 2**i for i in range(4)]
        features: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            features.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
            if i < 3:
                features.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# ---------------------------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1, BN-ReLU-Conv3x3 on the Concat of every earlier feature map of the block."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, cin: int, growth: int) -> None:
        super().__init__({f"denselayer{i + 1}": DenseLayer(cin + i * growth, growth) for i in range(layers)})

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(cin))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(cin, cout, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    """DenseNet-121's layout (growth 32, blocks 6, 12, 24, 16) with ``growth`` and ``blocks`` as parameters."""

    def __init__(
        self, growth: int = 32, blocks: tuple[int, ...] = (6, 12, 24, 16), init: int = 64, classes: int = 1000
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, init, 7, 2, 3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(init))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        channels = init
        for i, layers in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(layers, channels, growth))
            channels += layers * growth
            if i != len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.relu(self.features(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------- SqueezeNet


class Fire(nn.Module):
    """A 1x1 squeeze read by both a 1x1 and a 3x3 expand convolution, whose outputs are concatenated."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1
        )


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 (torchvision): the classifier is a 1x1 convolution, ``classifier.1``."""

    def __init__(self, width: float = 1.0, classes: int = 1000) -> None:
        super().__init__()

        def w(c: int) -> int:
            return max(4, int(c * width))

        self.features = nn.Sequential(
            nn.Conv2d(3, w(64), 3, 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(w(64), w(16), w(64), w(64)),
            Fire(w(128), w(16), w(64), w(64)),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(w(128), w(32), w(128), w(128)),
            Fire(w(256), w(32), w(128), w(128)),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(w(256), w(48), w(192), w(192)),
            Fire(w(384), w(48), w(192), w(192)),
            Fire(w(384), w(64), w(256), w(256)),
            Fire(w(512), w(64), w(256), w(256)),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(w(512), classes, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# ---------------------------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: split channels (stride 1) or two branches (stride 2), depthwise 3x3, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 x1.0's layout (stages of 4, 8, 4 units) with a grouped (group 4) 1x1 conv before conv5,
    so grouped, depthwise and plain convolutions all appear."""

    def __init__(
        self,
        widths: tuple[int, ...] = (24, 116, 232, 464, 1024),
        repeats: tuple[int, ...] = (4, 8, 4),
        classes: int = 1000,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(repeats, widths[1:4], strict=True)):
            setattr(
                self,
                f"stage{i + 2}",
                nn.Sequential(*[ShuffleUnit(cin if j == 0 else cout, cout, 2 if j == 0 else 1) for j in range(n)]),
            )
            cin = cout
        self.grouped = nn.Sequential(
            nn.Conv2d(cin, cin, 1, groups=4, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        )
        self.conv5 = nn.Sequential(
            nn.Conv2d(cin, widths[4], 1, bias=False), nn.BatchNorm2d(widths[4]), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(widths[4], classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        for stage in ("stage2", "stage3", "stage4"):
            x = self.get_submodule(stage)(x)
        x = self.conv5(self.grouped(x))
        return self.fc(x.mean([2, 3]))


# ---------------------------------------------------------------------------------------------- GoogLeNet


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four branches over one input (three of them start with a 1x1 conv), concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(cin, c3r, kernel_size=1), BasicConv2d(c3r, c3, kernel_size=3, padding=1)
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(cin, c5r, kernel_size=1), BasicConv2d(c5r, c5, kernel_size=3, padding=1)
        )
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, pool, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    """GoogLeNet's layout (torchvision, without the auxiliary heads); widths scaled by ``width``."""

    def __init__(self, width: float = 1.0, classes: int = 1000) -> None:
        super().__init__()

        def w(c: int) -> int:
            return max(4, int(c * width))

        self.conv1 = BasicConv2d(3, w(64), kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(w(64), w(64), kernel_size=1)
        self.conv3 = BasicConv2d(w(64), w(192), kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        spec = {
            "inception3a": (192, 64, 96, 128, 16, 32, 32),
            "inception3b": (256, 128, 128, 192, 32, 96, 64),
            "inception4a": (480, 192, 96, 208, 16, 48, 64),
            "inception4b": (512, 160, 112, 224, 24, 64, 64),
            "inception4c": (512, 128, 128, 256, 24, 64, 64),
            "inception4d": (512, 112, 144, 288, 32, 64, 64),
            "inception4e": (528, 256, 160, 320, 32, 128, 128),
            "inception5a": (832, 256, 160, 320, 32, 128, 128),
            "inception5b": (832, 384, 192, 384, 48, 128, 128),
        }
        for name, channels in spec.items():
            c1, c3r, c3, c5r, c5, pool = (w(c) for c in channels[1:])
            setattr(self, name, Inception(self._cin(name, spec, w), c1, c3r, c3, c5r, c5, pool))
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        last = spec["inception5b"]
        self.fc = nn.Linear(w(last[1]) + w(last[3]) + w(last[5]) + w(last[6]), classes)

    @staticmethod
    def _cin(name: str, spec: Mapping[str, Sequence[int]], w: Callable[[int], int]) -> int:
        """Input channels of an Inception module: the output of the one before (the scaled branch widths summed)."""
        names = list(spec)
        at = names.index(name)
        if at == 0:
            return w(spec[name][0])
        prev = spec[names[at - 1]]
        return w(prev[1]) + w(prev[3]) + w(prev[5]) + w(prev[6])

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        for name in ("inception3a", "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c"):
            x = self.get_submodule(name)(x)
        for name in ("inception4d", "inception4e", "maxpool4", "inception5a", "inception5b"):
            x = self.get_submodule(name)(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# ---------------------------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(x)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """torchvision's ViT encoder: position embedding, the blocks (``layers.N``), a final LayerNorm."""

    def __init__(self, tokens: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(dim, heads, 4 * dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class VisionTransformer(nn.Module):
    """ViT-B/16's layout (torchvision names: ``conv_proj``, ``class_token``, ``encoder.layers.N``, ``heads.head``),
    small: every Linear is a MatMul on (batch, tokens, channels) values."""

    def __init__(
        self, image: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12, classes: int = 1000
    ) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder((image // patch) ** 2 + 1, dim, depth, heads)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = self.encoder(torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1))
        return self.heads(x[:, 0])


# ---------------------------------------------------------------------------------------------- the zoo


@dataclass(frozen=True)
class Architecture:
    """A named network at two sizes: ``small`` for tests, ``full`` for the benchmark (ImageNet widths)."""

    name: str
    small: Callable[[], nn.Module]
    full: Callable[[], nn.Module]
    small_input: int = 64
    full_input: int = 224


def _randomized(net: nn.Module, seed: int) -> nn.Module:
    """Seeded weights, and BatchNorm statistics that are not the identity (so folding them matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) * 0.5 + 0.75)
                module.weight.copy_(torch.rand(module.num_features, generator=gen) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
    return net.eval()


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "resnet18",
            lambda: ResNet(BasicBlock, [2, 2, 2, 2], width=16, classes=1000),
            lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
        ),
        Architecture(
            "resnet50",
            lambda: ResNet(Bottleneck, [1, 1, 1, 1], width=8, classes=1000),
            lambda: ResNet(Bottleneck, [3, 4, 6, 3]),
        ),
        Architecture("mobilenet_v2", lambda: MobileNetV2(0.25, classes=1000), lambda: MobileNetV2()),
        Architecture("mobilenet_v3", lambda: MobileNetV3(0.5, classes=1000), lambda: MobileNetV3()),
        Architecture("efficientnet_b0", lambda: EfficientNetB0(0.25, 0.34, classes=1000), lambda: EfficientNetB0()),
        Architecture("convnext", lambda: ConvNeXt(16, (1, 1, 2, 1), classes=1000), lambda: ConvNeXt()),
        Architecture("densenet", lambda: DenseNet(8, (2, 2, 2, 2), 16, classes=1000), lambda: DenseNet()),
        Architecture("squeezenet", lambda: SqueezeNet(0.25, classes=1000), lambda: SqueezeNet()),
        Architecture(
            "shufflenet", lambda: ShuffleNetV2((8, 32, 64, 128, 256), (2, 2, 2), classes=1000), lambda: ShuffleNetV2()
        ),
        Architecture("googlenet", lambda: GoogLeNet(0.125, classes=1000), lambda: GoogLeNet()),
        Architecture(
            "vit",
            lambda: VisionTransformer(64, 16, 32, 2, 4, classes=1000),
            lambda: VisionTransformer(224, 16, 192, 12, 3),
            small_input=64,
        ),
    )
}


def build(name: str, full: bool = False, seed: int = 0) -> tuple[nn.Module, int]:
    """The seeded network ``name`` in eval mode and its input size."""
    arch = ARCHITECTURES[name]
    torch.manual_seed(seed)
    net = arch.full() if full else arch.small()
    return _randomized(net, seed), arch.full_input if full else arch.small_input


def export(
    net: nn.Module, size: int, path: str | Path, *, opset: int = 17, dynamo: bool = False, batch: int | None = None
) -> Path:
    """``net`` as an ONNX file: input ``input`` (N, 3, size, size), output ``logits``; ``batch`` fixes N
    (None leaves it free). The dynamo exporter needs onnxscript."""
    path = Path(path)
    dummy = torch.randn(batch or 1, 3, size, size, generator=torch.Generator().manual_seed(1))
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    if batch is None:
        if dynamo:
            kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
        else:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(net, (dummy,), dynamo=True, **kwargs)
            assert program is not None
            program.save(str(path))
        else:
            torch.onnx.export(net, (dummy,), str(path), dynamo=False, **kwargs)
    return path
