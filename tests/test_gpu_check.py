"""``python -m dpo_kernels.tools.gpu_check``: its help, its CPU dry run and the sanitizer sweep's cases (on the CPU
backend here; the GPU sections themselves run only where a GPU is lent)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
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
    # the forward's 4-byte tiles are wider (wave-fitted within the stretched default): 13 of 9472 and a last of 5120
    assert llama["forward_tile"] == [8192, 9472] and llama["expected_gemms"] == {"forward": 14, "backward": 48}
    assert llama["backward_scratch_mib"] == 384
    assert abs(llama["dh_traffic_gb"] - 16 * 8 * 8192 * 4096 / 1e9) < 1e-9
    assert llama["chunk_widths"] == [128256 - 15 * 8192, 8192]  # one width, and what is left for the last chunk
    assert record["dpo_batch"]["kept_tokens"] == 8 * (1024 - 256)


def test_without_a_gpu_it_refuses_unless_dry(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--sections", "policy"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_the_sweep_cases_pass_on_the_cpu_backend():
    assert gpu_check._sweep_child("cpu", ("cpu",)) == 0


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
    median, peaks, errors = gpu_check._interleaved({"a": lambda: step("a"), "b": lambda: step("b")}, rounds=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then alternating rounds
    assert median == {"a": 2.0, "b": 5.0}
    assert peaks == {"a": 17.0, "b": 28.0}  # the largest of each name's rounds
    assert errors == {}


def test_a_failing_step_is_recorded_and_the_others_are_still_timed(monkeypatch):
    monkeypatch.setattr(gpu_check, "_timed", lambda step: (step(), 1.0))

    def refuse():
        raise ValueError("schedule='eager' cannot run here")

    median, peaks, errors = gpu_check._interleaved({"bad": refuse, "good": lambda: 2.0}, rounds=2)
    assert median == {"good": 2.0} and set(peaks) == {"good"}
    assert errors == {"bad": "ValueError: schedule='eager' cannot run here"}


def test_the_dry_run_plans_every_dpo_case_and_fails_on_one_that_would_be_refused(tmp_path, monkeypatch):
    """Issue 27: the time section forced schedule='eager' at the default 2 GiB budget, which the real call refuses
    (3.15 GB of kept tiles). Every eager case now passes a budget for one group, and the dry run checks it."""
    record = gpu_check.dry_run()
    cases = {c["case"]: c for c in record["dpo_cases"]}
    assert set(cases) == {c.name for c in gpu_check.dpo_cases()} and record["refused"] == []
    for name, c in cases.items():
        if name.endswith("/eager"):
            assert c["eager"].startswith("1 group(s)"), c
    # bf16 operands on CUDA: the eager budget holds what of the scaled store (2 bytes a logit and a running max per
    # chunk) the bf16 weight's gradient does not (2 bytes x 4096 a column against the store's 2 x 6144: two thirds
    # of its columns); one group needs no fp32 accumulator for it (the backward writes it from the store)
    sig = cases["sigmoid/bf16/eager"]
    assert sig["eager_budget_mb"] >= (6144 * 128256 * 2 - 128256 * 4096 * 2) / 2**20
    assert sig["eager_budget_mb"] < 6144 * 128256 * 2 / 2**20 * 0.34
    # a budget too small for one column of the store (a smaller one keeps the columns it holds), with no weight
    # gradient to hold the store's first columns (a trainable head's keeps them within any budget)
    monkeypatch.setattr(gpu_check.DpoCase, "budget_mb", lambda self, head: 0.001)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    need = gpu_check.DpoCase.eager_need
    monkeypatch.setattr(gpu_check.DpoCase, "eager_need",
                        lambda self, head: dataclasses.replace(need(self, head), grad_itemsize=0))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    assert "sigmoid/bf16/eager" in json.loads((tmp_path / "gpu_check_dry_run.json").read_text())["refused"]


def test_the_calls_cover_every_section_within_their_deadlines():
    covered = {s for sections in gpu_check.CALLS.values() for s in sections}
    assert covered == set(gpu_check.SECTIONS)
    for call, sections in gpu_check.CALLS.items():  # the section budgets fit the call's deadline
        assert sum(gpu_check.BUDGET_S[s] for s in sections) <= gpu_check.DEADLINE_S[call] + 60, call
    assert sum(gpu_check.SANITIZER_TIMEOUT_S.values()) <= gpu_check.BUDGET_S["sanitizer"]
    assert gpu_check.DEADLINE_S[1] + gpu_check.DEADLINE_S[2] + 2 * 60 + 180 <= 15 * 60  # builds and the start


def test_results_are_written_after_every_section_and_a_failing_section_keeps_the_others(tmp_path, monkeypatch):
    """Issue 27: results were written only after every section finished, and not where the device hands them
    back. With --out they are written after each section."""
    seen = []

    def build():
        seen.append(json.loads((tmp_path / "gpu_check_call1.json").read_text()) if seen else None)
        return {"ok": True}

    def policy():
        seen.append(json.loads((tmp_path / "gpu_check_call1.json").read_text()))
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(gpu_check.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu_check, "CALLS", {1: ("build", "policy"), 2: ()})
    monkeypatch.setattr(gpu_check, "section_build", build)
    monkeypatch.setattr(gpu_check, "section_policy", policy)
    assert gpu_check.main(["--call", "1", "--out", str(tmp_path)]) == 1
    assert list(seen[1]["sections"]) == ["build"]  # on disk before the next section ran
    final = json.loads((tmp_path / "gpu_check_call1.json").read_text())
    assert final["sections"]["policy"]["error"] == "RuntimeError: boom"
    assert (tmp_path / "gpu_check_call1.md").exists()


def test_a_bounded_run_is_killed_with_its_children_on_timeout_and_keeps_its_output(tmp_path):
    marker = tmp_path / "child_alive"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w').close()\n")
    script = tmp_path / "child.py"
    script.write_text(f"import subprocess, sys, time\nprint('started', flush=True)\n"
                      f"subprocess.Popen([sys.executable, {str(grandchild)!r}])\ntime.sleep(60)\n")
    run = gpu_check._run_bounded([sys.executable, str(script)], timeout=1.5)
    assert run["timed_out"] and "started" in run["tail"]
    import time

    time.sleep(2.5)
    assert not marker.exists()  # the grandchild was killed with the group


def test_the_build_section_fails_without_the_cuda_kernels(monkeypatch):
    from dpo_kernels.ops import registry

    real = registry.available_backends()
    fake = {k: v for k, v in real.items()}
    fake["cuda"] = registry.BackendStatus("cuda", False, "built without CUDA", ("cuda",), "")
    monkeypatch.setattr(registry, "available_backends", lambda: fake)
    result = gpu_check.section_build()
    assert result["ok"] is False and "cuda" in result["error"]


def test_an_fp32_product_is_seen_by_its_operands_not_its_kernel_name():
    with gpu_check._ProductOperands() as ops:
        a = torch.randn(512, 256)
        torch.mm(a, a.T)
        torch.addmm(torch.zeros(512, 512, dtype=torch.bfloat16), a.bfloat16(), a.T.bfloat16())
    assert len(ops.fp32_products(min_flop=2**20)) == 1
    assert {"torch.bfloat16"} == {p["a"] for p in ops.seen if p["op"] == "addmm"}


def test_the_gradient_section_compares_with_the_float64_oracle_and_would_see_a_wrong_gradient(monkeypatch):
    """Issue 27: the sweep compared against the torch backend, which shares the driver and the products with the GPU
    backends, and checked the forward only. The gradients section's case, run here on the CPU backends."""
    for kind in ("logits", "linear", "linear_frozen", "linear_eager", "dpo_eager", "dpo_recompute"):
        row = gpu_check._oracle_case(kind, "torch", torch.float32, device="cpu")
        assert row["masked_nonzero"] == 0 and max(row["errors"].values()) <= gpu_check.GRADIENT_RTOL[torch.float32], \
            (kind, row)
    from dpo_kernels.ops import torch_chunked

    real = torch_chunked.KERNELS.tiles.grad

    def wrong(tile, lse, g, *rest):  # a gradient kernel off by 1% in every logit
        return real(tile, lse, g * 1.01, *rest)

    broken = dataclasses.replace(torch_chunked.KERNELS, tiles=dataclasses.replace(torch_chunked.KERNELS.tiles,
                                                                                   grad=wrong))
    monkeypatch.setattr(torch_chunked, "KERNELS", broken)
    row = gpu_check._oracle_case("linear", "torch", torch.float32, device="cpu")
    assert row["errors"]["dhidden"] > 1e-3 and row["errors"]["out0"] < 1e-5, row


def test_the_gradient_section_runs_every_case_and_records_a_failing_one(monkeypatch):
    import functools

    monkeypatch.setattr(gpu_check, "_gpu_backends", lambda: ["torch"])
    real = functools.partial(gpu_check._oracle_case, device="cpu")

    def case(kind, backend, dtype):
        if kind == "dpo_eager" and dtype == torch.bfloat16:
            raise RuntimeError("a kernel failed")
        return real(kind, backend, dtype)

    monkeypatch.setattr(gpu_check, "_oracle_case", case)
    result = gpu_check.section_gradients(quick=True)
    assert result["failures"] == ["torch/bfloat16/dpo_eager"] and result["ok"] is False
    assert result["torch/float32/dpo_recompute"]["ok"] and result["torch/bfloat16/linear"]["ok"]
    assert result["torch/bfloat16/dpo_eager"]["error"] == "RuntimeError: a kernel failed"


def test_the_trl_dpo_peer_computes_the_loss_fused_dpo_loss_computes():
    """The ``time`` section's TRL 1.16 peer for sigmoid DPO (kept tokens through ``ChunkedLogProbFunction``, the
    reference under ``no_grad``): on the CPU, the same loss and policy gradients as ``fused_dpo_loss``'s oracle, so
    that the GPU ratios compare the same computation."""
    pytest.importorskip("trl.kernels")
    from dpo_kernels import fused_dpo_loss

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 300, (4, 24), generator=g)
    labels[:, :6] = -100
    labels[1, 20:] = -100
    x = {"labels": labels, "policy_hidden": torch.randn(4, 24, 32, generator=g).requires_grad_(),
         "lm_head_weight": (torch.randn(300, 32, generator=g) / 4).requires_grad_(),
         "ref_hidden": torch.randn(4, 24, 32, generator=g), "ref_lm_head_weight": torch.randn(300, 32, generator=g) / 4}
    ours = fused_dpo_loss(**x, backend="reference").loss
    expected = torch.autograd.grad(ours, [x["policy_hidden"], x["lm_head_weight"]])
    for patched in (False, True):  # TRL's function, and dpo_kernels' in its place (the "patched" row)
        trl = gpu_check._trl_dpo(x, patched=patched)
        grads = torch.autograd.grad(trl, [x["policy_hidden"], x["lm_head_weight"]])
        torch.testing.assert_close(trl, ours, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_dpo_timing_keeps_what_each_schedule_logged():
    """The ``time`` section's DPO rows carry ``fused_dpo_loss``'s debug lines per step (the schedule ``auto`` ran and
    why, where a scaled store went), each once, without printing them; the logger is restored after."""
    import logging

    from dpo_kernels import fused_dpo_loss

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 300, (4, 24), generator=g)
    labels[:, :6] = -100
    x = {"labels": labels, "policy_hidden": torch.randn(4, 24, 32, generator=g).requires_grad_(),
         "lm_head_weight": (torch.randn(300, 32, generator=g) / 4).requires_grad_(),
         "ref_hidden": torch.randn(4, 24, 32, generator=g), "ref_lm_head_weight": torch.randn(300, 32, generator=g) / 4}
    log = logging.getLogger("dpo_kernels")
    before = (log.level, log.propagate, list(log.handlers))
    with gpu_check._schedule_notes() as notes:
        for name, schedule in (("fused_eager", "eager"), ("fused_recompute", "recompute"), ("fused_eager", "eager")):
            notes.current = name
            fused_dpo_loss(**x, backend="torch", schedule=schedule).loss.backward()
    assert [m for m in notes.notes["fused_eager"] if "eager schedule, 1 group(s)" in m], notes.notes
    assert notes.notes["fused_recompute"] == ["fused_dpo_loss: recompute schedule (schedule='recompute')"]
    assert len(notes.notes["fused_eager"]) == len(set(notes.notes["fused_eager"]))
    assert (log.level, log.propagate, list(log.handlers)) == before
