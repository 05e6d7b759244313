"""`optguard report --html FILE`: one self-contained page, checked as text and in a real
headless browser (Debian's chromium, installed by .ci/run; the browser test skips without it)."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, sqlite_url
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

CHROMIUM = Path("/usr/bin/chromium")
DIST = {"batch_size": CategoricalDistribution([32, 64, 128, 512])}
START = dt.datetime(2026, 1, 1, 12, 0, 0)


def _add(
    study: optuna.Study, state: TrialState, batch: int, seconds: float, **attrs: object
) -> None:
    trial = create_trial(
        state=state, value=1.0 + seconds / 100 if state == TrialState.COMPLETE else None,
        params={"batch_size": batch}, distributions=DIST,
        user_attrs={f"optguard.{k}": v for k, v in attrs.items()},
    )  # fmt: skip
    trial.datetime_start = START
    trial.datetime_complete = START + dt.timedelta(seconds=seconds)
    study.add_trial(trial)


def _build(url: str, name: str = "html-demo", worker: str = "h:2", reason: str = "memory") -> int:
    """Every kind of outcome; returns the number of the interrupted trial that is retried."""
    study = optuna.create_study(study_name=name, storage=url)
    study.set_user_attr("optguard.limits", {"timeout_s": 60.0, "max_rss_bytes": 400e6})
    for i in range(12):  # a steady worker and a leaking one
        _add(study, TrialState.COMPLETE, [32, 64, 128][i % 3], 5 + 3 * i, worker="h:1",
             final_rss_bytes=150e6, peak_rss_bytes=200e6 + 10e6 * i)  # fmt: skip
        _add(study, TrialState.COMPLETE, [32, 64, 128][i % 3], 8 + 2 * i, worker=worker,
             final_rss_bytes=150e6 + 20e6 * i, peak_rss_bytes=250e6 + 5e6 * i)  # fmt: skip
    for i in range(4):
        _add(study, TrialState.PRUNED, 512, 10 + i, reason=reason, worker="h:3",
             peak_rss_bytes=420e6 + 20e6 * i)  # fmt: skip
    _add(study, TrialState.PRUNED, 64, 61, reason="timeout", hard_kill=True)
    _add(study, TrialState.PRUNED, 32, 62, reason="timeout")
    _add(study, TrialState.PRUNED, 128, 30, reason="system_memory", peak_rss_bytes=380e6)
    _add(study, TrialState.PRUNED, 64, 12)  # the pruner's: no reason, no peak
    _add(study, TrialState.PRUNED, 32, 14)
    _add(study, TrialState.FAIL, 128, 3)  # an error in the objective
    interrupted = len(study.trials)
    _add(study, TrialState.FAIL, 64, 20, reason="interrupted")
    _add(study, TrialState.COMPLETE, 64, 22, retry_of=interrupted, peak_rss_bytes=300e6)
    return interrupted


def _page(tmp_path: Path, **build: str) -> tuple[str, int]:
    interrupted = _build(sqlite_url(tmp_path), **build)
    name = build.get("name", "html-demo")
    result = run_cli("report", "--study", name, "--html", "report.html", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "report page written to report.html" in result.stdout
    return (tmp_path / "report.html").read_text(encoding="utf-8"), interrupted


def _legend(html: str, title: str) -> str:
    chart = html.split(f'aria-label="{title}"', 1)[1].split("</svg>", 1)[0]
    return chart.split('class="legend"', 1)[1]


def test_html_page_is_self_contained_and_complete(tmp_path: Path) -> None:
    html, interrupted = _page(tmp_path)
    # self-contained: nothing fetched, no script
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?#)""", html)  # only in-page links
    assert "<script" not in html and "url(" not in html and "@import" not in html
    # the study, limits and outcome counts
    assert "<h1>optguard report: html-demo</h1>" in html
    assert "time limit per trial</td><td>60 s" in html
    assert "memory limit per trial</td><td>400 MB" in html
    assert "By state: 25 complete, 9 pruned, 2 failed." in html
    # what the guard ended and why, in sentences, with links to the trials
    assert (
        "4 trials</strong> went over the memory limit of 400 MB, and the guard ended them" in html
    )
    assert "Peak memory reached up to 480 MB." in html
    assert "2 trials</strong> ran past the time limit of 60 s" in html
    assert "Of the trials the guard ended, 1 was ended by the supervisor's hard kill" in html
    assert "1 trial</strong> was among the largest users of memory" in html
    assert "2 trials</strong> were pruned by the study's pruner, not by the guard" in html
    assert "1 trial</strong> failed with an error in the objective" in html
    # patterns, retries linked to the originals, every link has its anchor
    assert "Rule: Fisher&#x27;s exact test" in html
    assert f'<a href="#trial-{interrupted}">#{interrupted}</a></td><td>interrupted' in html
    for target in set(re.findall(r'href="#(trial-\d+)"', html)):
        assert f'id="{target}"' in html
    # memory per worker, the leak called out
    assert "LEAK: cleanup is not reclaiming" in html and "h:2 (LEAK)" in html
    assert "LEAK +220 MB" in html  # the note on the chart
    # charts: titles, axis labels with units, limit lines labelled as limits, legends
    assert html.count('<svg class="chart"') == 3
    assert html.count('class="limit"') == 2
    assert ">memory limit 400 MB</text>" in html and ">time limit 60 s</text>" in html
    for label in ("trial number", "peak memory (MB)", "duration (s)", "final memory (MB)"):
        assert f">{label}</text>" in html
    peak, duration = _legend(html, "Peak memory per trial"), _legend(html, "Duration per trial")
    for label in ("complete", "ended by the guard: memory", "memory limit 400 MB"):
        assert label in peak
    assert "pruned by the pruner" not in peak  # no points there: no legend entry
    for label in (
        "ended by the guard: timeout",
        "pruned by the pruner",
        "time limit 60 s",
        "failed (error in the objective)",
        "ended by the guard: system memory",
    ):
        assert label in duration
    # hover text with the reason
    assert re.search(r"<title>trial #\d+: ended by the guard: memory; reason: memory;", html)


def test_html_escapes_user_strings(tmp_path: Path) -> None:
    name = "<script>alert('x')</script>&"
    html, _ = _page(tmp_path, name=name, worker="<i>w</i>:1", reason="<u>odd</u>")
    assert "<script" not in html and "<i>w" not in html and "<u>odd" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in html
    assert "&lt;i&gt;w&lt;/i&gt;:1" in html and "&lt;u&gt;odd&lt;/u&gt;" in html


def test_html_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    _build(sqlite_url(tmp_path))
    result = run_cli("report", "--study", "html-demo", "--html", "nope/r.html", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "optguard: error: --html: cannot write nope/r.html: directory nope does not exist"
    ]


def _chromium(*args: str, page: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={cwd / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
         *args, page.as_uri()],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.scenario
def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.skip("no /usr/bin/chromium (apt-get install chromium; .ci/run installs it)")
    import matplotlib.image

    _page(tmp_path)
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", page=page, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines()
               if re.search(r"CONSOLE[(:]|Uncaught", line)]  # fmt: skip
    assert console == [], console
    pixels = matplotlib.image.imread(shot)[..., :3]  # floats in 0..1
    assert pixels.shape[:2] == (2400, 1280)
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert 0.02 < non_white < 0.9, non_white  # text, tables and charts, not a blank page
    assert pixels.std() > 0.05
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.2) & (pixels[..., 2] < 0.2)
    assert red.sum() > 200  # the limit lines, the leak and its label drew

    dom = _chromium("--dump-dom", page=page, cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in (
        "optguard report: html-demo",
        "memory limit 400 MB",
        "time limit 60 s",
        "LEAK: cleanup is not reclaiming",
        "pruned by the pruner",
    ):
        assert text in dom.stdout, text
