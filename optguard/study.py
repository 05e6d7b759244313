"""Samplers, pruners and directions by name, as users write them on the command line."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import optuna

__all__ = [
    "SAMPLERS", "PRUNERS", "DIRECTIONS", "SAMPLER_PACKAGES", "make_sampler", "make_pruner",
    "missing_sampler_packages",
]  # fmt: skip

DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp", "nsga2")
PRUNERS = ("median", "none", "halving", "hyperband")
# The optional packages each sampler imports lazily in Optuna 5 (at its first trial, so a
# missing one fails every trial): samplers/_cmaes.py imports cmaes, samplers/_qmc.py
# scipy.stats.qmc, samplers/_gp and optuna/_gp torch and scipy. Module name = pip name.
SAMPLER_PACKAGES: dict[str, tuple[str, ...]] = {
    "cmaes": ("cmaes",),
    "qmc": ("scipy",),
    "gp": ("torch", "scipy"),
}


def missing_sampler_packages(name: str) -> list[str]:
    """The packages sampler ``name`` needs that cannot be found; nothing is imported (torch
    alone takes seconds and hundreds of MB)."""
    missing = []
    for package in SAMPLER_PACKAGES.get(name, ()):
        try:
            found = importlib.util.find_spec(package) is not None
        except ValueError:  # in sys.modules without a __spec__: it is there
            found = True
        if not found:
            missing.append(package)
    return missing


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
