"""Writing files so that a crash never leaves half of one behind: the leaf module that model.py,
data.py, responses.py, evaluate.py and checkpoint.py all import (it imports nothing of ours)."""
import os
import shutil


def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a crash never leaves a half-written file
    behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_dir(path, write):
    """Call write(tmp_dir), then put the directory in place of `path` (best/, a stage's output):
    readers see the old directory or the new one, whole, never a half-written one."""
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
