"""The README's code blocks marked ``<!-- readme: runs ... -->`` run as written, each in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"<!-- readme: runs[^>]*-->\n```python\n(.*?)```", re.S)


def _blocks() -> list[str]:
    return _BLOCK.findall(README.read_text())


def test_the_readme_marks_its_runnable_blocks():
    assert len(_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_a_readme_block_runs_as_written(index, tmp_path):
    pytest.importorskip("trl", reason="the README's TRL blocks need TRL")
    code = _blocks()[index]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, f"README block {index} failed:\n{code}\n{run.stderr[-3000:]}"
