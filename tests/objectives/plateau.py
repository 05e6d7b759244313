"""A scripted study: values 5, 4, 3, then 3 forever (a plateau); each trial's epoch loop is
cut short by optguard.EarlyStopping."""

import time

import optguard

SCRIPT = [5.0, 4.0, 3.0]


def objective(trial):
    trial.suggest_float("x", 0.0, 1.0)
    stopper = optguard.EarlyStopping(patience=2)
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.85, 0.7, 0.6]):
        trial.report(loss, epoch)
        if stopper.update(loss):
            break
    time.sleep(0.2)
    return SCRIPT[trial.number] if trial.number < len(SCRIPT) else 3.0
