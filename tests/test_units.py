"""Units, URL masking, config validation: pure functions, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from optguard.config import resolve_options
from optguard.errors import ConfigError, StorageURLError, UsageError
from optguard.limits import format_gb, format_minutes, parse_duration, parse_size
from optguard.storage import mask_url, redact, resolve_url


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("30m", 1800.0), ("1.5h", 5400.0), ("45", 45.0), (2, 2.0), ("0.5s", 0.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "--timeout") == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MB", 512 * 10**6), ("12GB", 12 * 10**9), ("12GiB", 12 * 2**30), ("1000", 1000)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text, "--max-rss") == size


@pytest.mark.parametrize("bad", ["0", "-5s", "abc", "10 parsecs", "", "1e400h"])
def test_bad_duration_names_option(bad: str) -> None:
    with pytest.raises(UsageError, match="--timeout"):
        parse_duration(bad, "--timeout")


@pytest.mark.parametrize("bad", ["0", "-1GB", "12XB", "GB", "0.1"])
def test_bad_size_names_option(bad: str) -> None:
    with pytest.raises(UsageError, match="--max-rss"):
        parse_size(bad, "--max-rss")


def test_grep_formats() -> None:
    assert format_minutes(31.2 * 60) == "31.2min"
    assert format_gb(12.1e9) == "12.1GB"
    assert format_gb(2.34e9, 2) == "2.34GB"


def test_mask_and_redact_password() -> None:
    url = "postgresql://alice:s3cr3t@db.example/optuna"
    assert "s3cr3t" not in mask_url(url)
    assert mask_url(url) == "postgresql://alice:***@db.example/optuna"
    assert redact("login failed for s3cr3t", url) == "login failed for ***"
    assert "s3cr3t" not in mask_url("postgresql://alice:s3cr3t@[bad")


def test_resolve_url() -> None:
    assert resolve_url(None).endswith("/optguard.db")
    assert resolve_url("sqlite:///rel.db") == f"sqlite:///{Path('rel.db').resolve()}"
    with pytest.raises(StorageURLError, match="in-memory"):
        resolve_url("sqlite://")
    with pytest.raises(StorageURLError, match="unsupported storage backend 'redis'"):
        resolve_url("redis://localhost/0")


def test_config_merges_flags_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('study = "a"\nobjective = "m:f"\nworkers = 3\ntimeout = "2m"\n')
    opts = resolve_options({"workers": 5, "max_rss": "1GB", "study": None}, cfg)
    assert (opts.study, opts.workers) == ("a", 5)
    assert opts.limits.timeout_s == 120.0
    assert opts.limits.max_rss_bytes == 10**9


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('study = "a"\ncolour = "red"\n', "unknown key 'colour'"),
        ('study = "a"\nworkers = "two"\n', "workers must be int"),
        ('study = "a"\nworkers = true\n', "workers must be int"),
        ("study = [", "not valid TOML"),
    ],
)
def test_config_errors(tmp_path: Path, content: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=message):
        resolve_options({}, cfg)


def test_config_value_error_names_file_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('study = "a"\nobjective = "m:f"\nmax_rss = "lots"\n')
    with pytest.raises(UsageError, match=r"max_rss \(in .*c.toml\)"):
        resolve_options({}, cfg)
