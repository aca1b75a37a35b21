"""Failures a cluster run meets, on CPU with the real driver: a diverging run (NaN/Inf), a frozen rank,
a killed rank, and a trainer killed during a save. Each ends with one line, nothing non-finite is ever
saved, no process is left behind, and the run resumes from its last good checkpoint."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from megatron.core import dist_checkpointing

from dist_launch import ROOT
from driver import (COMMON, MOCK, data_flags, driver_command, driver_env, driver_error, learnable_documents,
                    logged, logged_losses, run_driver, write_dataset)
from lns_megatron.training.distributed import free_port

BLOW_UP = ["--preset", "tiny", *MOCK, "--lr", "1e6", "--train-iters", "8", "--log-interval", "1",
           "--eval-iters", "0", "--depth-log-interval", "0", "--save-interval", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_flags(write_dataset(str(tmp_path_factory.mktemp("data") / "cycle_text_document"),
                                    learnable_documents()))


def saved_iterations(ckpt):
    return sorted(int(d.split("_")[1]) for d in os.listdir(ckpt) if d.startswith("iter_"))


def all_saved_tensors_finite(directory):
    tensors = dist_checkpointing.load_plain_tensors(str(directory))
    return len(tensors) > 0 and all(bool(torch.isfinite(t).all()) for t in tensors.values() if torch.is_tensor(t))


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["--pipeline-model-parallel-size", "2"])],
                         ids=["one-process", "pp2"])
def test_nan_gradient_stops_before_the_step_and_saves_nothing(tmp_path, megatron_tp1, nproc, layout):
    """lr 1e6: the weights blow up after a few steps. The first NaN/Inf gradient stops the run before the
    optimizer applies it, names the iteration and the last good checkpoint, and nothing after it is saved.
    At PP=2 each stage holds other gradients: the ranks vote, so all stop at the same iteration."""
    ckpt = tmp_path / "ckpt"
    error = driver_error(*BLOW_UP, *layout, "--save", ckpt, nproc=nproc)
    bad = int(re.search(r"at iteration (\d+)", error).group(1))
    assert "the update was not applied and nothing was saved from this state" in error
    assert f"the last good checkpoint is {ckpt}/iter_{bad - 1:07d}" in error
    assert saved_iterations(ckpt) == list(range(1, bad))
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == str(bad - 1)
    assert all(all_saved_tensors_finite(ckpt / f"iter_{i:07d}") for i in saved_iterations(ckpt))


def test_without_the_check_nan_is_counted_and_never_saved(tmp_path, megatron_tp1):
    """--no-check-for-nan-in-loss-and-grad trains on (Megatron-LM's behaviour) and counts NaN iterations
    truthfully, but a checkpoint of a non-finite state is still refused."""
    ckpt = tmp_path / "ckpt"
    code, out = run_driver(*BLOW_UP, "--save", ckpt, "--save-interval", "6", "--no-check-for-nan-in-loss-and-grad",
                           expect_ok=False)
    errors = [line for line in out.splitlines() if line.startswith("lns-pretrain: error:")]
    assert code != 0 and len(errors) == 1, out[-3000:]
    assert "the model or optimizer state holds NaN/Inf at iteration 6; it was not saved" in errors[0]
    assert not os.path.exists(ckpt / "iter_0000006") and saved_iterations(ckpt) == []
    losses, grad_norms = logged_losses(out), logged(out, "grad norm")
    nan_losses = [i for i, v in losses.items() if v != v]
    non_finite = [i for i in losses if not (math.isfinite(losses[i]) and math.isfinite(grad_norms[i]))]
    nan_counts = {int(i): int(n) for i, n in re.findall(r"iteration +(\d+)/.*?number of nan iterations: +(\d+)", out)}
    assert nan_losses and sorted(losses) == list(range(1, 7))  # it trained on through the NaNs
    # Each iteration whose loss or gradient norm is NaN/Inf is counted, once (log interval 1).
    assert nan_counts == {i: int(i in non_finite) for i in losses}, (nan_counts, losses, grad_norms)


def start_two_nodes(args, tmp_path):
    """Two single-process 'nodes' (torchrun --nnodes 2) on this machine, as a cluster job runs them."""
    port = free_port()
    logs = [open(tmp_path / f"node{r}.log", "w+") for r in (0, 1)]
    nodes = [subprocess.Popen(driver_command(*args, nnodes=2, node_rank=r, master_port=port), cwd=ROOT,
                              env=driver_env(), stdout=logs[r], stderr=subprocess.STDOUT, start_new_session=True)
             for r in (0, 1)]
    return nodes, logs


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def log_text(log):
    log.flush()
    return open(log.name).read()


def trainer_of(node):
    """The trainer process torchrun started for a node (its child that is not the reaper)."""
    children = psutil.Process(node.pid).children()
    return children[0] if children else None


def kill_all(nodes):
    for node in nodes:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait()


@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_a_lost_rank_ends_the_job_with_one_line(data, tmp_path, fault):
    """A frozen rank (SIGSTOP) ends the job after --distributed-timeout-minutes instead of hanging forever;
    a killed rank within seconds. The survivor names what happened, where, and the last checkpoint; the
    killed trainer's data-loader workers die with it."""
    args = [*COMMON, *data, "--train-iters", "100000", "--log-interval", "1", "--num-workers", "1",
            "--distributed-timeout-minutes", "0.15", "--save", tmp_path / "ckpt", "--save-interval", "2"]
    nodes, logs = start_two_nodes(args, tmp_path)
    processes = []
    try:
        assert wait_for(lambda: "saved checkpoint to" in log_text(logs[0])), log_text(logs[0])[-3000:]
        processes = [p for node in nodes for p in psutil.Process(node.pid).children(recursive=True)]
        victim = trainer_of(nodes[1])
        workers = victim.children(recursive=True)
        assert workers, "the trainer of node 1 has no data-loader worker to check"
        start = time.time()
        if fault == "frozen":
            victim.suspend()
        else:
            victim.kill()
        assert wait_for(lambda: nodes[0].poll() is not None, timeout=120), "node 0 did not end"
        ended_after = time.time() - start
        errors = [l for l in log_text(logs[0]).splitlines() if l.startswith("lns-pretrain: error: rank 0")]
        assert len(errors) == 1, log_text(logs[0])[-3000:]
        assert f"the last good checkpoint is {tmp_path / 'ckpt'}/iter_" in errors[0] and "restart the job" in errors[0]
        if fault == "frozen":
            assert "timed out after --distributed-timeout-minutes 0.15" in errors[0] and "frozen" in errors[0]
            assert 9 <= ended_after < 60, ended_after  # 0.15 min = 9 s, not forever
        else:
            assert "lost its connection to another rank" in errors[0]
            assert ended_after < 30, ended_after
            assert wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
                            timeout=15), "the killed trainer's workers outlived it"
    finally:
        kill_all(nodes)
        for p in processes:  # the trainers run in sessions of their own
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["sync", "async"])
def test_kill_during_save_keeps_latest_checkpoint_and_leaves_no_orphans(data, tmp_path, mode):
    """SIGKILL of the trainer alone while iteration 2 is being saved (with --async-save: while its forked
    writer writes, before every rank's write is done): its checkpoint writers and data workers die with it,
    the pointer still names iteration 1, and a new run takes over the dead run's lock on --save, resumes from
    1 exactly (the losses of a run never killed) and replaces the debris."""
    ckpt = tmp_path / "ckpt"
    args = [*COMMON, *data, "--hidden-size", "256", "--ffn-hidden-size", "1024", "--num-layers", "8",
            "--train-iters", "3", "--log-interval", "1", "--save", ckpt, "--save-interval", "1", "--num-workers", "1",
            *mode]
    proc = subprocess.Popen(driver_command(*args), cwd=ROOT, env=driver_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    trainer = psutil.Process(proc.pid)
    partial = ckpt / "iter_0000002.tmp"
    def writing():  # async: the forked writer has begun the shards
        try:
            return partial.exists() and (not mode or any(f.endswith(".distcp") for f in os.listdir(partial)))
        except FileNotFoundError:  # renamed just now: the save completed
            return False

    caught = wait_for(lambda: writing() or proc.poll() is not None, timeout=300)
    descendants = trainer.children(recursive=True)
    assert caught and writing(), "the save of iteration 2 was not caught in progress"
    os.kill(proc.pid, signal.SIGKILL)  # the trainer only, as the OOM killer or `kill -9 PID` does
    assert not (partial / ".metadata").exists(), "killed after the shards were complete: not during the write"
    proc.wait()
    assert len(descendants) >= 3  # the reaper, the data worker, megatron's writer processes
    assert wait_for(lambda: not any(d.is_running() and d.status() != psutil.STATUS_ZOMBIE for d in descendants),
                    timeout=15), [d for d in descendants if d.is_running()]
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "1"
    assert not (ckpt / "iter_0000002").exists()
    _, out = run_driver(*args, "--load", ckpt)
    assert f"took over the stale lock of pid {proc.pid}" in out
    resumed = logged_losses(out)
    _, uninterrupted = run_driver(*[tmp_path / "clean" if a == ckpt else a for a in args])
    expected = logged_losses(uninterrupted)
    assert sorted(resumed) == [2, 3] and all(resumed[i] == expected[i] for i in resumed), (resumed, expected)
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "3"
    assert sorted(os.listdir(ckpt)) == ["iter_0000001", "iter_0000002", "iter_0000003",
                                        "latest_checkpointed_iteration.txt"]


def test_a_child_born_just_before_the_kill_dies_too(tmp_path):
    """The watchdog looks for descendants once a second; a child the trainer starts in between and then
    dies (killed half a second in, before the first look) is found as an orphan in the trainer's process
    group, and killed."""
    pid_file = tmp_path / "child.pid"
    script = ("import os, signal, subprocess, sys, time\n"
              "from lns_megatron.training import reaper\n"
              "reaper.start()\n"
              "time.sleep(0.5)\n"  # the watchdog is watching (its first look is at 1 s)
              "child = subprocess.Popen(['sleep', '120'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    trainer = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=driver_env(), start_new_session=True)
    assert trainer.returncode == -signal.SIGKILL
    child = psutil.Process(int(pid_file.read_text()))
    gone = wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=15)
    if not gone:
        child.kill()
    assert gone, "the child started just before the trainer was killed outlived it"


def test_a_frozen_data_worker_does_not_outlive_the_job(tmp_path):
    """One torchrun, two ranks; rank 1's data-loader worker is frozen (SIGSTOP). Rank 0 times out and says so
    in one line, torchrun ends, and the job's stdout closes: the frozen worker (which never acts on the
    SIGTERM torchrun sends its group) is SIGKILLed by the watchdog, and nothing of the job is left."""
    args = ["--preset", "tiny", *MOCK, "--train-iters", "20000", "--log-interval", "1", "--num-workers", "1",
            "--eval-iters", "0", "--depth-log-interval", "0", "--distributed-timeout-minutes", "0.15"]
    proc = subprocess.Popen(driver_command(*args, nproc=2), cwd=ROOT, env=driver_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    job = []
    try:
        def rank1_worker():
            for trainer in psutil.Process(proc.pid).children():
                try:
                    if trainer.environ().get("RANK") == "1":
                        return next((w for w in trainer.children() if w.name() == "pt_data_worker"), None)
                except psutil.Error:
                    pass

        assert wait_for(lambda: rank1_worker() is not None or proc.poll() is not None, timeout=300)
        worker = rank1_worker()
        assert worker is not None, proc.communicate()[0][-3000:]
        job = psutil.Process(proc.pid).children(recursive=True)
        worker.suspend()
        try:
            out = proc.communicate(timeout=150)[0]
        except subprocess.TimeoutExpired:
            pytest.fail("the job's stdout was still open 150 s after the freeze: "
                        f"{[(p.pid, p.name()) for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]}")
        errors = [l for l in out.splitlines() if l.startswith("lns-pretrain: error: rank 0")]
        assert len(errors) == 1 and "timed out after --distributed-timeout-minutes 0.15" in errors[0], out[-3000:]
        assert wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in job),
                        timeout=10), [p for p in job if p.is_running()]
    finally:
        for p in job:
            try:
                p.kill()
            except psutil.Error:
                pass
        kill_all([proc])
