"""A tiny pre-norm transformer on scikit-learn's digits: each 8x8 image is 16 tokens of 2x2
pixels, embedded in 8 dimensions, with a learnt position term, one block of two-head attention
(written out around F.scaled_dot_product_attention) and an MLP, a final LayerNorm and a mean over
tokens. The residual stream grows through every LayerNorm; so does the MLP's hidden width.

growc grow examples/digits_transformer.py
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from growc.data import digits


class DigitsTransformer(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2, hidden: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(4, dim)
        self.position = nn.Parameter(torch.randn(16, dim) * 0.1)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):  # (B, 16 tokens, 4 pixels)
        b, t, _ = x.shape
        h = self.embed(x) + self.position
        a = self.norm1(h)
        q, k, v = (f(a).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.head(self.norm(h).mean(-2))


model = DigitsTransformer


def data():
    """The digits as 16 tokens of 2x2 pixels, in reading order."""
    train, val = digits()

    def as_tokens(ds):
        images = ds.tensors[0].view(-1, 4, 2, 4, 2)  # (B, row block, row, column block, column)
        return TensorDataset(images.permute(0, 1, 3, 2, 4).reshape(-1, 16, 4), ds.tensors[1])

    return as_tokens(train), as_tokens(val)
