"""The one-writer lock of a checkpoint directory (``jaxpeft.lock``: pid, host, start time; ``O_EXCL`` + ``flock``)."""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import uuid
import weakref
from collections.abc import Mapping
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock relies on its record (pid, host) alone
    fcntl = None  # type: ignore[assignment]

#: The lock file a writer holds in its checkpoint directory.
LOCK_FILE = "jaxpeft.lock"


class CheckpointLockedError(RuntimeError):
    """Another writer holds the checkpoint directory, or this writer lost its lock; the message names the owner."""


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, in the kernel's clock ticks (Linux), to tell a reused pid from the owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it: assume alive (the lock is then never stale)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed, not replaced)."""
    try:
        named, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _flock(fd: int) -> bool | None:
    """Take the kernel lock of ``fd``: True; None if another process holds it; False if unsupported here."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise
    return True


def _read_record(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"unreadable": text[:80]}


def _release(fd: int, path: str) -> None:
    try:
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)  # releases the flock


class Lock:
    """The one-writer lock of a checkpoint directory: ``jaxpeft.lock`` records the owner (pid, host, start time),
    is created with ``O_EXCL`` and held with ``flock`` while its owner lives, and is removed when it closes.

    A lock is stale, and taken over, when its owner is a dead process on this host (or a reused pid: the process
    start time differs). The kernel lock makes the take-over atomic: of two processes that find the same stale
    lock, one gets it. A lock from another host is never taken over (its process cannot be seen from here).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "process_start": _process_start(os.getpid()),
            "token": uuid.uuid4().hex,
        }
        self._fd = self._acquire()
        self._finalizer = weakref.finalize(self, _release, self._fd, self.path)

    def _acquire(self) -> int:
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # released meanwhile
                    continue
            try:
                if self._take(fd, created):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the file was released and replaced meanwhile: try the new one

    def _take(self, fd: int, created: bool) -> bool:
        kernel = _flock(fd)
        if kernel is None:
            raise CheckpointLockedError(self._held(_read_record(fd)))
        if not _same_file(fd, self.path):
            return False
        owner = _read_record(fd)
        free = (kernel or created) if owner is None else self._stale(owner, kernel)
        if not free:
            raise CheckpointLockedError(self._held(owner))
        data = json.dumps(self.record).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)
        return True

    @staticmethod
    def _stale(owner: Mapping[str, Any], kernel: bool) -> bool:
        if owner.get("host") != socket.gethostname():
            return False
        pid = owner.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
            return kernel  # ours or unknown: only the kernel lock tells whether it is still held
        if not _alive(pid):
            return True
        started, now = owner.get("process_start"), _process_start(pid)
        return started is not None and now is not None and started != now  # the pid was reused

    def _held(self, owner: Mapping[str, Any] | None) -> str:
        pid, here = (owner or {}).get("pid"), (owner or {}).get("host") == socket.gethostname()
        if owner is None:
            who = "a writer that is just starting"
        elif pid == os.getpid() and here:
            who = f"another AdapterCheckpointer of this process (pid {pid}); close it first"
        elif "unreadable" in owner:
            who = f"an unknown owner (the lock file holds {owner['unreadable']!r})"
        else:
            who = f"pid {pid!r} on host {owner.get('host')!r} since {owner.get('started')!r}"
            if here and isinstance(pid, int) and pid > 0 and not _alive(pid):
                who += " (not running: another writer is taking the lock over)"
        return (
            f"checkpoint directory {self.directory!r} is in use by another writer: {who} (lock file {self.path}). "
            "A directory takes one writer, so that no step mixes two runs: save into another directory, wait for "
            "that job to end, or open this one with read_only=True to restore beside it. If that process is gone "
            "(e.g. it ran on another host), delete the lock file."
        )

    def check(self) -> None:
        """Raise when the lock file was removed or replaced since it was taken (another writer may hold it)."""
        if not _same_file(self._fd, self.path):
            raise CheckpointLockedError(
                f"this AdapterCheckpointer lost its lock on {self.directory!r}: the lock file {self.path} was removed "
                "or replaced (or the directory itself) since it was opened, and another writer may be using the "
                "directory now. Nothing was saved; close this checkpointer and open the directory again."
            )

    def release(self) -> None:
        self._finalizer()
