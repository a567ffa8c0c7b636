"""Small models of the shapes users bring, for tests: residuals, branches, norms, functional
calls, several inputs, attention."""

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.c(F.gelu(self.b(torch.relu(self.a(x)))))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        return self.head(torch.flatten(F.relu(self.conv2(x)), 1))


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(5, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 1, stride=2)
        self.c3 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.down(x) + self.c3(x))
        return self.head(x.mean((2, 3)))


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1, self.b2 = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 3, padding=1)
        self.mix = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.cat([torch.relu(self.b1(x)), torch.relu(self.b2(x))], dim=1)
        return self.head(F.adaptive_avg_pool2d(torch.relu(self.mix(x)), 1).flatten(1))


class Mixer(nn.Module):
    def __init__(self, tokens=4, dim=6):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 8), nn.GELU(), nn.Linear(8, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 10), nn.GELU(), nn.Linear(10, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, tokens, dim)
        x = x + self.token_mlp(self.norm(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mlp(self.norm(x))
        return self.head(x.mean(1))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 12) * 0.3)
        self.b1 = nn.Parameter(torch.zeros(6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.w1, self.b1)))


class MobileBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(2, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 4, 1)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.project(F.relu6(self.depthwise(F.relu6(self.expand(x)))))
        return self.head(self.drop(x.mean((2, 3))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 5), nn.Linear(4, 5)
        self.hidden = nn.Linear(10, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x, extra):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(extra))], dim=1)
        return self.out(torch.relu(self.hidden(h)))


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x):  # (B, tokens, 6)
        h = self.embed(x)
        h, _ = self.attention(h, h, h)
        return self.fc2(torch.relu(self.fc1(h.mean(1))))


class LayerScale(nn.Module):
    """A residual stream with a broadcast term (like a position embedding) and a per-channel
    layer scale on the branch (ConvNeXt-style)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 4, 1, 1) * 0.1)
        self.c1, self.c2 = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.gamma = nn.Parameter(torch.full((4, 1, 1), 0.5))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x)) + self.pos
        h = h + self.gamma * self.c2(torch.relu(self.c1(h)))
        return self.head(h.mean((2, 3)))


class DenseBlock(nn.Module):
    """DenseNet-style: every layer reads the concatenation of all earlier features through a
    BatchNorm, so per-channel tensors sit after concatenations at every offset."""

    def __init__(self, growth=3):
        super().__init__()
        self.conv0 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(4)
        self.norm1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, growth, 3, padding=1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 + growth), nn.Conv2d(4 + growth, growth, 3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(4 + 2 * growth)
        self.head = nn.Linear(4 + 2 * growth, 3)

    def forward(self, x):  # as torchvision's DenseNet: each layer concatenates all earlier features
        features = [self.norm0(self.conv0(x))]
        features.append(self.conv1(F.relu(self.norm1(torch.cat(features, 1)))))
        features.append(self.conv2(F.relu(self.norm2(torch.cat(features, 1)))))
        return self.head(F.relu(self.norm3(torch.cat(features, 1))).mean((2, 3)))


class DenseNetBlocks(nn.Module):
    """torchvision's DenseNet in small: a pooled stem, dense layers with a 1x1 bottleneck reading
    the concatenation of all earlier features, a transition (BN, ReLU, 1x1 conv, average pool)
    whose output starts the next block's concatenations."""

    def __init__(self, stem: int = 4, growth: int = 2, bottleneck: int = 4) -> None:
        super().__init__()
        self.conv0, self.norm0 = nn.Conv2d(2, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem)
        self.pool0 = nn.MaxPool2d(2)

        def dense_layer(inputs: int) -> nn.Sequential:
            return nn.Sequential(
                nn.BatchNorm2d(inputs),
                nn.ReLU(),
                nn.Conv2d(inputs, bottleneck, 1, bias=False),
                nn.BatchNorm2d(bottleneck),
                nn.ReLU(),
                nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False),
            )

        self.block1 = nn.ModuleList([dense_layer(stem), dense_layer(stem + growth)])
        wide = stem + 2 * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(wide), nn.ReLU(), nn.Conv2d(wide, stem, 1, bias=False), nn.AvgPool2d(2)
        )
        self.block2 = nn.ModuleList([dense_layer(stem)])
        self.norm5 = nn.BatchNorm2d(stem + growth)
        self.head = nn.Linear(stem + growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.pool0(F.relu(self.norm0(self.conv0(x))))]
        for layer in self.block1:
            features.append(layer(torch.cat(features, 1)))
        features = [self.transition(torch.cat(features, 1))]
        for layer in self.block2:
            features.append(layer(torch.cat(features, 1)))
        return self.head(F.relu(self.norm5(torch.cat(features, 1))).mean((2, 3)))


class InceptionCeil(nn.Module):
    """GoogLeNet-style: a stem into a MaxPool2d with ceil_mode (8x8 from 16x16), then
    branches joined by concatenation, one of them a 3x3 max pool with padding."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.b1 = nn.Conv2d(4, 3, 1)
        self.b2 = nn.Conv2d(4, 3, 3, padding=1)
        self.branch_pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        self.b3 = nn.Conv2d(4, 2, 1)
        self.mix = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):  # (B, 2, 16, 16): the ceil-mode pool gives 8x8 where floor would give 7x7
        x = self.pool(F.relu(self.stem(x)))
        x = torch.cat([F.relu(self.b1(x)), F.relu(self.b2(x)), F.relu(self.b3(self.branch_pool(x)))], 1)
        x = F.avg_pool2d(F.relu(self.mix(x)), 2, ceil_mode=True)
        return self.head(torch.flatten(x, 1))


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """A branch dropped per sample in training only, as torchvision.ops.stochastic_depth."""
    if not training or p == 0.0:
        return x
    keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


torch.fx.wrap("stochastic_depth")  # what torchvision does: the call is one node, `training` its argument


class DropPath(nn.Module):
    """torchvision's StochasticDepth: `self.training` is read at every call and passed on."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        return stochastic_depth(x, self.p, self.training)


class StochasticDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.drop_path = DropPath(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.drop_path(self.c2(F.relu(self.c1(x))))
        return self.head(x.mean((2, 3)))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, in short: a BatchNorm that picks batch or running statistics from
    `self.training` in its own forward, then an activation."""

    def forward(self, x):
        if self.training:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * x.var((0, 2, 3)))
        else:
            mean, var = self.running_mean, self.running_var
        x = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        return F.relu(x * self.weight[None, :, None, None] + self.bias[None, :, None, None])


class ConvBNAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1, bias=False), BatchNormAct(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(F.relu(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))


class RootDropout(nn.Module):
    """Dropout called as a function in the model's own forward, with `training=self.training`
    (on the scores: their width is fixed, so a grown model draws the same mask)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x):
        return F.dropout(self.b(torch.relu(self.a(x))), 0.3, self.training)


class AttentionBlock(nn.Module):
    """A transformer block: LayerNorm, multi-head attention added to the stream, an MLP."""

    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(dim, 12), nn.Linear(12, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, tokens, 6)
        h = self.embed(x)
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.head(h.mean(1))


class Activations(nn.Module):
    """Element-wise ops in every form users write them: modules (with parameters: PReLU, ELU's
    alpha, a Hardtanh range), F.* and torch.* calls, in-place and tensor-method forms, and a
    residual stream through zero-at-zero ops."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.d, self.e, self.f = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.hardswish, self.prelu, self.elu = nn.Hardswish(), nn.PReLU(), nn.ELU(alpha=0.5)
        self.mish, self.range = nn.Mish(), nn.Hardtanh(-2.0, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hardswish(self.a(x))
        h = F.hardsigmoid(self.b(h))
        h = self.prelu(self.c(h))
        h = h + F.gelu(self.d(h), approximate="tanh")  # a stream: GELU(0) = 0
        h = h + self.mish(F.leaky_relu(self.e(h), 0.2))
        h = self.elu(self.f(h)).relu_()
        h = torch.special.expit(F.softsign(self.range(h))) * 2.0
        return self.head(F.selu(h))


class SEMBConv(nn.Module):
    """An EfficientNet / MobileNetV3 block: 1x1 expansion, depthwise 3x3, squeeze-excitation
    (pooled, reduced, expanded, a sigmoid gate multiplying the channels), 1x1 projection, a
    residual stream."""

    def __init__(self, channels: int = 4, expand: int = 8, squeeze: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.expand = nn.Conv2d(channels, expand, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(expand)
        self.depthwise = nn.Conv2d(expand, expand, 3, padding=1, groups=expand, bias=False)
        self.bn2 = nn.BatchNorm2d(expand)
        self.reduce = nn.Conv2d(expand, squeeze, 1)
        self.restore = nn.Conv2d(squeeze, expand, 1)
        self.project = nn.Conv2d(expand, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = F.silu(self.bn1(self.expand(x)))
        h = F.silu(self.bn2(self.depthwise(h)))
        gate = torch.sigmoid(self.restore(F.silu(self.reduce(F.adaptive_avg_pool2d(h, 1)))))
        x = x + self.bn3(self.project(h * gate))
        return self.head(x.mean((2, 3)))


class ResNeXtBlock(nn.Module):
    """A ResNeXt bottleneck: 1x1 reduction, a grouped 3x3 conv (4 groups of 2 channels), 1x1
    expansion, BatchNorm after each, a residual stream."""

    def __init__(self, channels: int = 6, width: int = 8, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.reduce = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = F.relu(self.bn1(self.reduce(x)))
        h = F.relu(self.bn2(self.grouped(h)))
        x = F.relu(x + self.bn3(self.expand(h)))
        return self.head(x.mean((2, 3)))


class RegNetYBlock(nn.Module):
    """A RegNetY block: a grouped 3x3 conv (strided, with a bias, no BatchNorm after it) gated by
    squeeze-excitation, then a 1x1 projection read by a flattening head."""

    def __init__(self, width: int = 6, groups: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, width, 1)
        self.grouped = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=groups)
        self.reduce = nn.Conv2d(width, 2, 1)
        self.restore = nn.Conv2d(2, width, 1)
        self.project = nn.Conv2d(width, 4, 1)
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.silu(self.grouped(h))
        gate = torch.sigmoid(self.restore(F.relu(self.reduce(h.mean((2, 3), keepdim=True)))))
        h = F.relu(self.project(h * gate))
        return self.head(h.flatten(1))


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block as torchvision writes it: a patchify stem, a depthwise 7x7 conv, then
    channels-last (permute) LayerNorm and a pointwise MLP of Linears, permuted back, a layer
    scale, a residual stream. The MLP's hidden width grows; the stream reaches a LayerNorm
    through a depthwise conv, which growth cannot keep exact, and says so."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, dim, 2, stride=2)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.pwconv2(F.gelu(self.pwconv1(h))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * h
        return self.head(x.mean((2, 3)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    """A ShuffleNet v2 unit (stride 1): the channels split in two, one half through a 1x1 ->
    depthwise 3x3 -> 1x1 branch, concatenated back with the other and shuffled. The branch's
    inner width grows; the split and the shuffle rearrange the units, and growc says so."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        half = channels // 2
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        kept, through = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((kept, self.branch(through)), dim=1), 2)
        return self.head(x.mean((2, 3)))


class WindowAttention(nn.Module):
    """A Swin-style block on a channels-last map: LayerNorm, attention within 2x2 windows
    (partitioned and merged back with view / permute, heads split by reshape, SDPA), an MLP.
    The MLP's hidden width grows; the windows and heads rearrange the stream's units."""

    def __init__(self, dim: int = 6, heads: int = 2, window: int = 2) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.embed = nn.Linear(2, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2), nn.Linear(2, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2, H, W)
        x = self.embed(x.permute(0, 2, 3, 1))
        batch, height, width, dim = x.shape
        w = self.window
        windows = self.norm1(x).view(batch, height // w, w, width // w, w, dim)
        windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, dim)
        qkv = self.qkv(windows).reshape(windows.shape[0], w * w, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, w * w, dim)
        merged = self.proj(attended).view(batch, height // w, width // w, w, w, dim)
        x = x + merged.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, dim)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean((1, 2)))


class PatchTransformer(nn.Module):
    """A vision transformer as torchvision writes it: a strided conv's patches reshaped to tokens
    with the width as a number (`self.dim`), a class token concatenated along the tokens, a
    position embedding, a pre-norm block around nn.MultiheadAttention, the class token's output
    read by the head."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.dim = dim
        self.patches = nn.Conv2d(2, dim, kernel_size=4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.position = nn.Parameter(torch.randn(1, 5, dim) * 0.5)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Dropout(0.0), nn.Linear(16, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, 2, 8, 8): 4 patches
        n = x.shape[0]
        h = self.patches(x).reshape(n, self.dim, -1).permute(0, 2, 1)
        h = torch.cat([self.class_token.expand(n, -1, -1), h], dim=1) + self.position
        torch._assert(h.dim() == 3, f"expected (batch, tokens, width), got {h.shape}")  # as torchvision checks
        a = self.norm1(h)
        a, _ = self.attention(a, a, a, need_weights=False)
        h = h + a
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm(h)[:, 0])


def inputs_for(model: nn.Module, batch: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        MLP: [(12,)],
        PreNormStream: [(4, 5)],
        RMSNormStream: [(12,)],
        NormedHidden: [(12,)],
        PreNormTransformer: [(4, 5)],
        ConvBN: [(2, 8, 8)],
        ResBlock: [(2, 8, 8)],
        Inception: [(2, 8, 8)],
        Mixer: [(4, 6)],
        Functional: [(12,)],
        MobileBlock: [(2, 8, 8)],
        TwoInputs: [(12,), (4,)],
        WithAttention: [(4, 6)],
        LayerScale: [(2, 8, 8)],
        DenseBlock: [(2, 8, 8)],
        InceptionCeil: [(2, 16, 16)],
        StochasticDepth: [(2, 8, 8)],
        ConvBNAct: [(2, 8, 8)],
        AttentionBlock: [(4, 6)],
        RootDropout: [(12,)],
        Activations: [(12,)],
        SEMBConv: [(2, 8, 8)],
        DenseNetBlocks: [(2, 8, 8)],
        ResNeXtBlock: [(2, 8, 8)],
        RegNetYBlock: [(2, 8, 8)],
        ConvNeXtBlock: [(2, 8, 8)],
        ShuffleUnit: [(2, 8, 8)],
        WindowAttention: [(2, 8, 8)],
        PatchTransformer: [(2, 8, 8)],
    }[type(model)]
    return [torch.randn(batch, *s, generator=g) for s in shapes]


class PreNormStream(nn.Module):
    """A pre-norm transformer's MLP half over tokens (B, T, D): a position term, a residual
    stream that every block reads through its own LayerNorm, a final LayerNorm before the head."""

    def __init__(self, dim=6):
        super().__init__()
        self.embed, self.position = nn.Linear(5, dim), nn.Parameter(torch.randn(4, dim) * 0.5)
        self.norm1, self.up1, self.down1 = nn.LayerNorm(dim), nn.Linear(dim, 12), nn.Linear(12, dim)
        self.norm2, self.up2, self.down2 = nn.LayerNorm(dim), nn.Linear(dim, 12), nn.Linear(12, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):  # (B, 4 tokens, 5)
        h = self.embed(x) + self.position
        h = h + self.down1(F.gelu(self.up1(self.norm1(h))))
        h = h + self.down2(F.gelu(self.up2(self.norm2(h))))
        return self.head(self.norm(h).mean(-2))  # mean over tokens


class RMSNormStream(nn.Module):
    """The same with RMSNorm (LLaMA-style) and a ReLU MLP on vectors."""

    def __init__(self, dim=6):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.norm1, self.up, self.down = nn.RMSNorm(dim), nn.Linear(dim, 10), nn.Linear(10, dim)
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.down(torch.relu(self.up(self.norm1(h))))
        return self.head(self.norm(h))


class NormedHidden(nn.Module):
    """A LayerNorm inside a hidden layer: Linear -> LayerNorm -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(12, 7), nn.LayerNorm(7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class PreNormTransformer(nn.Module):
    """A pre-norm transformer block with attention written out (q, k, v and an output
    projection around F.scaled_dot_product_attention, heads by view/transpose) and a position
    term: the stream grows through both halves; the heads are left intact with the reason."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.position = nn.Linear(5, dim), nn.Parameter(torch.randn(4, dim) * 0.5)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 16), nn.Linear(16, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, 4 tokens, 5)
        b, t, _ = x.shape
        h = self.embed(x) + self.position
        a = self.norm1(h)
        q, k, v = (f(a).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.head(self.norm(h).mean(-2))


ZOO = [
    MLP,
    ConvBN,
    ResBlock,
    Inception,
    Mixer,
    Functional,
    MobileBlock,
    TwoInputs,
    WithAttention,
    LayerScale,
    DenseBlock,
    InceptionCeil,
    StochasticDepth,
    ConvBNAct,
    AttentionBlock,
    RootDropout,
    Activations,
    SEMBConv,
    DenseNetBlocks,
    PreNormStream,
    RMSNormStream,
    NormedHidden,
    PreNormTransformer,
    ResNeXtBlock,
    RegNetYBlock,
    ConvNeXtBlock,
    ShuffleUnit,
    WindowAttention,
    PatchTransformer,
]
