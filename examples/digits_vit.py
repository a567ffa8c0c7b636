"""A tiny vision transformer on scikit-learn's digits, written the way torchvision writes ViT:
a strided conv cuts each 8x8 image into 16 patches of 2x2 pixels, reshaped to tokens with the
width as a number (`self.dim`), a class token concatenated in front, a learnt position
embedding, one pre-norm block around `nn.MultiheadAttention` and an MLP, and the head reading
the class token's output. growc writes the attention out (q, k, v, out_proj Linears), so the
token stream grows through the patch conv, the class token, the position embedding, every
LayerNorm and both blocks; so does the MLP's hidden width.

growc grow examples/digits_vit.py
"""

import torch
from torch import nn

from growc.data import digits


class DigitsViT(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2, hidden: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.patches = nn.Conv2d(1, dim, kernel_size=2, stride=2)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):  # (B, 64 pixels)
        n = x.shape[0]
        tokens = self.patches(x.view(n, 1, 8, 8)).reshape(n, self.dim, 16).permute(0, 2, 1)
        h = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1) + self.position
        a = self.norm1(h)
        a, _ = self.attention(a, a, a, need_weights=False)
        h = h + a
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm(h)[:, 0])


model = DigitsViT


def data():
    return digits()
