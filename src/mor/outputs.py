"""Output folders: checked before any work starts, and locked while a process writes them.

``writable_folder``/``writable_file`` fail in seconds, with a message that names the path and the fix, where a
write would otherwise fail after hours of work (a path under a file, a read-only or full disk, no permission).

``FolderLock`` gives one process at a time a folder (a training run, a prepared dataset): an OS file lock
(``flock``) on ``FOLDER/.lock``, which records the holder's pid. The OS drops the lock when its process dies, so a
lock left behind by a killed process never blocks anyone: it is reported as stale and taken over.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

LOCK_FILE = ".lock"


class OutputError(ValueError):
    """An output that cannot be written: the message names the path, the reason and what to do."""


# Each errno that a file operation commonly fails with: a plain reason and what to do about it. The one table of
# them: the checks below and the command's error reporter (mor.errors) both read it.
OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another path"),
    errno.EEXIST: ("a file is in the way where a folder is needed", "move the file or choose another path"),
    errno.EISDIR: ("it is a folder, not a file", "give a file's path"),
    errno.EACCES: ("permission denied", "fix its permissions or write elsewhere"),
    errno.EPERM: ("the operation is not permitted (an immutable or protected folder)",
                  "fix its permissions or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "write elsewhere"),
    errno.ENOSPC: ("no space is left on the device", "free some space or write elsewhere"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or write elsewhere"),
    errno.ENOENT: ("it does not exist", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
}
DEFAULT_OS_FIX = "check the path"


def os_error_text(error: OSError) -> tuple[str, str]:
    """``(reason, fix)`` for a failed file operation, e.g. ``("no space is left on the device", "free some space
    or write elsewhere")``."""
    reason, fix = OS_ERRORS.get(error.errno, (None, DEFAULT_OS_FIX))
    return reason or error.strerror or str(error), fix


def writable_folder(path: str | Path, what: str, create: bool = True) -> Path:
    """Check that files can be written in folder ``path`` (``what`` names it in errors, e.g. ``--out``).

    ``create=True`` creates the folder and its parents; ``create=False`` (a dry run) changes nothing lasting and
    checks the nearest folder that exists instead."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what}: {path} is a file, not a folder; choose another path")
    target = path
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        else:
            while not target.exists():
                target = target.parent
            if not target.is_dir():
                raise OutputError(f"{what}: {path} lies under {target}, which is a file; choose another path")
        fd, probe = tempfile.mkstemp(dir=target, prefix=".mor-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason, fix = os_error_text(error)
        raise OutputError(f"{what}: cannot write to {path} ({reason}); {fix}") from None
    return path


def writable_file(path: str | Path, what: str) -> Path:
    """Check that file ``path`` can be written, creating its folder if needed."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what}: {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    writable_folder(path.parent, what)
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class FolderLock:
    """An exclusive lock on ``folder`` for one process, from :meth:`acquire` to :meth:`release`.

    ``command`` (e.g. ``"mor train"``) is recorded with the pid and named to anyone who finds the folder taken.
    """

    def __init__(self, folder: str | Path, command: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self._file: BinaryIO | None = None  # a file object: if the holder is dropped unreleased, closing frees the lock

    def acquire(self) -> FolderLock:
        """Take the lock (creating the folder if needed) or raise :class:`OutputError` naming the process that holds
        it, or why the folder cannot be written."""
        import fcntl  # POSIX only: imported here so that the rest of mor, the command included, loads anywhere

        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                reason, fix = os_error_text(error)
                raise OutputError(f"cannot write to {self.folder} ({reason}); {fix}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read_holder(fd))
                os.close(fd)
                raise OutputError(f"{self.folder} is in use by {holder}; wait for it to finish, stop it, or choose "
                                  "another folder") from None
            # The holder before us may have removed the file between our open and our lock: lock the file that
            # is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale.get("pid") not in (None, os.getpid()):
            print(f"note: {self.folder} was locked by {_describe(stale)}, which is no longer running (killed?); "
                  "taking it over", file=sys.stderr)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._file = os.fdopen(fd, "r+b")
        return self

    def release(self) -> None:
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked, so nobody takes a file that is going away
        self._file.close()
        self._file = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # written by hand, or a holder killed while writing it
        return {}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "another process"
    where = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
    return f"{holder.get('command', 'a process')} (process {holder['pid']}{where})"
