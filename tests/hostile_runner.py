"""Runs ``simcore`` command lines, each in its own process, for tests/test_cli_hostile.py.

Importing torch costs seconds a process; this driver imports the command once and forks one child per
case, so each case still runs in a process of its own (its exit status, its signals, its file-size
limit) at the cost of a fork. Reads a JSON list of cases on stdin, each
``{"argv": [...], "cwd": "...", "fsize": bytes or null}``, and prints a JSON list of
``{"rc": exit status (negative: the signal that killed it), "out": stdout + stderr}``.
``fsize`` sets RLIMIT_FSIZE with SIGXFSZ ignored: a write past it fails as on a full disk.
"""
import json
import os
import resource
import signal
import sys
import tempfile

from simcore.isc.cli import main     # imported before any fork: the children share it


def _child(case, out_fd):
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.chdir(case["cwd"])
    if case.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], case["fsize"]))
    try:
        code = main(case["argv"])
    except SystemExit as e:             # argparse's errors
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:               # noqa: BLE001 - a traceback is what the test looks for
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)


def run(case):
    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:
            _child(case, out.fileno())
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return {"rc": rc, "out": out.read().decode("utf-8", "replace")}


if __name__ == "__main__":
    print(json.dumps([run(c) for c in json.load(sys.stdin)]))
