"""Filesystem helpers shared by the tools: outputs that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


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
