"""Writing files so that a crash, a kill or a second process never leaves half of one behind, and
so that shared files stay shared: the leaf module that model.py, data.py, responses.py, evaluate.py
and checkpoint.py all import (it imports nothing of ours).

Locks are the kernel's (`fcntl.flock` on a lock file): the kernel releases one when its holder
dies, however it dies, so a killed run never leaves a stale lock behind — unlike a pid file or an
exists-test. On a network filesystem flock is only as good as the filesystem's locking: NFSv4 and
NFSv3 with lockd lock across machines; some mounts (`local_lock=all`, `nolock`, Lustre without
`-o flock`) lock per machine only, and there two machines can run into the same directory.
"""
import contextlib
import errno
import fcntl
import os
import shutil


class Busy(Exception):
    """Another process holds the lock (raised by `locked(..., wait=False)`)."""


@contextlib.contextmanager
def locked(path, wait=True, on_wait=None):
    """Hold an exclusive lock on the file `path` (made if missing) for the `with` block. wait=False:
    raise Busy at once if another process holds it; else block until it is free, calling
    on_wait() once first (to say why we wait)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            if not wait:
                raise Busy(path) from None
            if on_wait:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask():
    """This process's umask, read without changing it (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a crash never leaves a half-written file
    behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as an ordinary write would (some writers make 0600 files)
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
