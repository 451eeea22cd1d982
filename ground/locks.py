"""
Locks: one process at a time in a run folder, and one builder at a time for each entry of the shared cache.

An lgd lock is an flock on a lock file with the holder's pid, host and start time written inside (for the
messages a waiting run prints). The kernel releases an flock when its process dies (kill -9 included), so a
dead holder's lock is free for the next taker without any guessing from pids.

  Lock               the lock itself (acquire, optionally waiting; release)
  live_holder        who holds a folder's lock now (None: nobody alive)
  cache_entry        `with cache_entry(path, what) as missing:` build a shared cache entry once
  remove_stale_temporaries   a killed run's reserved temporaries, removed by whoever holds the lock
"""
import fcntl
import glob
import json
import os
import socket
import time

from ground.common import TEMPORARY, print0, remove_path

LOCK = ".lgd-lock"      # held while a run works in a folder, or beside a cache entry being built (an flock)


def lock_owner(lock, patience=1.0):
    """Who wrote the lock file (pid, host, start time). The holder writes them just after taking the flock, so a
    reader that looks in that instant finds an empty file: it looks again for up to `patience` seconds rather than
    say "pid ?"; {} if the file stays empty or unreadable."""
    deadline = time.time() + patience
    while True:
        try:
            with open(lock) as f:
                return json.load(f)
        except (OSError, ValueError):
            if time.time() > deadline:
                return {}
        time.sleep(0.01)


def holder_line(owner):
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('started', '?')}"


class Lock:
    """An exclusive flock on a lock file, with the holder's pid, host and start time written inside for messages.

    The kernel releases an flock when its process dies (kill -9 included), so a dead holder's lock is free for
    the next taker without any guessing from pids. Release unlinks the file while still holding it; a waiter that
    opened the old file then finds the path gone or replaced and tries again (the standard inode check).
    """

    def __init__(self, path):
        self.path, self.fd = path, None

    def acquire(self, wait=False, on_wait=None):
        """True once held; False if another live process holds it and wait is False. on_wait(owner) is called
        once before blocking."""
        told = False
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)  # O_CREAT: also the folder's writability check
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        os.close(fd)
                        return False
                    if on_wait is not None and not told:
                        on_wait(lock_owner(self.path))
                        told = True
                    fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder releases it or dies
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # released (unlinked) while we waited: lock the file that is there now
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self.fd = fd
            return True

    def release(self):
        if self.fd is not None:
            remove_path(self.path)  # unlinked while held: nobody can take the old file after us
            os.close(self.fd)
            self.fd = None


def live_holder(folder):
    """The owner of a live run's lock in `folder` ({pid, host, started}), or None when no live run holds it."""
    lock = os.path.join(folder, LOCK)
    if not os.path.exists(lock):
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: taken only if nobody holds it exclusively
        return None
    except BlockingIOError:
        return lock_owner(lock)
    finally:
        os.close(fd)  # closing drops our shared lock (if we got it): the file stays as it was


class cache_entry:
    """`with cache_entry(path, what) as missing:` build the entry when `missing`; one run at a time.

    A cache entry (the digits prior, theta*'s trajectory) is shared by every run of the checkout. While one run
    builds it, it holds `.<name>.lgd-lock` beside it; a second run waits (saying for whom), then finds it built
    and reuses it. A killed builder's lock is free at once (flock); its temporaries are removed by the next
    builder, which then resumes or restarts the build. Entries are renamed into place whole, so "exists" means
    "complete" and no lock is needed to read one.
    """

    def __init__(self, path, what):
        self.path, self.what = path, what
        folder, name = os.path.split(os.path.abspath(path))
        self.lock = Lock(os.path.join(folder, f".{name}{LOCK}"))

    def __enter__(self):
        if os.path.exists(self.path):
            return False
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.lock.acquire(wait=True, on_wait=lambda owner: print0(
            f"waiting for {self.what}: {self.path} is being built by {holder_line(owner)} (if no run is building it, "
            f"remove {self.lock.path})"))
        folder, name = os.path.split(os.path.abspath(self.path))
        for leftover in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.lgd-tmp-*")):
            if TEMPORARY.match(os.path.basename(leftover)):  # a killed builder's half-written entry
                remove_path(leftover)
        return not os.path.exists(self.path)

    def __exit__(self, *exc):
        self.lock.release()
        return False


def remove_stale_temporaries(folders):
    """Delete the reserved temporaries (`.<name>.lgd-tmp-<pid>`) a killed run left in `folders`.

    Only names of that form are touched (a user's `notes.tmp1` is not ours), and only under the folders given,
    which the caller holds the lock of. Readers never look at temporaries: this only tidies.
    """
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in files + dirs:
                if TEMPORARY.match(name):
                    remove_path(os.path.join(root, name))
