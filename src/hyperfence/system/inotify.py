"""Linux inotify through libc (ctypes: the standard library has no binding): which files of one directory
were written, as a descriptor a loop can `select` on.

Used by the store's change feed (`adapters/store/feed.py`) to see another process commit to the database
without polling it.
"""

from __future__ import annotations

import ctypes
import os
import struct

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name
OVERFLOW = ""  # the name reported when the kernel's queue overflowed: anything may have changed


class DirectoryWatch:
    """Written, created or moved-in files of `directory` (not recursive). `fileno()` becomes readable when
    there are events; `read()` drains them and returns the names seen (`OVERFLOW` among them when the
    kernel dropped events). Raises OSError when inotify is unavailable."""

    def __init__(self, directory: str, mask: int = IN_MODIFY | IN_CREATE | IN_MOVED_TO) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if libc.inotify_add_watch(self._fd, os.fsencode(directory), ctypes.c_uint32(mask)) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")

    def fileno(self) -> int:
        return self._fd

    def read(self) -> set[str]:
        names: set[str] = set()
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset + _EVENT.size <= len(buf):
                _, mask, _, length = _EVENT.unpack_from(buf, offset)
                offset += _EVENT.size
                name = buf[offset : offset + length].rstrip(b"\0")
                offset += length
                names.add(OVERFLOW if mask & IN_Q_OVERFLOW else os.fsdecode(name))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
