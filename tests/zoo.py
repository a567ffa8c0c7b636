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


def inputs_for(model: nn.Module, batch: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        MLP: [(12,)],
        ConvBN: [(2, 8, 8)],
        ResBlock: [(2, 8, 8)],
        Inception: [(2, 8, 8)],
        Mixer: [(4, 6)],
        Functional: [(12,)],
        MobileBlock: [(2, 8, 8)],
        TwoInputs: [(12,), (4,)],
        WithAttention: [(4, 6)],
        LayerScale: [(2, 8, 8)],
    }[type(model)]
    return [torch.randn(batch, *s, generator=g) for s in shapes]


ZOO = [MLP, ConvBN, ResBlock, Inception, Mixer, Functional, MobileBlock, TwoInputs, WithAttention, LayerScale]
