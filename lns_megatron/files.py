"""Filesystem helpers shared by the tools: outputs that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import List, Sequence


@contextlib.contextmanager
def atomic_directory(output: str):
    """Yields a temporary directory beside ``output`` that replaces ``output`` only if the block succeeds:
    a crash or Ctrl-C never leaves a directory under the final name that looks complete."""
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=parent)
    try:
        yield partial
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp makes it private
        for name in os.listdir(partial):
            os.chmod(os.path.join(partial, name), 0o666 & ~umask)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.rename(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(paths: Sequence[str]):
    """Yields a temporary name beside each of ``paths``; if the block succeeds, the temporaries it wrote
    replace ``paths`` in the given order (put the file that makes the set look complete last), else they
    are removed. Files already under the final names go first, last one first, so an interrupted
    replacement never pairs an old file with a new one, and a path the block did not write is left
    absent rather than stale."""
    tag = f".tmp-{os.getpid()}"
    temps: List[str] = [path + tag for path in paths]
    try:
        yield temps
        for path in reversed(paths):
            if os.path.exists(path):
                os.remove(path)
        for temp, path in zip(temps, paths):
            if os.path.exists(temp):
                os.replace(temp, path)
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)
