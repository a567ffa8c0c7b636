"""An MLP on MNIST, grown from two hidden layers of 2 neurons: 784 -> [2, 2] -> 10 to start with.

MNIST is not bundled: give the path of an .npz with x_train, y_train, x_test, y_test (uint8
28x28 images; see docs/data.md). The validation set is the 10,000 test images.

growc grow examples/mnist_mlp.py --data mnist:../shared/data/mnist.npz --batch-size 128 --final-epochs 10
growc export exported_models/mnist_mlp/model.safetensors --int8 static --data mnist:../shared/data/mnist.npz
"""

from torch import nn


class MnistMLP(nn.Module):
    def __init__(self, hidden: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], 10)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


model = MnistMLP  # no `data`: --data mnist:PATH gives the 784 features in [0, 1]
