"""Children die with the trainer.

megatron's checkpoint writers (forked), its results-queue manager (spawned) and the data-loader
workers outlive a trainer killed with SIGKILL (an OOM kill, ``kill -9``, a scheduler's hard stop):
hundreds of MB each, holding files and GPU-side resources. :func:`start` forks a small watchdog
before anything heavy is imported. It learns the trainer's descendants once a second, and when the
trainer is gone (its end of a pipe closes, however it died) it kills the ones still running, and
the trainer's children born since its last look: orphaned like the watchdog itself, they now have
its new parent, in the trainer's process group. psutil compares process start times, so a recycled
pid is never killed.
"""

from __future__ import annotations

import os
import select
import signal
import time


def start() -> int:
    """Fork the watchdog of this process; returns its pid."""
    read_fd, write_fd = os.pipe()
    trainer = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        _watch(trainer, read_fd)  # never returns
    os.close(read_fd)
    os.set_inheritable(write_fd, False)  # exec'd (spawned) children do not hold it open
    os.register_at_fork(after_in_child=lambda: _close(write_fd))  # nor do forked ones
    return pid


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _watch(trainer: int, fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer; its exit ends the watch
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
