"""docs/train.md's "Try it": its Python block writes the photographs, then every `simcore ...` line of its
```bash blocks (those not marked `# not run:`) runs as written, through the command's entry point
(simcore.isc.cli.main, in-process: `simcore` is the console script of that function)."""
import os
import re
import shlex

from test_cli import run_inproc  # noqa: E402,F401  (the fixture)

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "train.md")


def _try_it():
    text = open(DOC, encoding="utf-8").read()
    section = text[text.index("## Try it"):text.index("\n## ", text.index("## Try it") + 1)]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    bash = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if not b.startswith("# not run:")]
    return python, [line for b in bash for line in b.splitlines() if line.strip()]


def test_the_try_it_commands_run_as_written(tmp_path, monkeypatch, run_inproc):
    python, lines = _try_it()
    assert len(python) == 1 and len(lines) == 5
    monkeypatch.chdir(tmp_path)
    exec(compile(python[0], "docs/train.md", "exec"), {})
    outputs = []
    for line in lines:
        words = shlex.split(line)
        env = {}
        while "=" in words[0]:
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        assert words[0] == "simcore", line
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        r = run_inproc(*words[1:], cwd=tmp_path)
        for k in env:
            monkeypatch.delenv(k)
        expected = 1 if "SIMCORE_TRAIN_FAIL_AFTER_STEP" in env else 0     # the documented interruption
        assert r.returncode == expected, (line, r.stderr[-2000:])
        outputs.append(r.stdout)
    assert "stage 2: 24 classes, 10 steps" in outputs[1]
    assert os.path.exists(tmp_path / "run" / "loss.png") and os.path.exists(tmp_path / "descriptors.h5")
    micro_ap = float(re.search(r"micro_ap: ([0-9.]+)", outputs[-1]).group(1))
    print(f"docs/train.md 'Try it': µAP {micro_ap:.4f}")
    assert 0 <= micro_ap <= 1
