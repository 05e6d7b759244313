"""Samplers, pruners and directions by name, as users write them on the command line;
which directions a run uses; the seed each worker's sampler gets."""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from optguard.errors import UsageError

if TYPE_CHECKING:
    import optuna

__all__ = [
    "SAMPLERS", "PRUNERS", "DIRECTIONS", "SAMPLER_PACKAGES", "make_sampler", "make_pruner",
    "PrunerSpec", "parse_pruner", "missing_pruner_packages", "missing_sampler_packages",
    "parse_directions", "resolve_directions", "worker_seed", "direction_names",
    "stored_directions", "SINGLE_OBJECTIVE_SAMPLERS", "sampler_error",
]  # fmt: skip

DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp", "nsga2")
PRUNERS = ("median", "none", "halving", "hyperband", "wilcoxon")
# What --pruner accepts, for its help and its errors.
PRUNER_FORMS = "median, none, halving, hyperband, wilcoxon[:P], patient:N[:PRUNER]"
# The optional packages each sampler imports lazily in Optuna 5 (at its first trial, so a
# missing one fails every trial): samplers/_cmaes.py imports cmaes, samplers/_qmc.py
# scipy.stats.qmc, samplers/_gp and optuna/_gp torch and scipy. Module name = pip name.
SAMPLER_PACKAGES: dict[str, tuple[str, ...]] = {
    "cmaes": ("cmaes",),
    "qmc": ("scipy",),
    "gp": ("torch", "scipy"),
}
# The samplers Optuna 5 refuses for a multi-objective study, at every trial's first suggest
# (``BaseSampler._raise_error_if_multi_objective``): CmaEsSampler alone. TPE, random, QMC, GP
# (log EHVI) and NSGA-II take several objectives.
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)


def sampler_error(sampler: str, n_objectives: int, option: str = "--sampler") -> str | None:
    """Why ``sampler`` cannot run a study with ``n_objectives`` objectives, or ``None``:
    Optuna would create the study and then fail every trial."""
    if sampler not in SINGLE_OBJECTIVE_SAMPLERS or n_objectives <= 1:
        return None
    return (
        f"{option} {sampler} needs a single-objective study: this one has {n_objectives} "
        "objectives (use tpe, nsga2, gp, qmc or random)"
    )


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


@dataclass(frozen=True)
class PrunerSpec:
    """A ``--pruner`` value, parsed: ``name`` (one of ``PRUNERS``), the p-value threshold of
    ``wilcoxon:P``, and the patience of ``patient:N[:PRUNER]``, which wraps ``name`` in
    Optuna's ``PatientPruner`` (``patient:N:none``: the patience alone, no wrapped pruner)."""

    name: str
    p_threshold: float | None = None
    patience: int | None = None

    @property
    def text(self) -> str:
        """The canonical form, as parsed back: what a worker is given."""
        base = self.name
        if self.p_threshold is not None:  # exactly the threshold asked for, not rounded
            base = f"{base}:{_exact(self.p_threshold)}"
        return base if self.patience is None else f"patient:{self.patience}:{base}"


def _exact(number: float) -> str:
    """The shortest text that parses back to exactly ``number`` (``repr``), ``1`` for 1.0."""
    return repr(number).removesuffix(".0")


def parse_pruner(value: str, option: str = "--pruner") -> PrunerSpec:
    """``median``, ``none``, ``halving``, ``hyperband``, ``wilcoxon``, ``wilcoxon:P``
    (0 < P <= 1, default 0.1), ``patient:N`` (N >= 1: ``PatientPruner`` around ``median``) or
    ``patient:N:PRUNER`` (around any of the others). ``UsageError`` names ``option``."""
    text = value.strip().lower()
    if text.startswith("patient:") or text == "patient":
        _, _, rest = text.partition(":")
        count, _, inner = rest.partition(":")
        try:
            patience = int(count)
        except ValueError:
            raise UsageError(
                f"{option}: patient:N needs a whole number of steps N, got {value!r}"
            ) from None
        if patience < 1:
            raise UsageError(f"{option}: patient:N needs N >= 1, got {value!r}")
        if inner.startswith("patient"):
            raise UsageError(f"{option}: patient:N cannot wrap another patient, got {value!r}")
        if rest.endswith(":"):
            raise UsageError(f"{option}: nothing after the last ':' in {value!r}")
        wrapped = parse_pruner(inner or "median", option)
        return PrunerSpec(wrapped.name, wrapped.p_threshold, patience)
    name, sep, arg = text.partition(":")
    if name not in PRUNERS:
        raise UsageError(f"{option} must be one of {PRUNER_FORMS}, got {value!r}")
    if not sep:
        return PrunerSpec(name)
    if name != "wilcoxon":
        raise UsageError(f"{option}: {name} takes no ':' argument, got {value!r}")
    try:
        p_threshold = float(arg)
    except ValueError:
        p_threshold = float("nan")
    if not 0.0 < p_threshold <= 1.0:  # NaN fails too
        raise UsageError(f"{option}: wilcoxon:P needs a p-value 0 < P <= 1, got {value!r}")
    return PrunerSpec(name, p_threshold)


def missing_pruner_packages(value: str) -> list[str]:
    """The packages pruner ``value`` needs that cannot be found: scipy for wilcoxon (its test
    is ``scipy.stats.wilcoxon``, imported at the first prune)."""
    if parse_pruner(value).name != "wilcoxon":
        return []
    return [p for p in ("scipy",) if importlib.util.find_spec(p) is None]


def parse_directions(values: Iterable[str], option: str) -> tuple[str, ...]:
    """``--direction`` repeated, ``--directions a,b`` or a config list as one tuple; each item
    may itself be a comma list. Empty: not given (the study's own, or minimize when new)."""
    directions = tuple(
        part.strip().lower() for value in values for part in value.split(",") if part.strip()
    )
    for direction in directions:
        if direction not in DIRECTIONS:
            raise UsageError(
                f"{option} must be one of {', '.join(DIRECTIONS)}, got {direction!r}"
            )
    return directions


def resolve_directions(
    given: Sequence[str], stored: Sequence[str] | None, study: str
) -> tuple[str, ...]:
    """The directions a run uses: those of an existing study (``stored``), which a run may
    repeat but never change (its trials' values would mean something else), else those given,
    else minimize."""
    if stored is None:
        return tuple(given) or ("minimize",)
    if given and tuple(given) != tuple(stored):
        raise UsageError(
            f"study {study!r} exists with direction {','.join(stored)}, not {','.join(given)}"
        )
    return tuple(stored)


def direction_names(directions: Iterable["optuna.study.StudyDirection"]) -> tuple[str, ...]:
    return tuple(d.name.lower() for d in directions)


def stored_directions(storage: "optuna.storages.BaseStorage", study: str) -> tuple[str, ...] | None:
    """The directions of study ``study`` in ``storage``, or ``None`` when there is none."""
    try:
        study_id = storage.get_study_id_from_name(study)
    except KeyError:
        return None
    return direction_names(storage.get_study_directions(study_id))


def worker_seed(seed: int, index: int, trials_before: int) -> int:
    """The sampler seed of one worker: a hash of the run's ``--seed``, the worker's index and
    the number of trials the study held when the worker started.

    Distinct (index, trials before) pairs get distinct seeds: the workers of one run differ
    by index, and a replacement worker by the trials before it once the study has grown since
    its predecessor started (one starting at the same count, or workers started by hand with
    the same index and count, get the same seed). A fresh study run again with the same seed
    and one worker gets the same seed, hence the same first trials. 32 bits: NumPy's limit.
    """
    digest = hashlib.sha256(f"optguard:{seed}:{index}:{trials_before}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(name: str, seed: int | None = None) -> "optuna.samplers.BaseSampler":
    import optuna.samplers as s

    factories: dict[str, Callable[..., s.BaseSampler]] = {
        "tpe": s.TPESampler,
        "random": s.RandomSampler,
        "cmaes": s.CmaEsSampler,
        "qmc": s.QMCSampler,
        "gp": s.GPSampler,
        "nsga2": s.NSGAIISampler,
    }
    return factories[name](seed=seed)


def make_pruner(value: str) -> "optuna.pruners.BasePruner":
    """The pruner of a ``--pruner`` value (``parse_pruner``'s forms)."""
    import optuna.pruners as p
    from optuna.exceptions import ExperimentalWarning

    spec = parse_pruner(value)
    factories: dict[str, Callable[[], p.BasePruner]] = {
        "median": p.MedianPruner,
        "none": p.NopPruner,
        "halving": p.SuccessiveHalvingPruner,
        "hyperband": p.HyperbandPruner,
        "wilcoxon": lambda: p.WilcoxonPruner(p_threshold=spec.p_threshold or 0.1),
    }
    with warnings.catch_warnings():
        # Wilcoxon and Patient are "experimental" in Optuna 5: chosen by name on purpose,
        # so no ExperimentalWarning in every worker log.
        warnings.simplefilter("ignore", category=ExperimentalWarning)
        if spec.patience is None:
            return factories[spec.name]()
        wrapped = None if spec.name == "none" else factories[spec.name]()
        return p.PatientPruner(wrapped, patience=spec.patience)
