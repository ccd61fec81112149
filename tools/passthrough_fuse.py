#!/usr/bin/env python3
"""A minimal pyfuse3 pass-through server: the Python FUSE ceiling for `tools/bench`.

It serves a directory with one regular file, `MOUNTPOINT/disk`, backed by one image file.
Every read/write/fsync goes straight to the image:

* default (`--io blocking`): the handler calls `os.pread`/`os.pwrite` inline, blocking the
  trio thread for the length of the syscall. Nothing can be faster in pyfuse3; it is also
  what a real server must not do (a slow disk stalls every request).
* `--io thread`: each call goes through `trio.to_thread.run_sync`, the textbook way of not
  blocking trio, and what a per-I/O thread hop costs.

The image is opened buffered, like Blockspace's disks. The served file is opened with
`direct_io` so every request of the loop device reaches the handler, as Blockspace does.
SIGTERM/SIGINT unmount cleanly.

    python3 tools/passthrough_fuse.py IMAGE MOUNTPOINT [--io blocking|thread] [--min-tasks N]
                                      [--no-direct-io] [--loop stock|queued]

`--loop queued` serves through Blockspace's FUSE loop (blockspace/service/fuse_loop.py: requests
already queued on /dev/fuse are read at once); the default is pyfuse3's own loop, the baseline
of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blockspace.service.fuse_loop import FuseLoop  # noqa: E402

FILE_NAME = b"disk"
FILE_INODE = pyfuse3.ROOT_INODE + 1


class PassThrough(pyfuse3.Operations):
    def __init__(self, fd: int, size: int, threaded: bool, direct_io: bool = True) -> None:
        super().__init__()
        self.fd = fd
        self.direct_io = direct_io
        self.size = size
        self.threaded = threaded
        self.started = time.time_ns()

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self.started
        entry.st_blksize = 4096
        entry.attr_timeout = entry.entry_timeout = 60
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
        elif inode == FILE_INODE:
            entry.st_mode = stat.S_IFREG | 0o600
            entry.st_nlink = 1
            entry.st_size = self.size
            entry.st_blocks = self.size // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attributes(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=self.direct_io, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        size = max(0, min(size, self.size - off))
        try:
            if self.threaded:
                return await trio.to_thread.run_sync(os.pread, self.fd, size, off)
            return os.pread(self.fd, size, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        try:
            if self.threaded:
                return await trio.to_thread.run_sync(os.pwrite, self.fd, buf, off)
            return os.pwrite(self.fd, buf, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.threaded:
            await trio.to_thread.run_sync(os.fdatasync, self.fd)
        else:
            os.fdatasync(self.fd)

    async def flush(self, fh: int) -> None:
        return None

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attributes(inode)


async def _serve(min_tasks: int, loop: FuseLoop | None) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    if loop is not None:
                        loop.terminate()
                    else:
                        pyfuse3.terminate()

        nursery.start_soon(watch_signals)
        if loop is not None:
            await loop.main()
        else:
            await pyfuse3.main(min_tasks=min_tasks)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image")
    parser.add_argument("mountpoint")
    parser.add_argument("--io", choices=("blocking", "thread"), default="blocking")
    parser.add_argument("--min-tasks", type=int, default=1, help="pyfuse3.main(min_tasks=N)")
    parser.add_argument("--no-direct-io", action="store_true",
                        help="open the file without FOPEN_DIRECT_IO (the kernel's O_DIRECT path)")
    parser.add_argument("--loop", choices=("stock", "queued"), default="stock",
                        help="pyfuse3's own loop, or Blockspace's (queued requests read at once)")
    args = parser.parse_args(argv)

    fd = os.open(args.image, os.O_RDWR | os.O_CLOEXEC)
    size = os.fstat(fd).st_size
    ops = PassThrough(fd, size, threaded=args.io == "thread", direct_io=not args.no_direct_io)
    options = set(pyfuse3.default_options)
    options |= {"fsname=passthrough", "subtype=passthrough", "allow_other"}
    loop = FuseLoop() if args.loop == "queued" else None
    if loop is not None:
        loop.init(ops, args.mountpoint, options)
    else:
        pyfuse3.init(ops, args.mountpoint, options)
    print("ready", flush=True)
    try:
        trio.run(_serve, args.min_tasks, loop)
    finally:
        pyfuse3.close(unmount=True)
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
