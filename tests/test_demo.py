"""``python -m dpo_kernels.demo``: the fused and unfused runs train the same model to the same losses, in fp32, in
bf16 weights and under bf16 autocast (``--dtype``, ``--amp``)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tqdm")

from dpo_kernels import demo  # noqa: E402


@pytest.mark.parametrize("flags, described, rel", [
    ([], "float32 weights", 1e-4),
    (["--amp"], "float32 weights, bf16 autocast", 2e-2),
    (["--dtype", "bf16"], "bfloat16 weights", 2e-2),
], ids=["fp32", "amp", "bf16"])
def test_demo_fused_and_unfused_agree(capsys, flags, described, rel):
    assert demo.main(["--steps", "2", "--repeats", "2", "--vocab", "500", "--prompt", "8", "--completion", "8",
                      *flags]) == 0
    out = capsys.readouterr().out
    assert described in out.splitlines()[0]
    finals = {line.split()[0]: line.split()[1:] for line in out.splitlines()
              if line.startswith(("fused ", "unfused ")) and "MiB" not in line and " vs " not in line}
    for f, u in zip(finals["fused"], finals["unfused"], strict=True):
        assert float(f) == pytest.approx(float(u), rel=rel)
    timed = {line.split()[0]: line.split() for line in out.splitlines()
             if line.startswith(("fused ", "unfused ")) and "MiB" in line and " vs " not in line}
    assert timed.keys() == {"fused", "unfused"}
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("fused vs unfused, best of 2: ")
    assert f"x the time per training step ({timed['fused'][1]} ms vs {timed['unfused'][1]} ms)" in summary


def test_timing_interleaves_the_paths_and_reports_each_best(monkeypatch):
    calls = []
    results = {True: iter([(3.0, 50.0), (1.0, 40.0), (2.0, 45.0)]), False: iter([(6.0, 900.0), (9.0, 800.0),
                                                                                   (4.0, 850.0)])}

    def fake_step(model, batch, fused, setup):
        calls.append(fused)
        return next(results[fused])

    monkeypatch.setattr(demo, "_time_step", fake_step)
    best = demo._best_of(None, None, None, repeats=3)
    assert calls == [True, False] * 3
    assert best == {"fused": (1.0, 40.0), "unfused": (4.0, 800.0)}
    assert demo._summary(best, 3) == ("fused vs unfused, best of 3: 0.25x the time per training step (1000 ms vs "
                                      "4000 ms), 0.05x the peak extra memory (40 MiB vs 800 MiB)")


def test_demo_redirected_to_a_file_prints_whole_lines(tmp_path):
    """Redirected (not a terminal), the demo draws no progress bar: before, tqdm's carriage-return updates were
    interleaved with the step lines in the file."""
    import subprocess
    import sys

    log = tmp_path / "demo.log"
    with log.open("w") as f:
        subprocess.run([sys.executable, "-m", "dpo_kernels.demo", "--steps", "2", "--repeats", "1", "--vocab", "300",
                        "--prompt", "4", "--completion", "4"], stdout=f, stderr=subprocess.STDOUT, check=True)
    text = log.read_text()
    assert "\r" not in text and "it/s" not in text
    assert "step  2: loss" in text and text.strip().splitlines()[-1].startswith("fused vs unfused, best of 1: ")
