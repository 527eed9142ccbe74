"""Model, data and local training, identical to what fedmq's slaves do.

* model: ``torch.manual_seed(seed)`` then Linear(64,128), ReLU, Linear(128,10) (fedmq's
  ``mlp`` architecture builds exactly this ``nn.Sequential``, so the initial weights
  are bit-identical);
* data: the pixels of the saved `ReferenceSplit` that fedmq's slaves use, written by
  bench/vs_flower.py to one ``.npz`` (numpy only, so a ClientApp process does not need
  scikit-learn);
* training: like ``fedmq.slave.trainer.train_local`` — a copy of the received model,
  shuffling and the global RNG seeded with the round number (fedmq slaves use
  ``seed * 1_000_003 + round`` with seed 0), plain SGD, mean cross-entropy.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def load_partition(path: str, index: int) -> TensorDataset:
    with np.load(path, allow_pickle=False) as npz:
        bounds = np.cumsum(npz["slave_sizes"])
        start = 0 if index == 0 else int(bounds[index - 1])
        rows = npz["slave_rows"][start:int(bounds[index])]
        x, y = npz["train_x"][rows], npz["train_y"][rows]
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))


def load_test(path: str) -> TensorDataset:
    with np.load(path, allow_pickle=False) as npz:
        return TensorDataset(torch.from_numpy(npz["test_x"]), torch.from_numpy(npz["test_y"]))


def train(model: nn.Module, dataset: TensorDataset, *, epochs: int, batch_size: int, lr: float,
          seed: int) -> dict[str, float]:
    """Train `model` in place; the last epoch's mean loss, samples and seconds."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
        model.train()
        loss_sum, seen = 0.0, 0
        for _ in range(epochs):
            loss_sum, seen = 0.0, 0
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(y)
                seen += len(y)
    return {"train_loss": loss_sum / seen, "samples": seen, "seconds": time.perf_counter() - start}


def evaluate(model: nn.Module, dataset: TensorDataset) -> dict[str, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=512):
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    n = len(dataset)
    return {"accuracy": correct / n, "loss": loss_sum / n}
