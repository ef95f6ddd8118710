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


# ------------------------------------------------------------------------------------------ commands

DOC_FILES = [os.path.relpath(p, REPO) for p in DOCS if os.path.exists(p)]


def readme_main_job():
    """The README's main-job command, as .ci/main_job extracts and runs it in a fresh clone."""
    out = subprocess.run(["bash", os.path.join(REPO, ".ci", "main_job"), "--print"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_readme_main_job_is_the_installed_console_command():
    """`simcore demo` (a console script: sys.path[0] is its bin folder) runs the installed package; `python -m`
    in the repository root would import the checkout's uncompiled simcore/ folder."""
    command = readme_main_job()
    assert command == 'python -m pip install -c constraints.txt ".[isc]" && simcore demo'
    assert f"```bash\n{command}\n```" in open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


@pytest.mark.parametrize("doc", DOC_FILES)
def test_doc_commands_do_not_shadow_the_installed_package(doc):
    """No `PYTHONPATH=` prefix and no `python -m simcore...`: after `pip install .` both would import the
    checkout's simcore/ folder (no compiled extension) and run the plain-PyTorch references."""
    text = open(os.path.join(REPO, doc), encoding="utf-8").read()
    bad = [f"{doc}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
           for m in re.finditer(r"PYTHONPATH=\S*|python3? -m simcore\S*", text)]
    assert not bad, "\n".join(bad)
