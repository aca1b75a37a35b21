"""Run a script under torchrun on this machine and return its output (for multi-process tests)."""

import os
import subprocess
import sys

from lns_megatron.training.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, *args, nproc=2, timeout=300, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", script, *map(str, args)]
    run_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{output[-6000:]}"
    return output


DECOY = "decoy-python"


def script_env(env):
    """``env`` for running an examples/ script: PYTHON is this test's interpreter, and the first ``python`` on
    PATH is a decoy that fails, so a script that runs whatever ``python`` is on PATH fails its test."""
    import tempfile

    decoy_dir = os.path.join(tempfile.gettempdir(), f"lns-megatron-{DECOY}")
    decoy = os.path.join(decoy_dir, "python")
    if not os.path.exists(decoy):
        os.makedirs(decoy_dir, exist_ok=True)
        with open(decoy + ".tmp", "w") as f:
            f.write(f'#!/bin/sh\necho "{DECOY}: a script ran python from PATH instead of $PYTHON" >&2\nexit 97\n')
        os.chmod(decoy + ".tmp", 0o755)
        os.replace(decoy + ".tmp", decoy)
    return dict(env, PYTHON=sys.executable, PATH=os.pathsep.join([decoy_dir, env.get("PATH", os.defpath)]))
