"""docs/face_reid.md's commands: the "On the command line" section as written (its Python block writes the
tiny face set, then every `simcore ...` line of its bash block runs through the command's entry point,
in-process), and the `simcore train` lines of blocks marked `# not run:` (data and GPUs the reader brings)
(and train.md's) through `simcore train`'s parser and its whole configuration check, files aside."""
import os
import re
import shlex

from test_cli import run_inproc  # noqa: E402,F401  (the fixture)

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
DOC = os.path.join(DOCS, "face_reid.md")


def _blocks(section_title=None, doc=DOC):
    text = open(doc, encoding="utf-8").read()
    if section_title is not None:
        start = text.index(section_title)
        text = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", text, re.S), re.findall(r"```bash\n(.*?)```", text, re.S)


def _commands(blocks):
    return [shlex.split(line) for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def test_the_command_line_section_runs_as_written(tmp_path, monkeypatch, run_inproc):
    python, bash = _blocks("## On the command line")
    runnable = [b for b in bash if not b.startswith("# not run:")]
    monkeypatch.chdir(tmp_path)
    exec(compile(python[0], "docs/face_reid.md", "exec"), {})
    commands = _commands(runnable)
    assert [w[1] for w in commands] == ["train", "eval-verification", "eval-reid", "export", "convert", "train"]
    for words in commands:
        assert words[0] == "simcore", words
        r = run_inproc(*words[1:], cwd=tmp_path)
        assert r.returncode == 0, (words, r.stderr[-2000:])
    assert os.path.isfile(tmp_path / "run-shards" / "final.pt")


def test_the_not_run_train_commands_pass_the_configuration_check():
    """face_reid.md's and train.md's `simcore train` lines in `# not run:` blocks (train.md's one-GPU and
    8-GPU shard runs among them)."""
    from simcore.isc.cli import build_parser
    from simcore.isc.train import TrainConfig
    bash = _blocks()[1] + _blocks(doc=os.path.join(DOCS, "train.md"))[1]
    lines = _commands(b for b in bash if b.startswith("# not run:"))
    trains = [w[w.index("simcore"):] for w in lines if "train" in w and "simcore" in w]
    assert sum("--labels" in w and "cls" in w for w in trains) == 4
    for words in trains:
        a = build_parser().parse_args(words[1:])
        fields = {f: getattr(a, f) for f in TrainConfig.__dataclass_fields__ if hasattr(a, f)}
        fields["stop_loss"] = a.stop
        TrainConfig(**fields).normalised()          # every value; the files are the reader's
