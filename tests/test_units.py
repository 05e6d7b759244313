"""Units, URL masking, config validation: pure functions, no processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optguard.config import resolve_options
from optguard.errors import ConfigError, ObjectiveError, StorageURLError, UsageError
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


# -- issue 10, point 18: no part of a password is ever printed --------------------------------


def _pieces(secret: str) -> set[str]:
    """Every substring of three characters or more: none of them may be shown."""
    return {secret[i:j] for i in range(len(secret)) for j in range(i + 3, len(secret) + 1)}


MASKED = [
    # (url, its password, the masked form; None: unparseable, only checked for leaks)
    ("postgresql://alice:Sx9kQ@db.example/optuna", "Sx9kQ", "postgresql://alice:***@db.example/optuna"),
    ("postgresql://alice@db/optuna?password=Sx9kQ", "Sx9kQ", "postgresql://alice@db/optuna?password=***"),
    ("postgresql://alice@db/o?sslpassword=Sx9kQ&application_name=a+b", "Sx9kQ",
     "postgresql://alice@db/o?sslpassword=***&application_name=a+b"),
    ("mysql+pymysql://root@127.0.0.1:3306/test?passwd=Sx9kQ", "Sx9kQ",
     "mysql+pymysql://root@127.0.0.1:3306/test?passwd=***"),
    ("postgresql://u@h/db?PGPASSWORD=Sx9kQ&password=Sx9kQ", "Sx9kQ",
     "postgresql://u@h/db?PGPASSWORD=***&password=***"),
    ("postgresql://u:Sx9%40kQ@h:5432/db", "Sx9@kQ", "postgresql://u:***@h:5432/db"),
    ("postgresql://u:Sx9@kQ:w0r@127.0.0.1/test", "Sx9@kQ:w0r", "postgresql://u:***@127.0.0.1/test"),
    ("postgresql://u:Sx9@kQw0r@127.0.0.1/test", "Sx9@kQw0r", "postgresql://u:***@127.0.0.1/test"),
    ("postgresql://u:Sx/9@kQw@127.0.0.1/test", "Sx/9@kQw", "postgresql://u:***@127.0.0.1/test"),
    ("postgresql://u:Sx9@kQ/w0r@127.0.0.1/test", "Sx9@kQ/w0r", "postgresql://u:***@127.0.0.1/test"),
    ("postgresql://alice:Sx9kQ@[bad", "Sx9kQ", None),
    ("postgresql:/alice:Sx9kQ@host/db", "Sx9kQ", None),
    ("postgresql://u:Sx9@kQ@h/db?password=Pw7@zz", "Pw7@zz", None),
]  # fmt: skip


@pytest.mark.parametrize(("url", "password", "masked"), MASKED, ids=[m[0] for m in MASKED])
def test_mask_url_shows_no_password(url: str, password: str, masked: str | None) -> None:
    shown = mask_url(url)
    assert not {p for p in _pieces(password) if p in shown}, shown
    if masked is not None:
        assert shown == masked
    text = f"FATAL: login with {password} (or {password.replace('@', '%40')}) refused"
    assert not {p for p in _pieces(password) if p in redact(text, url)}, redact(text, url)


@pytest.mark.parametrize(
    ("url", "password"),
    [(m[0], m[1]) for m in MASKED if m[2] is None or ("@" in m[1] and "%40" not in m[0])],
)
def test_unparseable_url_is_a_usage_error_without_password(url: str, password: str) -> None:
    with pytest.raises(StorageURLError, match="cannot parse storage URL") as info:
        resolve_url(url)
    assert not {p for p in _pieces(password) if p in str(info.value)}, str(info.value)
    assert "\n" not in str(info.value)


def test_resolve_url_keeps_the_query_password_for_workers() -> None:
    url = resolve_url("postgresql://u@h/db?password=Sx9kQ&sslmode=disable")
    assert "password=Sx9kQ" in url and "sslmode=disable" in url


# -- point 21: one log file (and checkpoint directory) per study ------------------------------


def test_safe_name_keeps_safe_names_and_separates_the_others(tmp_path: Path) -> None:
    from optguard.checkpointing import study_dir
    from optguard.logs import safe_name, worker_log_path

    assert safe_name("exp-1.v2_a") == "exp-1.v2_a"
    pairs = [("exp/1", "exp 1"), ("学习", "実験"), ("a b", "a_b"), ("x?", "x*")]
    for a, b in pairs:
        assert safe_name(a) != safe_name(b)
        for name in (a, b):
            assert re.fullmatch(r"[A-Za-z0-9._-]+", safe_name(name))
        assert worker_log_path(tmp_path, a, "h", 0) != worker_log_path(tmp_path, b, "h", 0)
        assert study_dir(tmp_path, a) != study_dir(tmp_path, b)
    assert safe_name("exp/1").startswith("exp_1-")


def test_safe_name_is_stable_across_processes() -> None:
    """The name must not depend on the process (``hash()`` is salted per process)."""
    code = "from optguard.logs import safe_name; print(safe_name('exp/1'), safe_name('学习'))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONIOENCODING": "utf-8"},
        ).stdout  # fmt: skip
        for seed in ("1", "2")
    }
    from optguard.logs import safe_name

    assert outputs == {f"{safe_name('exp/1')} {safe_name('学习')}\n"}


# -- point 19: the objective target, checked without running it -------------------------------


def _module(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return str(path)


BOUND = {
    "def": "def fn(trial):\n    return 1\n",
    "async def": "async def fn(trial):\n    return 1\n",
    "class": "class fn:\n    pass\n",
    "assignment": "import functools\nfn = functools.partial(print)\n",
    "unpacking": "fn, other = print, print\n",
    "annotated": "fn: object = print\n",
    "import as": "from os.path import join as fn\n",
    "import": "import fn\n",
    "inside try": "try:\n    import numpy\nexcept ImportError:\n    pass\nelse:\n    def fn(t):\n"
                  "        return 1\n",
    "inside if": "if True:\n    fn = print\n",
    "for target": "for fn in [print]:\n    pass\n",
    "with as": "import contextlib\nwith contextlib.nullcontext(print) as fn:\n    pass\n",
    "walrus": "if (fn := print):\n    pass\n",
    "global in function": "def setup():\n    global fn\n    fn = print\nsetup()\n",
    "star import": "from os.path import *\n",
    "module __getattr__": "def __getattr__(name):\n    return print\n",
    "globals()": "globals()['f' + 'n'] = print\n",
}  # fmt: skip


@pytest.mark.parametrize("case", list(BOUND))
def test_check_target_accepts_bound_or_dynamic_names(tmp_path: Path, case: str) -> None:
    from optguard.objective import check_target

    marker = tmp_path / "executed"
    source = f"open({str(marker)!r}, 'w').close()\n" + BOUND[case]
    check_target(_module(tmp_path, "obj", source) + ":fn")
    assert not marker.exists()  # located and parsed, never run


@pytest.mark.parametrize(
    ("source", "attr", "message"),
    [
        ("def objective(t):\n    return 1\n", "objectiv",
         "has no attribute 'objectiv' (did you mean 'objective'?)"),
        ("def helper(t):\n    def fn(t):\n        return 1\n    return fn\n", "fn",
         "has no attribute 'fn'"),
        ("class C:\n    fn = print\n", "fn", "has no attribute 'fn'"),
        ("x = 1\n\ndef fn(t:\n    return 1\n", "fn", "obj.py:3: SyntaxError"),
        ("fn = 1\n\x00\n", "fn", "null bytes"),
    ],
)  # fmt: skip
def test_check_target_rejects(tmp_path: Path, source: str, attr: str, message: str) -> None:
    from optguard.objective import check_target

    with pytest.raises(ObjectiveError) as info:
        check_target(_module(tmp_path, "obj", source) + f":{attr}")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_check_target_modules_without_importing(tmp_path: Path) -> None:
    """``pkg.mod:fn`` is located through the package's path, never executing ``__init__``."""
    from optguard.objective import check_target

    package = tmp_path / "chaos_pkg_units"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('package executed')\n")
    (package / "mod.py").write_text("raise RuntimeError('module executed')\ndef fn(t):\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        check_target("chaos_pkg_units.mod:fn")
        with pytest.raises(ObjectiveError, match="chaos_pkg_units.mod has no attribute 'fm'"):
            check_target("chaos_pkg_units.mod:fm")
        with pytest.raises(ObjectiveError, match="objective module not found: chaos_pkg_units.no"):
            check_target("chaos_pkg_units.no:fn")
        with pytest.raises(ObjectiveError, match="objective module not found: no_such_pkg_xyz"):
            check_target("no_such_pkg_xyz.mod:fn")
        with pytest.raises(ObjectiveError, match="has no attribute 'fn'"):
            check_target("chaos_pkg_units:fn")
        check_target("math:sqrt")  # built in, no source to read: left to the import
        check_target("json:loads")  # a stdlib package's __init__.py
    finally:
        sys.path.remove(str(tmp_path))
    assert "chaos_pkg_units" not in sys.modules


# -- point 10: sampler dependencies -------------------------------------------------------------


def test_sampler_requirements_match_optuna_source() -> None:
    """The table must name what Optuna's samplers import lazily: read from its source, so an
    Optuna upgrade that adds or drops a dependency fails here."""
    import ast

    import optuna

    from optguard.study import SAMPLER_PACKAGES, SAMPLERS

    root = Path(optuna.__file__).parent
    sources = {
        "cmaes": [root / "samplers/_cmaes.py"],
        "qmc": [root / "samplers/_qmc.py"],
        "gp": [root / "samplers/_gp/sampler.py", *sorted((root / "_gp").glob("*.py"))],
    }

    def lazy_imports(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_LazyImport"
                    and isinstance(node.args[0], ast.Constant)):  # fmt: skip
                found.add(node.args[0].value.split(".")[0])
        return found - {"optuna"}

    for name in SAMPLERS:
        needed = set().union(*(lazy_imports(p) for p in sources.get(name, [])))
        assert set(SAMPLER_PACKAGES.get(name, ())) == needed, name
