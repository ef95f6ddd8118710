"""Every ```python block in README.md and docs/*.md runs as written.

A block whose first line is ``# not run: <reason>`` is skipped (e.g. it needs a
GPU, torchrun, or data the reader brings).
"""
import glob
import os
import re
import subprocess
import sys

import pytest

import simcore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def _blocks():
    for path in DOCS:
        if not os.path.exists(path):
            continue
        text = open(path, encoding="utf-8").read()
        for i, match in enumerate(re.finditer(r"```python\n(.*?)```", text, re.S)):
            code = match.group(1)
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(code, id=f"{os.path.relpath(path, REPO)}:{line}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_example_runs(code, tmp_path):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if first.startswith("# not run:"):
        pytest.skip(first)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(simcore.__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
