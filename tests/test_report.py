"""`optguard report` on a study built with known outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from conftest import run_cli, sqlite_url

DIST = {"batch_size": CategoricalDistribution([32, 64, 128, 512])}
KEYS = {"study", "states", "guard_prunes", "retries", "memory_trend", "patterns", "hard_kills",
        "tags", "slowest", "closest_to_limits", "limits", "best", "points"}  # fmt: skip


def _add(study: optuna.Study, state: TrialState, batch: int, **attrs: object) -> None:
    study.add_trial(create_trial(
        state=state, value=1.0 if state == TrialState.COMPLETE else None,
        params={"batch_size": batch}, distributions=DIST,
        user_attrs={f"optguard.{k}": v for k, v in attrs.items()},
    ))  # fmt: skip


def _build(url: str) -> None:
    study = optuna.create_study(study_name="known", storage=url)
    study.set_user_attr("optguard.limits", {"timeout_s": 100.0, "max_rss_bytes": 1e9})
    for i in range(20):  # a steady worker and a leaking one, 20 trials each
        _add(study, TrialState.COMPLETE, [32, 64, 128][i % 3], worker="h:1",
             final_rss_bytes=100e6, peak_rss_bytes=200e6)  # fmt: skip
        _add(study, TrialState.COMPLETE, [32, 64, 128][i % 3] if i else 512, worker="h:2",
             final_rss_bytes=100e6 + 5e6 * i, tag="fix-1", peak_rss_bytes=900e6 if i == 3 else 1e8)
    for i in range(10):  # 9 of 10 memory prunes with batch_size=512
        _add(study, TrialState.PRUNED, 512 if i else 64, reason="memory", worker="h:3")
    _add(study, TrialState.PRUNED, 64, reason="timeout", hard_kill=True, enforcement="hard_kill")
    _add(study, TrialState.PRUNED, 32, reason="timeout", enforcement="interrupt")
    _add(study, TrialState.FAIL, 128, reason="interrupted")
    _add(study, TrialState.COMPLETE, 128, retry_of=52)


def test_report_numbers_and_json(tmp_path: Path) -> None:
    _build(sqlite_url(tmp_path))
    result = run_cli("report", "--study", "known", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert KEYS <= set(data)
    assert data["states"] == {"COMPLETE": 41, "PRUNED": 12, "FAIL": 1}
    assert data["guard_prunes"] == {"memory": 10, "timeout": 2, "interrupted": 1}
    assert data["hard_kills"] == 1
    assert data["retries"]["count"] == 1 and data["retries"]["outcomes"] == {"COMPLETE": 1}
    assert data["retries"]["trials"][0]["retry_of"] == 52
    assert data["tags"]["fix-1"] == {"COMPLETE": 20}
    trend = data["memory_trend"]
    assert trend["h:2"]["leak"] is True and trend["h:2"]["growth_mb_per_trial"] == 5.0
    assert trend["h:1"]["leak"] is False and trend["h:1"]["growth_mb_per_trial"] == 0.0
    (pattern,) = data["patterns"]
    assert pattern["text"].startswith("batch_size=512: 9 of 10 memory prunes, 1 of 41 completed")
    assert pattern["p_value"] * pattern["tests"] < 0.01
    assert data["pattern_rule"].startswith("Fisher's exact test, one-sided, p < 0.01")
    assert data["closest_to_limits"]["memory"][0]["fraction"] == 0.9
    assert all(p["peak_mb"] is None or p["peak_mb"] > 0 for p in data["points"])


def test_report_text_and_plots(tmp_path: Path) -> None:
    _build(sqlite_url(tmp_path))
    result = run_cli("report", "--study", "known", "--plot", "mem.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "LEAK: cleanup is not reclaiming" in result.stdout
    assert "+5.00 MB/trial" in result.stdout
    assert "Pattern: batch_size=512: 9 of 10 memory prunes" in result.stdout
    assert "Patterns: rule: Fisher's exact test" in result.stdout  # says which rule it used
    assert "Leak rule: final memory after cleanup grew at least 50 MB" in result.stdout
    png = (tmp_path / "mem.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert run_cli("report", "--study", "known", "--plot", "mem.html", cwd=tmp_path).returncode == 0
    html = (tmp_path / "mem.html").read_text()
    assert html.count("<svg") == 3 and html.count("<circle") > 100
    bad = run_cli("report", "--study", "known", "--plot", "mem.pdf", cwd=tmp_path)
    assert bad.returncode == 2 and "must end in .png or .html" in bad.stderr


def test_report_unknown_study(tmp_path: Path) -> None:
    result = run_cli("report", "--study", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "no study named 'nope'" in result.stderr
    assert not (tmp_path / "optguard.db").exists()


def test_infinite_values_are_strict_json_and_shown_in_text(tmp_path: Path) -> None:
    """``Infinity`` is not JSON (jq refuses it), and rich would read "[inf, 5]" as markup."""
    study = optuna.create_study(
        study_name="m[x]", storage=sqlite_url(tmp_path), directions=["minimize", "minimize"]
    )
    study.add_trial(create_trial(values=[float("inf"), 5.0]))
    study.add_trial(create_trial(values=[1.0, 6.0]))
    result = run_cli("report", "--study", "m[x]", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    data = json.loads(result.stdout, parse_constant=refuse)
    points = {row["trial"]: row["values"] for row in data["best_trials"]}
    assert points == {0: ["inf", 5.0], 1: [1.0, 6.0]}
    text = run_cli("report", "--study", "m[x]", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "m[x] on " in text.stdout and "#0: [inf, 5]" in text.stdout
