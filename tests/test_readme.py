"""The README's Python code blocks run as written, so that they stay true.

Each ```python block runs on its own, in a fresh namespace, on the CPU (Triton kernels under the interpreter, as
conftest.py sets up). A block that needs a GPU is marked by the HTML comment `<!-- readme-test: cuda -->` on the line
before it and is skipped without CUDA, with that reason; `<!-- readme-test: skip REASON -->` skips one for good,
with its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks() -> list:
    text = README.read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        heading = next((h for h in reversed(re.findall(r"^#+ (.+)$", text[: m.start()], re.M))), "top")
        mark = m.group("mark") or ""
        marks = []
        if mark == "cuda":
            marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="the block needs a CUDA device"))
        elif mark.startswith("skip"):
            marks.append(pytest.mark.skip(reason=mark.removeprefix("skip").strip() or "marked skip in the README"))
        elif mark:
            raise ValueError(f"README.md line {line}: unknown readme-test mark {mark!r}")
        out.append(pytest.param(m.group("code"), line, id=f"{heading[:30]}@{line}", marks=marks))
    return out


def test_the_readme_has_python_blocks():
    assert len(blocks()) >= 4


@pytest.mark.parametrize(("code", "line"), blocks())
def test_readme_block_runs(code, line, capsys):
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # the README is the repository's own code
