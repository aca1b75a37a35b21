"""Nothing the trainer started outlives the job.

megatron's checkpoint writers (forked), its results-queue manager (spawned) and the data-loader
workers outlive a trainer that dies before them: hundreds of MB each, holding files, GPU memory and
the job's stdout (whatever waits for the job's output, a CI runner or a SLURM step, waits forever).
:func:`start` forks a small watchdog before anything heavy is imported. It learns the trainer's
descendants once a second, and when the trainer is gone (its end of a pipe closes, however it died)
it SIGKILLs the ones still running, and the trainer's children born since its last look: orphaned
like the watchdog itself, they now have its new parent, in the trainer's process group. psutil
compares process start times, so a recycled pid is never killed.

The watchdog ignores the signals that end a job politely (torchrun sends SIGTERM, SIGINT, SIGHUP or
SIGQUIT to the trainer's whole process group): it must outlive them to do its work, since a stopped
(frozen) process never acts on the SIGTERM it was sent, and only SIGKILL ends it. Under torchrun it
also watches the launcher: a trainer whose torchrun is gone (SIGKILLed, or lost with its node) has
no job left, and is SIGKILLed with everything it started.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

# What torchrun forwards to the workers' process groups when it is stopped, and what a terminal sends.
JOB_END_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def start() -> int:
    """Fork the watchdog of this process; returns its pid."""
    read_fd, write_fd = os.pipe()
    trainer = os.getpid()
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None  # set by torchrun for its workers
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        _watch(trainer, launcher, read_fd)  # never returns
    os.close(read_fd)
    os.set_inheritable(write_fd, False)  # exec'd (spawned) children do not hold it open
    os.register_at_fork(after_in_child=lambda: _close(write_fd))  # nor do forked ones
    return pid


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _watch(trainer: int, launcher, fd: int) -> None:
    for sig in JOB_END_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        import psutil

        me, known = os.getpid(), {}
        parent = psutil.Process(trainer)
        group, born = os.getpgid(trainer), parent.create_time()
        while True:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready and os.read(fd, 1) == b"":
                break
            try:
                for child in parent.children(recursive=True):
                    if child.pid != me:
                        known[child.pid] = child
                if launcher is not None and parent.ppid() != launcher:
                    _say(f"lns-pretrain: error: rank {os.environ.get('RANK', '?')}: its launcher (torchrun, pid "
                         f"{launcher}) is gone; killed the trainer (pid {trainer}) and the processes it started")
                    parent.kill()
                    break
            except psutil.NoSuchProcess:
                break
        known.update((p.pid, p) for p in _orphans_of(trainer, me, group, born))
        for child in known.values():
            try:
                if child.is_running():
                    child.kill()
            except psutil.Error:
                pass
    finally:
        os._exit(0)


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # the job's output may be gone with its launcher
        pass


def _orphans_of(trainer: int, me: int, group: int, born: float) -> list:
    """The dead trainer's children (and theirs) that the watchdog had not seen yet: the kernel gives them
    the watchdog's new parent, together with the watchdog."""
    import psutil

    deadline = time.monotonic() + 2.0
    while os.getppid() == trainer and time.monotonic() < deadline:  # the pipe closes before reparenting
        time.sleep(0.01)
    adopter, found = os.getppid(), []
    for process in psutil.process_iter():
        try:
            if (process.pid != me and process.ppid() == adopter and os.getpgid(process.pid) == group
                    and process.create_time() >= born):
                found.append(process)
                found.extend(process.children(recursive=True))
        except (psutil.Error, OSError):
            pass
    return found
