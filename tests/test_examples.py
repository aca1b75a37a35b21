"""The example scripts run the interpreter named by PYTHON (default python), never another python on PATH:
each test that runs a script gives it sys.executable and a decoy python first on PATH (dist_launch.script_env)."""

import glob
import os
import re

from dist_launch import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")) + glob.glob(os.path.join(ROOT, "examples", "*.slurm")))
# A command position (line start, after ; | && || $( or if/then/exec/do) followed by a bare python.
BARE_PYTHON = re.compile(r"(^|[;&|(]|\b(?:if|then|else|do|exec|time|!)\s)\s*(python3?|deepspeed)\s")


def commands(path):
    for number, line in enumerate(open(path), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        yield number, code


def test_every_example_runs_the_interpreter_named_by_python():
    assert SCRIPTS
    bare = [f"{os.path.relpath(path, ROOT)}:{n}: {code.strip()}" for path in SCRIPTS for n, code in commands(path)
            if BARE_PYTHON.search(code)]
    assert bare == [], "run \"$PYTHON\" (PYTHON=${PYTHON:-python}) instead:\n" + "\n".join(bare)


def test_the_check_finds_a_bare_python(tmp_path):
    script = tmp_path / "x.sh"
    script.write_text('PYTHON=${PYTHON:-python}\n"$PYTHON" -m ok  # python is fine in a comment\n'
                      'if python -c "import torch"; then\n  exec deepspeed train.py\nfi\n')
    assert [n for n, code in commands(script) if BARE_PYTHON.search(code)] == [3, 4]
