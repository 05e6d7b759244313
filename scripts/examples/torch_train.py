"""A small PyTorch training objective with a DataLoader on synthetic data (CPU).

torch is an optional extra (``pip install 'optguard[torch]'``). Each epoch reports the
validation loss, so optguard checks the trial's limits between epochs; after every trial it
empties the CUDA cache when this objective has used CUDA.

    optguard run --study torch-demo --objective scripts/examples/torch_train.py:objective \
        --n-trials 10 --timeout 5m --max-rss 4GB
"""

from __future__ import annotations

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_SAMPLES = 1024
N_FEATURES = 16
EPOCHS = 4


def make_loaders(batch_size: int, num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=gen)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    train = TensorDataset(x[:768], y[:768])
    valid = TensorDataset(x[768:], y[768:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=num_workers),
        DataLoader(valid, batch_size=256, num_workers=num_workers),
    )


def objective(trial: optuna.Trial) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = trial.suggest_int("hidden", 8, 64, log=True)
    lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    batch_size = trial.suggest_categorical("batch_size", [32, 64, 128])
    train, valid = make_loaders(batch_size)
    model = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    val_loss = float("inf")
    for epoch in range(EPOCHS):
        model.train()
        for xb, yb in train:
            opt.zero_grad()
            loss_fn(model(xb.to(device)), yb.to(device)).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            losses = [loss_fn(model(xb.to(device)), yb.to(device)).item() for xb, yb in valid]
        val_loss = sum(losses) / len(losses)
        trial.report(val_loss, epoch)  # optguard checks its limits here
        if trial.should_prune():
            raise optuna.TrialPruned()
    return val_loss
