"""Classifiers shaped like torchvision's, written here: torchvision's only wheel on the package
index of growc's machines is a CUDA build that does not load against torch 2.13.0+cpu, so the
`coverage` suite builds these instead (same layers, widths, groups, squeeze-excitation,
stochastic depth and forward code paths as torchvision's definitions, random init, 10 classes).
`coverage --torchvision` uses torchvision's own models where it loads.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNeXt(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), groups=32, width_per_group=4, num_classes=10):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.groups, self.base_width = groups, width_per_group
        self.layer1 = self._make(64, layers[0])
        self.layer2 = self._make(128, layers[1], 2)
        self.layer3 = self._make(256, layers[2], 2)
        self.layer4 = self._make(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def _make(self, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [Bottleneck(self.inplanes, planes, stride, down, self.groups, self.base_width)]
        self.inplanes = planes * 4
        layers += [
            Bottleneck(self.inplanes, planes, groups=self.groups, base_width=self.base_width) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _RegNetSE(nn.Module):
    def __init__(self, c, s):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, s, 1)
        self.fc2 = nn.Conv2d(s, c, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


def _regnet_cna(i, o, k, s=1, g=1, act=True):
    layers = [nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResBottleneckBlock(nn.Module):
    def __init__(self, w_in, w_out, stride, group_width, se_ratio):
        super().__init__()
        self.proj = _regnet_cna(w_in, w_out, 1, stride, act=False) if (w_in != w_out or stride != 1) else None
        g = w_out // group_width
        layers = [("a", _regnet_cna(w_in, w_out, 1)), ("b", _regnet_cna(w_out, w_out, 3, stride, g))]
        if se_ratio:
            layers.append(("se", _RegNetSE(w_out, int(round(se_ratio * w_in)))))
        layers.append(("c", _regnet_cna(w_out, w_out, 1, act=False)))
        self.f = nn.Sequential(OrderedDict(layers))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    """regnet_x_400mf / regnet_y_400mf shapes: depths, widths, group widths."""

    def __init__(self, depths, widths, group_width, se_ratio, num_classes=10):
        super().__init__()
        self.stem = _regnet_cna(3, 32, 3, 2)
        blocks, w_in = [], 32
        for d, w in zip(depths, widths):
            for i in range(d):
                blocks.append(ResBottleneckBlock(w_in, w, 2 if i == 0 else 1, group_width, se_ratio))
                w_in = w
        self.trunk = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w_in, num_classes)

    def forward(self, x):
        x = self.trunk(self.stem(x))
        return self.fc(self.avgpool(x).flatten(1))


def cna(i, o, k, s=1, g=1, act=nn.SiLU):
    layers = [nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.SiLU, nn.ReLU, nn.Hardswish) else act())
    return nn.Sequential(*layers)


class SE(nn.Module):
    def __init__(self, c, s, act=nn.SiLU, scale=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, s, 1)
        self.fc2 = nn.Conv2d(s, c, 1)
        self.activation = act()
        self.scale_activation = scale()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class StochasticDepth(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        noise = torch.empty([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * noise.div_(1 - self.p)


class MBConv(nn.Module):
    def __init__(self, i, o, k, s, e, p, act=nn.SiLU, scale=nn.Sigmoid, se_div=4, se_from_input=True):
        super().__init__()
        self.use_res = s == 1 and i == o
        ex = i * e
        layers = []
        if ex != i:
            layers.append(cna(i, ex, 1, act=act))
        layers.append(cna(ex, ex, k, s, ex, act=act))
        if se_div:
            sq = max(1, (i if se_from_input else ex) // se_div)
            layers.append(SE(ex, sq, nn.SiLU if act is nn.SiLU else nn.ReLU, scale))
        layers.append(cna(ex, o, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(p)

    def forward(self, x):
        r = self.block(x)
        if self.use_res:
            r = self.stochastic_depth(r)
            r += x
        return r


class EfficientNetB0(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = [
            (1, 3, 1, 32, 16, 1),
            (6, 3, 2, 16, 24, 2),
            (6, 5, 2, 24, 40, 2),
            (6, 3, 2, 40, 80, 3),
            (6, 5, 1, 80, 112, 3),
            (6, 5, 2, 112, 192, 4),
            (6, 3, 1, 192, 320, 1),
        ]
        layers = [cna(3, 32, 3, 2)]
        for e, k, s, i, o, n in cfg:
            stage = [MBConv(i if j == 0 else o, o, k, s if j == 0 else 1, e, 0.2 * j / 16) for j in range(n)]
            layers.append(nn.Sequential(*stage))
        layers.append(cna(320, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(1280, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MobileNetV3Small(nn.Module):
    def __init__(self):
        super().__init__()
        HS, RE = nn.Hardswish, nn.ReLU
        # (in, kernel, expanded, out, se, act, stride)
        cfg = [
            (16, 3, 16, 16, True, RE, 2),
            (16, 3, 72, 24, False, RE, 2),
            (24, 3, 88, 24, False, RE, 1),
            (24, 5, 96, 40, True, HS, 2),
            (40, 5, 240, 40, True, HS, 1),
            (40, 5, 240, 40, True, HS, 1),
            (40, 5, 120, 48, True, HS, 1),
            (48, 5, 144, 48, True, HS, 1),
            (48, 5, 288, 96, True, HS, 2),
            (96, 5, 576, 96, True, HS, 1),
            (96, 5, 576, 96, True, HS, 1),
        ]
        layers = [cna(3, 16, 3, 2, act=HS)]
        for i, k, ex, o, se, act, s in cfg:
            layers.append(V3Block(i, k, ex, o, se, act, s))
        layers.append(cna(96, 576, 1, act=HS))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True), nn.Linear(1024, 10)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _div(v, d=8):
    return max(d, int(v + d / 2) // d * d)


class V3Block(nn.Module):
    def __init__(self, i, k, ex, o, se, act, s):
        super().__init__()
        self.use_res = s == 1 and i == o
        layers = []
        if ex != i:
            layers.append(cna(i, ex, 1, act=act))
        layers.append(cna(ex, ex, k, s, ex, act=act))
        if se:
            layers.append(SE(ex, _div(ex // 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(cna(ex, o, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        r = self.block(x)
        if self.use_res:
            r += x
        return r


class DenseLayer(nn.Module):
    def __init__(self, c, growth=32, bn_size=4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, inputs):
        prev = [inputs] if isinstance(inputs, torch.Tensor) else inputs
        concated = torch.cat(prev, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n, c, growth=32):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", DenseLayer(c + i * growth, growth))

    def forward(self, init):
        features = [init]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, i, o):
        super().__init__()
        self.norm = nn.BatchNorm2d(i)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(i, o, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    def __init__(self, blocks=(6, 12, 24, 16), growth=32, init=64):
        super().__init__()
        layers = [
            ("conv0", nn.Conv2d(3, init, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(init)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1)),
        ]
        self.features = nn.Sequential(OrderedDict(layers))
        c = init
        for i, n in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(n, c, growth))
            c += n * growth
            if i != len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(c, c // 2))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, 10)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


class ViTMLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    """torchvision's ViT block: pre-norm nn.MultiheadAttention and MLP, each added to the stream."""

    def __init__(self, heads: int, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMLP(dim, mlp_dim)

    def forward(self, input):
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, tokens: int, layers: int, heads: int, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(
            OrderedDict((f"encoder_layer_{i}", EncoderBlock(heads, dim, mlp_dim)) for i in range(layers))
        )
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, input):
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """vit_b_16's structure (patch embedding by a strided conv, reshape + permute to tokens, a
    class token concatenated along the tokens, position embedding, pre-norm blocks, the class
    token's output read by the head), at any size."""

    def __init__(self, image_size=64, patch_size=16, layers=12, heads=12, dim=768, mlp_dim=3072) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, dim
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder(tokens, layers, heads, dim, mlp_dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, 10)))

    def _process_input(self, x):
        n, c, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        n_h, n_w = h // p, w // p
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)

    def forward(self, x):
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


FAMILIES = {
    "resnet50": lambda: ResNeXt(groups=1, width_per_group=64),
    "resnext50_32x4d": lambda: ResNeXt(),
    "regnet_x_400mf": lambda: RegNet([1, 2, 7, 12], [32, 64, 160, 400], 16, 0.0),
    "regnet_y_400mf": lambda: RegNet([1, 3, 6, 6], [48, 104, 208, 440], 8, 0.25),
    "efficientnet_b0": EfficientNetB0,
    "mobilenet_v3_small": MobileNetV3Small,
    "densenet121": DenseNet,
    "vit_b_16": lambda: VisionTransformer(image_size=64),
}
