"""What the GPU check steps share: their JSON/Markdown files and the driver's console lines.

Each step writes ``OUT/<step>.json`` (updated as it goes, so a step stopped by its time limit still leaves
what it measured) and ``OUT/<step>.md``. The driver is run through its command line, ``python -m
lns_megatron.pretrain``'s ``main(argv)``, in this process; its Megatron-style lines are parsed back.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
import traceback


def write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(tmp, path)


def md_table(headers, rows) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def step_args(description: str) -> argparse.ArgumentParser:
    """The arguments every step script takes from tools/gpu/checks.py."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--json", required=True, help="where this step's JSON goes")
    ap.add_argument("--md", required=True, help="where its Markdown summary goes")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds this step may take")
    return ap


class Tee(io.TextIOBase):
    """Writes to the real stream (the step's log) and keeps a copy for parsing."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, s):
        self.stream.write(s)
        self.copy.write(s)
        return len(s)

    def flush(self):
        self.stream.flush()


def run_driver(argv) -> tuple:
    """``lns-pretrain ARGV`` in this process; returns (exit code, its console output, seconds)."""
    from lns_megatron.pretrain import main

    print("+ lns-pretrain " + " ".join(map(str, argv)), flush=True)
    out, err = Tee(sys.stdout), Tee(sys.stderr)
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse refusals
            rc = e.code if isinstance(e.code, int) else 2
        except Exception:  # a crash inside the driver: the step records it and goes on to its next run
            traceback.print_exc()
            rc = 1
    return rc, out.copy.getvalue() + err.copy.getvalue(), time.perf_counter() - start


_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")


def iterations(output: str) -> dict:
    """{iteration: {"lm loss": .., "throughput per GPU (TFLOP/s/GPU)": .., ...}} from Megatron-style lines."""
    found = {}
    for line in output.splitlines():
        m = _ITERATION.search(line)
        if not m:
            continue
        fields = {}
        for part in m.group(2).split("|"):
            name, sep, value = part.rpartition(":")
            if sep:
                try:
                    fields[name.strip()] = float(value)
                except ValueError:
                    pass
        found[int(m.group(1))] = fields
    return found


def validation_losses(output: str) -> dict:
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"validation loss at iteration (\d+) \| lm loss value: (\S+)", output)}


def error_line(output: str) -> str:
    """The driver's one error line, or the last line of a traceback."""
    lines = [l for l in output.splitlines() if l.strip()]
    for line in reversed(lines):
        if "error:" in line or "Error" in line:
            return line.strip()[:500]
    return lines[-1].strip()[:500] if lines else "no output"


def mean_tail(values, n: int = 5):
    tail = list(values)[-n:]
    return sum(tail) / len(tail) if tail else None
