"""Every example under examples/ runs to completion and shows learning (reward accuracy reaches 1, KTO's reward
margin grows, or sDPO stages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the examples use TRL")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["dpo_trl_patch", "tdpo", "intermediate_dpo", "sdpo", "kto"])
def test_example_runs(name):
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py")], capture_output=True, text=True,
                            timeout=300, cwd=EXAMPLES)
    assert result.returncode == 0, result.stderr[-3000:]
    if name == "sdpo":
        assert result.stdout.count("reference is the previous policy: True") == 2, result.stdout
    elif name == "kto":  # unpaired: no accuracy; desirable completions pull ahead of undesirable ones
        last = [line for line in result.stdout.splitlines() if line.startswith("step")][-1]
        assert float(last.split("rewards/margins=")[1].split(",")[0]) > 0.5, result.stdout
    else:
        last = [line for line in result.stdout.splitlines() if line.startswith("step")][-1]
        assert "rewards/accuracies=1.0000" in last, result.stdout
