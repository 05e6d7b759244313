"""The report's parameter patterns (Fisher's exact test) and leak flag, on planted trials."""

from __future__ import annotations

import random
from pathlib import Path

import optuna
import pytest
from conftest import sqlite_url
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from optguard.report import (
    _memory_trend,
    build_report,
    find_patterns,
    fisher_greater,
    is_leak,
    started_leaking,
)

BATCH = [16, 32, 64, 128, 256, 512]
DIST = {"batch_size": CategoricalDistribution(BATCH), "x": FloatDistribution(0.0, 1.0)}


def _trial(number: int, pruned: bool, batch: int, x: float, **attrs: object) -> FrozenTrial:
    t = create_trial(
        state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
        value=None if pruned else 1.0,
        params={"batch_size": batch, "x": x},
        distributions=DIST,
        user_attrs={f"optguard.{k}": v for k, v in attrs.items()},
    )
    t.number = number
    return t


def _planted(seed: int, guilty_completed: int = 1) -> list[FrozenTrial]:
    """70 completed trials on 4 workers; batch_size=512 ends in 4 memory prunes spread over
    h:0-h:2 (and completes ``guilty_completed`` times); h:3 steps 369 -> 1620 MB and its next
    6 trials are memory prunes with random batch sizes (the cascade)."""
    rng = random.Random(seed)
    rows = []  # (worker, pruned, batch, final_mb)
    for j in range(70):
        batch = 512 if j < guilty_completed else rng.choice(BATCH[:-1])
        rows.append((f"h:{j % 4}", False, batch, 369 + rng.uniform(-2, 2)))
    rows += [(f"h:{j % 3}", True, 512, 369 + rng.uniform(-2, 2)) for j in range(4)]
    rng.shuffle(rows)
    leaking = [r for r in rows if r[0] == "h:3"]
    rows = [r for r in rows if r[0] != "h:3"]
    leaking[-1] = ("h:3", False, leaking[-1][2], 1620.0)  # the step
    leaking += [("h:3", True, rng.choice(BATCH), 1620.0 + 20 * (k + 1)) for k in range(6)]
    merged, rest = [], iter(leaking)
    for k, row in enumerate(rows):  # h:3's trials interleaved in order with the others'
        merged.append(row)
        if k % 3 == 2 and (nxt := next(rest, None)):
            merged.append(nxt)
    merged += list(rest)
    return [
        _trial(i, pruned, batch, rng.random(), worker=worker, final_rss_bytes=mb * 1e6,
               **({"reason": "memory"} if pruned else {}))
        for i, (worker, pruned, batch, mb) in enumerate(merged)
    ]  # fmt: skip


def _noise(seed: int, n: int, share: float, cascade: bool = False) -> list[FrozenTrial]:
    """Memory prunes independent of the parameters (and, with ``cascade``, 6 more on a
    leaking worker at the end)."""
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        pruned = rng.random() < share
        trials.append(_trial(
            i, pruned, rng.choice(BATCH), rng.random(), worker=f"h:{i % 4}",
            final_rss_bytes=(369 + rng.uniform(-5, 5)) * 1e6,
            **({"reason": "memory"} if pruned else {}),
        ))  # fmt: skip
    if cascade:
        trials.append(_trial(n, False, rng.choice(BATCH), rng.random(), worker="h:3",
                             final_rss_bytes=1620e6))  # fmt: skip
        trials += [
            _trial(n + 1 + k, True, rng.choice(BATCH), rng.random(), worker="h:3",
                   final_rss_bytes=(1640 + 20 * k) * 1e6, reason="memory")
            for k in range(6)
        ]  # fmt: skip
    return trials


@pytest.mark.parametrize("guilty_completed", [0, 1, 3])
@pytest.mark.parametrize("seed", range(5))
def test_guilty_value_found_through_a_leaking_workers_cascade(
    seed: int, guilty_completed: int
) -> None:
    trials = _planted(seed, guilty_completed)
    assert sum(t.user_attrs.get("optguard.reason") == "memory" for t in trials) == 10
    found, tests = find_patterns(trials)
    assert [(f["param"], f["value"], f["reason"]) for f in found] == [
        ("batch_size", "512", "memory")
    ]
    row = found[0]
    assert (row["pruned"], row["pruned_total"], row["set_aside"]) == (4, 4, 6)
    assert row["completed"] == guilty_completed and row["tests"] == tests
    assert row["p_value"] * tests < 0.01 and row["p_adjusted"] == pytest.approx(
        row["p_value"] * tests
    )
    assert row["text"].startswith(
        "batch_size=512: 4 of 4 memory prunes (6 more on a worker already leaking not counted), "
        f"{guilty_completed} of 70 completed (Fisher p="
    )


def test_cascade_is_set_aside_by_worker_memory() -> None:
    trials = _planted(0)
    cascade = started_leaking(trials)
    leaking = [t for t in trials if t.user_attrs["optguard.worker"] == "h:3"]
    assert cascade == {t.number for t in leaking[-6:]}  # after the step, not the step itself


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("n", "share"), [(30, 0.2), (80, 0.12), (200, 0.1)])
def test_noise_gives_no_pattern(seed: int, n: int, share: float) -> None:
    assert find_patterns(_noise(seed, n, share))[0] == []
    assert find_patterns(_noise(seed, n, share, cascade=True))[0] == []


@pytest.mark.parametrize(
    "pruned",
    [
        [True, True, True, True],
        [True, True, False, True],
        [True, False, True, False],
    ],
)
def test_four_trials_give_no_pattern(pruned: list[bool]) -> None:
    """The issue's case: 4 trials, "x=[0.179, 0.591]: 2 of 4 memory prunes" was flagged."""
    xs = [0.179, 0.591, 0.33, 0.9]
    trials = [
        _trial(i, p, 512 if i < 3 else 64, x, worker="h:1", final_rss_bytes=369e6,
               **({"reason": "memory"} if p else {}))
        for i, (p, x) in enumerate(zip(pruned, xs))
    ]  # fmt: skip
    assert find_patterns(trials)[0] == []


@pytest.mark.parametrize(
    ("k", "n_value", "k_total", "n_total", "expected"),
    [
        (4, 4, 4, 74, 1 / 1150626),  # C(74, 4) ways, one of them all four
        (0, 10, 4, 74, 1.0),
        (5, 4, 4, 74, 0.0),
        (3, 4, 3, 4, 1.0),  # every trial ended: nothing to compare
        (2, 3, 2, 4, 0.5),
    ],
)
def test_fisher_table(k: int, n_value: int, k_total: int, n_total: int, expected: float) -> None:
    assert fisher_greater(k, n_value, k_total, n_total) == pytest.approx(expected)


def test_fisher_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    for _ in range(200):
        n_total = rng.randint(1, 300)
        k_total, n_value = rng.randint(0, n_total), rng.randint(0, n_total)
        k = rng.randint(max(0, k_total + n_value - n_total), min(k_total, n_value))
        table = [[k, n_value - k], [k_total - k, n_total - k_total - n_value + k]]
        expected = stats.fisher_exact(table, alternative="greater")[1]
        assert fisher_greater(k, n_value, k_total, n_total) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("final_mb", "leak"),
    [
        ([369, 1620], True),  # the step, at once
        ([369] * 6 + [1620], True),
        ([369, 370, 1620, 1625, 1630], True),
        ([100 + 5 * i for i in range(20)], True),  # +5 MB/trial from 100 MB
        ([1000 + 5 * i for i in range(40)], True),  # +5 MB/trial, steady, 20% of 1 GB
        ([369 + 0.1 * i for i in range(20)], False),  # the 0.1 MB/trial creep
        ([369 + 0.1 * i for i in range(400)], False),  # 40 MB over 400 trials
        ([1000 + 2 * i for i in range(20)], False),  # 38 MB: under the minimum
        ([369, 1620, 370], False),  # reclaimed: no leak
        ([400 + (3 if i % 2 else -3) for i in range(30)], False),  # noise
        ([369, 420, 421, 419, 420], False),  # one 51 MB warm-up step: 14%
        ([369], False),
        ([], False),
    ],
)
def test_leak_table(final_mb: list[float], leak: bool) -> None:
    assert is_leak([float(v) for v in final_mb]) is leak


def test_memory_trend_flags_the_step() -> None:
    trials = [
        _trial(i, False, 64, 0.5, worker="h:1", final_rss_bytes=mb * 1e6)
        for i, mb in enumerate([369, 369.5, 369.2, 1620])
    ] + [
        _trial(10 + i, False, 64, 0.5, worker="h:2", final_rss_bytes=(369 + 0.1 * i) * 1e6)
        for i in range(30)
    ]  # fmt: skip
    trend = _memory_trend(trials)
    assert trend["h:1"]["leak"] is True and trend["h:1"]["growth_mb"] == 1251.0
    assert trend["h:2"]["leak"] is False and trend["h:2"]["growth_mb"] == 2.9
    assert trend["h:2"]["growth_mb_per_trial"] == 0.1


def test_report_states_its_rules(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    study = optuna.create_study(study_name="planted", storage=url)
    for t in _planted(0):
        study.add_trial(t)
    data = build_report("planted", url)
    assert [p["value"] for p in data["patterns"]] == ["512"]
    tests = data["patterns"][0]["tests"]
    assert data["pattern_rule"] == (
        f"Fisher's exact test, one-sided, p < 0.01 after Bonferroni over {tests} tests (each "
        "value or quartile of each parameter, per guard reason), at least 3 prunes with the "
        "value; memory prunes on a worker already leaking are not counted"
    )
    assert data["memory_trend"]["h:3"]["leak"] is True
    assert "50 MB" in data["leak_rule"] and "25%" in data["leak_rule"]


def test_a_guilty_range_of_a_float_is_a_quartile() -> None:
    rng = random.Random(3)
    trials = []
    for i in range(60):
        x = rng.random()
        pruned = x > 0.8 and rng.random() < 0.7
        trials.append(_trial(i, pruned, rng.choice(BATCH), x, worker="h:1", final_rss_bytes=369e6,
                             **({"reason": "memory"} if pruned else {})))  # fmt: skip
    found, _ = find_patterns(trials)
    assert [(f["param"], f["value"]) for f in found] == [("x", "[0.83, 0.987]")]
    assert found[0]["pruned"] == 11 and found[0]["set_aside"] == 0
