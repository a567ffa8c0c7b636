"""as_loader's batch indexing: the batches a plain DataLoader would give, and the data set behind it."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from growc.data import BatchIndexedTensors, as_loader, dataset_of


def _data(n: int = 203) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 4, generator=generator), torch.randint(0, 5, (n,), generator=generator))


def test_batches_equal_a_plain_loader_in_order_and_values():
    data = _data()
    for shuffle in (True, False):
        fast = as_loader(data, 16, shuffle=shuffle, seed=7)
        assert isinstance(fast.dataset, BatchIndexedTensors)
        plain = DataLoader(data, batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(7))
        for _ in range(2):  # the second epoch draws a new order from the same generator in both
            pairs = list(zip(fast, plain, strict=True))
            assert len(pairs) == 13
            for (x, y), (px, py) in pairs:
                assert torch.equal(x, px) and torch.equal(y, py)


def test_subclasses_keep_their_own_getitem():
    class Doubled(TensorDataset):
        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            return 2 * x, y

    data = Doubled(*_data(10).tensors)
    x, _ = next(iter(as_loader(data, 10, shuffle=False, seed=0)))
    assert torch.equal(x, 2 * data.tensors[0])


def test_dataset_of_gives_the_users_data_set():
    data = _data()
    assert dataset_of(as_loader(data, 8, shuffle=True, seed=0)) is data
    assert dataset_of(data) is data
