"""A tiny MLP on scikit-learn's bundled digits: two hidden layers of 2 neurons to start with.

growc grow examples/digits_mlp.py
"""

from torch import nn


class DigitsMLP(nn.Module):
    def __init__(self, hidden: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], 10)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


model = DigitsMLP  # growc calls it to get the model; no `data`: --data digits is the default
