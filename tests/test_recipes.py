"""The cluster recipes in configs/: they parse, use only real options, hold no password; the
sbatch script's own per-node command survives a scheduler's SIGTERM-then-SIGKILL, and the
Kubernetes entrypoint, as PID 1, passes the kubelet's SIGTERM on to the workers."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from optuna.trial import TrialState

from conftest import REPO, load_trials, objective, sqlite_url

SBATCH = REPO / "configs" / "slurm-array.sbatch"
MANIFEST = REPO / "configs" / "k8s-indexed-job.yaml"
STOP_GRACE_S = 10  # optguard.supervision.escalation: cancel -> interrupt
GRACE_S = 20  # the test scheduler's SIGTERM -> SIGKILL: the node must be done well before


def _optguard_run_args(script: str) -> list[str]:
    """The words of the `optguard run ...` command in a shell script, continuation lines
    joined, up to its end (`&`, or the end of the line)."""
    joined = script.replace("\\\n", " ")
    (line,) = [
        ln for ln in joined.splitlines()
        if re.search(r"\boptguard run\b", ln) and not ln.lstrip().startswith("#")
    ]  # fmt: skip
    words = shlex.split(line.split("optguard run", 1)[1], comments=True)
    return [w for w in words if w != "&"]


def _options(args: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(args, args[1:] + [""]) if a.startswith("--")}


def _manifest() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(MANIFEST.read_text())


def _k8s_script(doc: dict[str, Any]) -> str:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    return command[2]


def _quantity(text: str) -> int:
    """A Kubernetes memory quantity (16Gi, 16G) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", text).groups()  # type: ignore[union-attr]
    power = "KMGT".index(unit[0]) + 1 if unit else 0
    return int(number) * ((1024 if unit and unit.endswith("i") else 1000) ** power)


@pytest.fixture(scope="module")
def run_options() -> set[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "optguard", "run", "--help"],
        capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    return set(re.findall(r"--[a-z][a-z-]*", help_text))


def test_sbatch_script_is_valid_bash() -> None:
    result = subprocess.run(
        ["bash", "-n", str(SBATCH)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    text = SBATCH.read_text()
    assert "#SBATCH --array=" in text and "#SBATCH --signal=TERM@" in text
    assert "exec srun" in text  # the step is what Slurm signals as a whole


def test_k8s_manifest_key_fields() -> None:
    doc = _manifest()
    spec = doc["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert doc["kind"] == "Job" and spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"]
    assert pod["restartPolicy"] == "Never" and spec["podReplacementPolicy"] == "Failed"
    env = {e["name"]: e for e in container["env"]}
    assert env["OPTGUARD_STORAGE"]["valueFrom"]["secretKeyRef"]["key"]
    assert env["WORKERS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    script = _k8s_script(doc)
    assert subprocess.run(["sh", "-n", "-c", script], check=False).returncode == 0
    opts = _options(_optguard_run_args(script))
    assert opts["--workers"] == "$WORKERS"
    # The grace outlasts optguard's worst case after a SIGTERM to the supervisor alone.
    kill_after = float(opts["--kill-after"].rstrip("s"))
    budget = float(opts["--checkpoint-budget"].rstrip("s"))
    worst = STOP_GRACE_S + budget + 1 + 2 * kill_after
    assert pod["terminationGracePeriodSeconds"] >= worst + 30
    # Guaranteed QoS, and room for every worker at the memory ceiling plus the supervisor.
    res = container["resources"]
    assert res["requests"] == res["limits"]
    workers = int(res["limits"]["cpu"])
    max_rss = float(opts["--max-rss"].removesuffix("GB")) * 1e9
    assert _quantity(res["limits"]["memory"]) >= workers * max_rss * 1.25 + 2**30


def test_recipes_use_only_real_options(run_options: set[str]) -> None:
    scripts = {"sbatch": SBATCH.read_text()}
    if (yaml := _yaml()) is not None:
        scripts["k8s"] = _k8s_script(yaml.safe_load(MANIFEST.read_text()))
    for name, script in scripts.items():
        used = {w for w in _optguard_run_args(script) if w.startswith("--")}
        assert used, name
        assert used <= run_options, f"{name}: unknown {sorted(used - run_options)}"
        assert "--storage" not in used, name  # from the environment, never argv


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        return None
    return yaml


@pytest.mark.parametrize("path", [SBATCH, MANIFEST], ids=["sbatch", "k8s"])
def test_recipes_hold_no_storage_url_or_password(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"\b(postgresql|mysql|sqlite|journal)[+\w]*:", text)
    assert not re.search(r"://[^\s/@]*:[^\s/@]+@", text)  # user:password@
    assert not re.search(r"password\s*[=:]", text, re.IGNORECASE)


# -- the scenario: two "nodes" run the sbatch script's own command; one is killed ------------


def _shims(tmp_path: Path) -> Path:
    """`srun` that runs its command (its own options dropped), and `optguard` as this
    interpreter's module: the script runs unchanged, with no Slurm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "optguard").write_text(f'#!/bin/bash\nexec {sys.executable} -m optguard "$@"\n')
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    return bin_dir


def _node(tmp_path: Path, task: int, study: str, storage: dict[str, str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTGUARD_", "SLURM_"))}
    env.update(
        PATH=f"{tmp_path / 'bin'}:{env['PATH']}", STUDY=study, N_TRIALS="6",
        OBJECTIVE=objective("steady.py:objective"), TIMEOUT="1m", MAX_RSS="2GB",
        HEARTBEAT="1s", SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID=str(task),
        SLURM_CPUS_PER_TASK="2", **storage,
    )  # fmt: skip
    return subprocess.Popen(
        ["bash", str(SBATCH)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _started(log_dir: Path) -> int:
    return sum(p.read_text().count(" started\n") for p in log_dir.glob("worker_*.log"))


def _scheduler_kill(node: subprocess.Popen[str], grace: float) -> None:
    """What slurmd does to a job step: SIGTERM to every process of it, SIGKILL to what is
    left after the grace. Only this node's tree, taken before the first signal. The node
    itself is waited for through its Popen: psutil would reap it and lose its exit code."""
    root = psutil.Process(node.pid)
    others = root.children(recursive=True)
    for proc in (root, *others):
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace
    try:
        node.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        node.kill()
    _, alive = psutil.wait_procs(others, timeout=max(0.0, deadline - time.monotonic()))
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.scenario
def test_a_node_killed_mid_trial_leaves_nothing_running_and_the_other_node_retries(
    tmp_path: Path, study_name: str
) -> None:
    _shims(tmp_path)
    url = sqlite_url(tmp_path)
    secret = tmp_path / "storage-url"
    secret.write_text(url + "\n")
    secret.chmod(0o600)
    a = _node(tmp_path, 0, study_name, {"OPTGUARD_STORAGE_FILE": str(secret)})
    b = _node(tmp_path, 1, study_name, {"OPTGUARD_STORAGE": url})
    try:
        deadline = time.monotonic() + 60
        while _started(tmp_path / "logs" / "77" / "task-0") < 2:
            assert time.monotonic() < deadline and a.poll() is None, a.communicate()
            time.sleep(0.05)
        root = psutil.Process(a.pid)  # bash exec'd srun exec'd optguard: the supervisor
        tree = [root, *root.children(recursive=True)]
        assert len(tree) >= 3  # the supervisor, its keeper and its 2 workers
        for proc in tree:  # the URL reached them through the environment and a pipe only
            assert "sqlite" not in " ".join(proc.cmdline())
        a_tags = {f"{os.uname().nodename}:{p.pid}" for p in root.children()}
        _scheduler_kill(a, GRACE_S)
        a.communicate(timeout=10)
        # 130, not -9: it ended on its own within the grace, before the scheduler's SIGKILL
        assert a.returncode == 130, "node A did not exit on its own within the grace"
        _, err = b.communicate(timeout=120)
        assert b.returncode == 0, err  # the others finish the study: its total is exact
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    trials = load_trials(url, study_name)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    lost = [t for t in trials if t.user_attrs.get("optguard.worker") in a_tags
            and "optguard.reason" in t.user_attrs]  # fmt: skip
    assert lost, "node A was killed mid-trial"
    for t in lost:  # each worker's own SIGTERM ended its trial: `interrupted`, not `cancelled`
        assert t.state == TrialState.PRUNED and t.user_attrs["optguard.reason"] == "interrupted"
    # Node B, still running, retried them (optguard.handover), once each: in the total's
    # slots while it was not reached, past it once it was (interrupted trials count).
    assert 6 <= len(trials) <= 6 + len(lost)
    retries = {t.user_attrs["optguard.retry_of"]: t for t in trials
               if "optguard.retry_of" in t.user_attrs}  # fmt: skip
    assert sorted(retries) == sorted(t.number for t in lost)
    for retry in retries.values():
        assert retry.state == TrialState.COMPLETE
        assert retry.user_attrs["optguard.worker"] not in a_tags  # run by node B
    # The next run of the recipe (a requeue) finds nothing missing: it runs nothing more.
    again = _node(tmp_path, 0, study_name, {"OPTGUARD_STORAGE_FILE": str(secret)})
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert len(load_trials(url, study_name)) == len(trials)


def _own_pid_namespace() -> bool:
    try:
        probe = ["unshare", "--pid", "--fork", "--mount-proc", "true"]
        return subprocess.run(probe, capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.scenario
@pytest.mark.skipif(not _own_pid_namespace(), reason="needs unshare --pid (root)")
def test_k8s_entrypoint_as_pid_1_turns_the_kubelets_sigterm_into_interrupts(
    tmp_path: Path, study_name: str
) -> None:
    """The manifest's script as PID 1 of its own pid namespace, SIGTERMed from outside as
    the kubelet does: the workers get it too, so their trials are `interrupted` (retried by
    the next run), not `cancelled`; the script exits with optguard's 130."""
    doc = _manifest()
    script = _k8s_script(doc).replace("/var/log/optguard", str(tmp_path / "k8s"))
    _shims(tmp_path)
    url = sqlite_url(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTGUARD_")}
    env.update(
        PATH=f"{tmp_path / 'bin'}:{env['PATH']}", STUDY=study_name, N_TRIALS="6",
        OBJECTIVE=objective("steady.py:objective"), WORKERS="2", JOB_COMPLETION_INDEX="0",
        OPTGUARD_STORAGE=url,
    )  # fmt: skip
    pod = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "/bin/sh", "-c", script],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while _started(tmp_path / "k8s" / "0") < 2:
            assert time.monotonic() < deadline and pod.poll() is None, pod.communicate()
            time.sleep(0.05)
        (init,) = psutil.Process(pod.pid).children()  # PID 1 inside: the script's sh
        init.send_signal(signal.SIGTERM)
        _, err = pod.communicate(timeout=GRACE_S)
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.communicate()
    assert pod.returncode == 130, err
    trials = load_trials(url, study_name)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    ended = {t.user_attrs.get("optguard.reason") for t in trials if t.state == TrialState.PRUNED}
    assert ended == {"interrupted"}
