"""Samplers, pruners and directions by name, as users write them on the command line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import optuna

__all__ = ["SAMPLERS", "PRUNERS", "DIRECTIONS", "make_sampler", "make_pruner"]

DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp", "nsga2")
PRUNERS = ("median", "none", "halving", "hyperband")


def make_sampler(name: str) -> "optuna.samplers.BaseSampler":
    import optuna.samplers as s

    factories: dict[str, Callable[[], s.BaseSampler]] = {
        "tpe": s.TPESampler,
        "random": s.RandomSampler,
        "cmaes": s.CmaEsSampler,
        "qmc": s.QMCSampler,
        "gp": s.GPSampler,
        "nsga2": s.NSGAIISampler,
    }
    return factories[name]()


def make_pruner(name: str) -> "optuna.pruners.BasePruner":
    import optuna.pruners as p

    factories: dict[str, Callable[[], p.BasePruner]] = {
        "median": p.MedianPruner,
        "none": p.NopPruner,
        "halving": p.SuccessiveHalvingPruner,
        "hyperband": p.HyperbandPruner,
    }
    return factories[name]()
