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
    assert demo.main(["--steps", "2", "--vocab", "500", "--prompt", "8", "--completion", "8", *flags]) == 0
    out = capsys.readouterr().out
    assert described in out.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("fused ", "unfused ")) and " MiB " in line}  # the table, not the summary line
    fused, unfused = (float(v) for v in rows["fused"][-2:]), (float(v) for v in rows["unfused"][-2:])
    for f, u in zip(fused, unfused, strict=True):
        assert f == pytest.approx(u, rel=rel)
    assert "x the time" in out
