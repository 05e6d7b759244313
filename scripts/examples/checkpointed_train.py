"""A PyTorch objective that checkpoints as it trains and resumes where it was stopped.

A retry of an interrupted or guard-killed trial (``optguard run --retry-pruned timeout`` after
a fix, or any ``interrupted`` trial on restart) gets the same checkpoint directory as the
trial it retries, so it continues from the last step saved instead of starting over. When
optguard ends a trial early (limit, cancel, Ctrl+C, a scheduler's SIGTERM), the
``on_interrupt`` callback saves the state it has reached first.

    optguard run --study ckpt-demo --objective scripts/examples/checkpointed_train.py:objective \
        --n-trials 10 --timeout 5m --retry-pruned timeout
"""

from __future__ import annotations

import optuna
import torch
from torch import nn

import optguard

N_SAMPLES = 1024
N_FEATURES = 16
BATCH = 64
EPOCHS = 4


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=gen)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    return x, y


def objective(trial: optuna.Trial) -> float:
    hidden = trial.suggest_int("hidden", 8, 64, log=True)
    lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    x, y = make_data()
    model = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    batches = N_SAMPLES // BATCH
    done = 0  # batches trained so far: the checkpoint step

    ckpt = optguard.checkpoints(trial, keep=2)  # checkpoints/<study>/trial-<original number>/
    last = ckpt.latest()
    if last is not None:  # a retry: pick up where the original trial stopped
        done, state = last
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    trial.set_user_attr("resumed_from", None if last is None else done)

    def snapshot() -> dict[str, object]:
        return {"model": model.state_dict(), "opt": opt.state_dict()}

    ckpt.on_interrupt(lambda: ckpt.save(snapshot(), done))  # the emergency checkpoint

    loss = float("inf")
    while done < EPOCHS * batches:
        i = done % batches
        xb, yb = x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        done += 1
        if done % batches == 0:  # an epoch: checkpoint, then report (optguard checks here)
            ckpt.save(snapshot(), done)
            with torch.no_grad():
                loss = loss_fn(model(x), y).item()
            trial.report(loss, done // batches)
    return loss
