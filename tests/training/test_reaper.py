"""Nothing the trainer started outlives the job (lns_megatron.training.reaper), under real torchrun.

Each case freezes (SIGSTOP) one process of rank 1 (the trainer, its data-loader worker, or its writer)
and ends the job one way: the other rank's collective times out, torchrun is sent SIGTERM, or torchrun
is SIGKILLed. The job's stdout must close (whatever waits for the job's output returns) and every
process of the job must be gone. The driver's own case is in test_failures.py."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dist_launch import ROOT
from driver import driver_env
from lns_megatron.training.distributed import free_port

JOB = os.path.join(ROOT, "tests", "training", "reaper_job.py")


def gone(process):
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("ending", ["timeout", "sigterm", "sigkill"])
@pytest.mark.parametrize("frozen", ["trainer", "worker", "writer"])
def test_a_frozen_process_ends_with_the_job(tmp_path, frozen, ending):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               JOB, str(tmp_path)]
    launcher = subprocess.Popen(command, cwd=ROOT, env=driver_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    job = []
    try:
        ready = wait_for(lambda: all((tmp_path / f"rank{r}.json").exists() for r in (0, 1))
                         or launcher.poll() is not None, timeout=120)
        assert ready and launcher.poll() is None, launcher.communicate()[0].decode()[-3000:]
        job = psutil.Process(launcher.pid).children(recursive=True)
        pids = json.loads((tmp_path / "rank1.json").read_text())
        assert {pids["trainer"], pids["watchdog"], pids["writer"], pids["worker"]} <= {p.pid for p in job}
        os.kill(pids[frozen], signal.SIGSTOP)
        if ending == "sigterm":
            launcher.send_signal(signal.SIGTERM)
        elif ending == "sigkill":
            launcher.kill()
        # torchrun gives a worker that ignores its SIGTERM 30 s before it SIGKILLs it (a frozen trainer).
        try:
            output = launcher.communicate(timeout=90)[0].decode()
        except subprocess.TimeoutExpired:
            left = [f"{p.pid} {p.name()} {p.status()}" for p in job if not gone(p)]
            pytest.fail(f"the job's stdout was still open 90 s after the end; still running: {left}")
        assert wait_for(lambda: all(gone(p) for p in job), timeout=10), [p for p in job if not gone(p)]
        if ending == "timeout":
            assert launcher.returncode != 0 and "ChildFailedError" in output, output[-3000:]
        if ending == "sigkill":
            assert "its launcher (torchrun, pid" in output, output[-3000:]
    finally:
        for process in job:
            try:
                process.kill()
            except psutil.Error:
                pass
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
