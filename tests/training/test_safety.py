"""Run guards in this process: the --save lock, writable directories, a --save holding another run,
and the finite checks, on real files and real processes."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from lns_megatron.config import ConfigError, parse_args
from lns_megatron.training import safety
from lns_megatron.training.safety import RunLock


def test_lock_is_exclusive_and_released(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    holder = json.load(open(tmp_path / RunLock.FILE))
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    with pytest.raises(ConfigError) as refused:  # this process is alive: a second run is refused
        RunLock(str(tmp_path)).acquire()
    assert f"--save {tmp_path} is in use by another run (pid {os.getpid()} on {socket.gethostname()}" in str(refused.value)
    first.release()
    assert not (tmp_path / RunLock.FILE).exists()
    RunLock(str(tmp_path)).acquire().release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / RunLock.FILE).write_text(json.dumps(dict(host=socket.gethostname(), pid=dead.pid, start="1",
                                                         since="earlier")))
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.notice and f"took over the stale lock of pid {dead.pid}" in lock.notice
    assert json.load(open(tmp_path / RunLock.FILE))["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_is_stale_only_when_its_heartbeat_stops(tmp_path):
    path = tmp_path / RunLock.FILE
    path.write_text(json.dumps(dict(host="node-17", pid=4242, start="99", since="yesterday")))
    with pytest.raises(ConfigError, match="in use by another run \\(pid 4242 on node-17"):
        RunLock(str(tmp_path)).acquire()  # a fresh heartbeat: that run may be alive
    old = time.time() - RunLock.STALE_AFTER_S - 10
    os.utime(path, (old, old))
    lock = RunLock(str(tmp_path)).acquire()
    assert "took over the stale lock of pid 4242 on node-17" in lock.notice
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLock, "HEARTBEAT_S", 0.05)
    lock = RunLock(str(tmp_path)).acquire()
    path = tmp_path / RunLock.FILE
    os.utime(path, (1.0, 1.0))
    time.sleep(0.5)
    assert time.time() - os.path.getmtime(path) < 5
    lock.release()


def test_unwritable_directories_are_found_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=f"--save {blocker}/ckpt is not writable"):
        safety.check_writable("--save", str(blocker / "ckpt"))
    with pytest.raises(ConfigError, match="--tensorboard-dir /proc/lns-tb is not writable"):
        safety.check_writable("--tensorboard-dir", "/proc/lns-tb")
    safety.check_writable("--save", str(tmp_path / "new" / "dir"))
    assert os.listdir(tmp_path / "new" / "dir") == []  # the probe file is gone


def test_save_holding_another_run_needs_load(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("40000")
    c = parse_args(["--preset", "tiny", "--mock-data", "--vocab-size", "10", "--save", str(tmp_path)])
    with pytest.raises(ConfigError, match=f"--save {tmp_path} already holds a run \\(checkpoints up to iteration "
                                          f"40000\\); resume it with --load {tmp_path}"):
        safety.check_save_directory(c)
    for load in (tmp_path, tmp_path / "iter_0040000"):
        c.load = str(load)
        safety.check_save_directory(c)  # resuming that run: allowed


def test_finite_checks():
    assert safety.all_finite([torch.ones(3), torch.zeros(0), None])
    assert not safety.all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not safety.all_finite([torch.tensor([float("-inf")])])


def test_directories_are_checked_by_the_ranks_that_write_them(tmp_path):
    """Under torchrun every rank writes its shards to --save and the last rank writes TensorBoard: each
    checks what it writes, and the first error reaches every rank (one line, naming the rank)."""
    from driver import MOCK, driver_error

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    error = driver_error("--preset", "tiny", *MOCK, "--train-iters", "2", "--save", tmp_path / "ckpt",
                         "--tensorboard-dir", blocker / "tb", nproc=2)
    assert error.startswith(f"lns-pretrain: error: rank 1 ({socket.gethostname()}): --tensorboard-dir {blocker}/tb "
                            "is not writable"), error
    assert not os.path.exists(tmp_path / "ckpt" / RunLock.FILE)  # rank 0's lock was given back
