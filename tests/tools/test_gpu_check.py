"""The prepared GPU check runs end to end on the CPU (`--dry-run`), so it is known to work before a GPU is lent."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

STATUSES = {"pass", "fail", "skip", "error"}


@pytest.mark.slow
@pytest.mark.distributed
def test_dry_run_reports_every_check_and_target(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    checks = {c["check"]: c for c in summary["checks"]}
    assert list(checks) == ["setup", *gpu_check.CHECKS]
    for check in checks.values():
        assert check["status"] in STATUSES and check["targets"], check
        assert all(t["status"] in STATUSES for t in check["targets"]), check
    # Nothing errored: every check's code ran on the CPU. What the CPU can run, it ran and it passed.
    assert not [t for c in checks.values() for t in c["targets"] if t["status"] == "error"], done.stdout
    exactness = {t["name"]: t["status"] for t in checks["exactness"]["targets"]}
    assert exactness == {"fp32: grad = loss = hand loop": "pass", "bf16: grad = loss = hand loop": "pass",
                         "fp16: grad = loss = hand loop": "pass", "fp16: first step skipped by the GradScaler": "pass"}
    fsdp = {t["name"]: t["status"] for t in checks["fsdp2_2proc"]["targets"]}
    assert fsdp == {"runs as FSDP × 2": "pass", "penalty logged": "pass", "θ₀ sharded": "pass",
                    "resumed = uninterrupted": "pass"}
    assert {t["name"] for t in checks["bench_penalty"]["targets"]} == {
        "penalty op vs bandwidth bound", "faster than the naive loop", "no full-size temporary"}
    assert [t["name"] for t in checks["bench_step"]["targets"]] == ["step overhead (grad, bf16)"]
    # The summary printed last has one line per target; the benchmarks' sections came back for RESULTS.md.
    assert done.stdout.count("\n  ") == sum(len(c["targets"]) for c in checks.values())
    sections = (out / "RESULTS_cpu.md").read_text()
    assert "<!-- bench_penalty:cpu -->" in sections and "<!-- bench_step:cpu -->" in sections


def test_a_check_that_dies_keeps_what_it_decided_and_the_others_still_run(tmp_path, monkeypatch):
    """The orchestrator's bookkeeping, without running the real checks: each check is its own process."""
    calls = []

    def fake_run(command, timeout, env, log):
        name = command[command.index("--check") + 1]
        calls.append(name)
        with open(command[command.index("--result") + 1], "w") as f:  # exactness: only its first target
            json.dump({"targets": [gpu_check.target(f"{name} first", "pass")]}, f)
        return (None, "Segmentation fault") if name == "exactness" else (0, "")

    monkeypatch.setattr(gpu_check, "run_bounded", fake_run)
    args = gpu_check.argparse.Namespace(dry_run=True, out=tmp_path, budget=300, only=None)
    assert gpu_check.orchestrate(args) == 0
    assert calls == list(gpu_check.CHECKS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {c["check"]: c["status"] for c in summary["checks"]}
    assert status == {"setup": "skip", "exactness": "error", **{n: "pass" for n in list(gpu_check.CHECKS)[1:]}}
    exactness = summary["checks"][1]["targets"]
    assert [t["status"] for t in exactness] == ["pass", "error"]
    assert "killed" in exactness[1]["detail"] and "Segmentation fault" in exactness[1]["detail"]


def test_checks_past_the_time_budget_are_skipped_not_started(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "run_bounded", lambda *a: pytest.fail("no check may start"))
    args = gpu_check.argparse.Namespace(dry_run=True, out=tmp_path, budget=15, only=None)
    gpu_check.orchestrate(args)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["status"] for c in summary["checks"][1:]] == ["skip"] * len(gpu_check.CHECKS)
    assert "time budget" in (tmp_path / "summary.txt").read_text()
