"""Small file helpers shared by the stages."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

from antimatter.errors import UserError

STAGE_MARK = ".antimatter-stage"  # written first into a stage's folder: the stage may clear this folder again


def walk_entries(folder: str | Path, hidden: bool = True,
                 prune: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Every entry under `folder` that is not a folder (files, and FIFOs, sockets or dangling links for the
    caller to sort out), in sorted order, through links to folders too, each folder once: a link loop ends
    there. A folder that cannot be read is a UserError, not a silently shorter list. A folder below `folder`
    for which `prune` is true is not entered."""

    def unreadable(e: OSError) -> None:
        raise UserError(f"cannot read the folder {e.filename} ({e.strerror}): make it readable, or move it out "
                        f"of {folder}")

    seen: set[str] = set()
    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # reached again through a link
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in sorted(dirs) if (hidden or not d.startswith("."))
                   and not (prune is not None and prune(Path(root) / d))]
        yield from (Path(root) / n for n in sorted(names) if hidden or not n.startswith("."))


def as_created_here(path: str | Path) -> None:
    """Give a file the permissions of one made with open() (0o666 less the umask): safetensors writes its
    files 0o600, so others on the machine (a shared group, a web server of the Hub folder) could not read them
    while every file beside them can be."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temp file and rename, so a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst stream, frame after frame, that raises at the end when the last frame
    did not end: python-zstandard's stream reader returns a clean EOF at a cut, so a truncated file would
    read as a shorter complete one."""

    def __init__(self, raw: BinaryIO, name: str):
        self.raw, self.name = raw, name
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False  # bytes of the current frame were fed and it has not ended
        self._buf, self._pos = b"", 0  # decompressed bytes not yet handed out: self._buf[self._pos:]

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._buf):
            self._buf, self._pos = b"", 0
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise UserError(f"{self.name} is truncated (its last zstd frame does not end): the file was "
                                    f"cut while being written or copied; write or copy it again")
                return 0
            while chunk:
                self._in_frame = True
                self._buf += self._obj.decompress(chunk)
                chunk = b""
                if self._obj.eof:  # a frame ended: the rest belongs to the next one
                    chunk, self._in_frame = self._obj.unused_data, False
                    self._obj = self._dctx.decompressobj()
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = memoryview(self._buf)[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


def open_zstd(raw: BinaryIO, name: str | Path) -> io.BufferedReader:
    """A buffered reader of the .zst stream `raw` that refuses a truncated file (closing it closes `raw`)."""
    return io.BufferedReader(_ZstdFrames(raw, str(name)), 1 << 20)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str,
                   fix: str = "wait for it to end or stop it (or use another run name)") -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block, or raise a UserError naming the process that holds it
    (and `fix`, what to do). flock locks end with their process, so a killed holder (kill -9) leaves no stale
    lock behind; they hold between processes of one machine (and across machines on file systems that
    support flock)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no lock
        yield
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder of the path should be: say that, not "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(f"{what} is in use by {holder}: {fix}; the lock is {path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


_HELD: set[Path] = set()  # the folders whose `folder_lock` this process holds


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, fix: str) -> Iterator[None]:
    """`exclusive_lock` for a folder that one command writes (`prepare --out`, `export --out`): the lock is
    `.NAME.lock` beside the folder, not in it, so the folder holds only what the command writes; a link takes
    the lock of the folder it names. Held once per process: a holder may call code that takes it again."""
    real = Path(folder).resolve()
    if real in _HELD:
        yield
        return
    with exclusive_lock(real.parent / f".{real.name}.lock", what, fix):
        _HELD.add(real)
        try:
            yield
        finally:
            _HELD.discard(real)
