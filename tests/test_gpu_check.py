"""``python -m dpo_kernels.tools.gpu_check``: its help, its CPU dry run and the sanitizer sweep's cases (on the CPU
backend here; the GPU sections themselves run only where a GPU is lent)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from dpo_kernels.tools import gpu_check


def test_help_lists_every_section():
    out = subprocess.run([sys.executable, "-m", "dpo_kernels.tools.gpu_check", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for section in gpu_check.SECTIONS:
        assert section in out
    assert "--dry-run" in out


def test_the_dry_run_states_plans_and_gemm_counts(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    llama = next(p for p in record["plans"] if p["head"]["name"] == "llama3" and p["dtype"] == "bfloat16")
    assert llama["backward_tile"] == [8192, 8192] and llama["vocab_chunks"] == 16
    assert llama["expected_gemms"] == {"forward": 16, "backward": 48}
    assert llama["backward_scratch_mib"] == 384
    assert abs(llama["dh_traffic_gb"] - 16 * 8 * 8192 * 4096 / 1e9) < 1e-9
    assert max(llama["chunk_widths"]) - min(llama["chunk_widths"]) <= 256
    assert record["dpo_batch"]["kept_tokens"] == 8 * (1024 - 256)


def test_without_a_gpu_it_refuses_unless_dry(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--sections", "policy"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_the_sweep_cases_pass_on_the_cpu_backend():
    assert gpu_check._sweep_child("cpu", ("cpu",), large=False) == 0


def test_interleaved_timing_warms_each_step_once_and_alternates_the_order(monkeypatch):
    calls = []
    fake_ms = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 6.0, 4.0])}

    def timed(step):
        name = step()
        return next(fake_ms[name]), {"a": 10.0, "b": 20.0}[name] + len(calls)

    def step(name):
        calls.append(name)
        return name

    monkeypatch.setattr(gpu_check, "_timed", timed)
    median, peaks = gpu_check._interleaved({"a": lambda: step("a"), "b": lambda: step("b")}, rounds=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then alternating rounds
    assert median == {"a": 2.0, "b": 5.0}
    assert peaks == {"a": 17.0, "b": 28.0}  # the largest of each name's rounds
