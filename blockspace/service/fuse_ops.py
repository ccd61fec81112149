"""The FUSE adapter: a directory with one regular file per volume.

It only translates: inode -> volume, request -> volume call, exception -> errno. Nothing
about slabs or disks lives here.
"""

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from typing import NoReturn, Protocol, cast

import pyfuse3

from blockspace.errors import BlockspaceError, InvalidInput, NoSpace
from blockspace.ondisk.metadata import VolumeRecord
from blockspace.service.iostats import IoStats

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
FIRST_VOLUME_INODE = ROOT_INODE + 1
BLKSIZE = 4096


class ServedVolume(Protocol):
    """What the adapter serves as one file: a plain `Volume` (blockspace/volume/volume.py)
    or a `TieredVolume` (blockspace/tiering/tiered_volume.py)."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def record(self) -> VolumeRecord: ...  # its slabs give the file's allocated blocks

    @property
    def slab_data_size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...


def errno_of(error: BaseException) -> int:
    """The errno a failed request answers with."""
    if isinstance(error, NoSpace):
        return errno.ENOSPC
    if isinstance(error, InvalidInput):
        return errno.EINVAL
    return int(getattr(error, "errno", errno.EIO) or errno.EIO)


class VolumeFS(pyfuse3.Operations):
    """`volumes` is called on every lookup, so volumes created or deleted through the
    control socket appear and disappear without a remount."""

    def __init__(
        self, volumes: Callable[[], Mapping[str, ServedVolume]], *, uid: int, gid: int,
        io: IoStats | None = None, on_error: Callable[[str, str, int], None] | None = None,
    ) -> None:
        super().__init__()
        self._volumes = volumes
        # Counted per request (iostat, metrics); `on_error(volume, op, errno)` per failure.
        self.io = io if io is not None else IoStats()
        self.on_error = on_error
        self._uid = uid
        self._gid = gid
        self._inodes: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._open_counts: dict[str, int] = {}
        self._started = time.time_ns()

    # ---- inode bookkeeping ----------------------------------------------------------

    def _inode_of(self, name: str) -> int:
        inode = self._inodes.get(name)
        if inode is None:
            inode = FIRST_VOLUME_INODE + len(self._inodes)
            self._inodes[name] = inode
            self._names[inode] = name
        return inode

    def _volume(self, inode: int) -> ServedVolume:
        name = self._names.get(inode)
        volume = self._volumes().get(name) if name is not None else None
        if volume is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return volume

    def is_open(self, name: str) -> bool:
        return self._open_counts.get(name, 0) > 0

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_uid = self._uid
        entry.st_gid = self._gid
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self._started
        entry.st_blksize = BLKSIZE
        entry.attr_timeout = 1
        entry.entry_timeout = 1
        if inode == ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
            entry.st_size = 0
        else:
            volume = self._volume(inode)
            # 0600 under default_permissions: only the owner (root by default) may open it,
            # even with allow_other.
            entry.st_mode = stat.S_IFREG | 0o600
            entry.st_nlink = 1
            entry.st_size = volume.size
            entry.st_blocks = len(volume.record.slabs) * volume.slab_data_size // 512
        return entry

    # ---- directory ------------------------------------------------------------------

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        text = os.fsdecode(name)
        if text == ".":
            return self._attributes(ROOT_INODE)
        if text not in self._volumes():
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(self._inode_of(text))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names = sorted(self._volumes())
        for index, name in enumerate(names[start_id:], start=start_id):
            attributes = self._attributes(self._inode_of(name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attributes, index + 1):
                break

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        total = sum(v.size for v in self._volumes().values())
        data.f_bsize = data.f_frsize = BLKSIZE
        data.f_blocks = total // BLKSIZE
        data.f_bfree = data.f_bavail = 0
        data.f_files = data.f_ffree = data.f_favail = 0
        data.f_namemax = 64
        return data

    # ---- files ----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        volume = self._volume(inode)
        self._open_counts[volume.name] = self._open_counts.get(volume.name, 0) + 1
        # direct_io: every request reaches us, no second copy in the page cache.
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def release(self, fh: int) -> None:
        name = self._names.get(fh)
        if name is not None and self._open_counts.get(name, 0) > 0:
            self._open_counts[name] -= 1

    async def read(self, fh: int, off: int, size: int) -> bytes:
        volume = self._volume(fh)
        if off >= volume.size:
            return b""
        size = min(size, volume.size - off)
        began = time.perf_counter()
        try:
            # pyfuse3 sends any buffer; its stub says bytes. The volume's bytearray goes out as it
            # is, without a copy.
            data = cast(bytes, await volume.read(off, size))
        except BlockspaceError as error:
            log.error("read %s at %d+%d failed: %s", volume.name, off, size, error)
            self._failed(volume.name, "read", began, error)
        self.io.volume(volume.name).read.add(size, time.perf_counter() - began, False)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        volume = self._volume(fh)
        if off + len(buf) > volume.size:
            # A block device has a fixed size; writing past its end is "no space".
            raise pyfuse3.FUSEError(errno.ENOSPC if off < volume.size else errno.EFBIG)
        began = time.perf_counter()
        try:
            await volume.write(off, buf)
        except BlockspaceError as error:
            log.error("write %s at %d+%d failed: %s", volume.name, off, len(buf), error)
            self._failed(volume.name, "write", began, error)
        self.io.volume(volume.name).write.add(len(buf), time.perf_counter() - began, False)
        return len(buf)

    async def flush(self, fh: int) -> None:
        await self._sync(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._sync(fh)

    async def _sync(self, fh: int) -> None:
        volume = self._volume(fh)
        began = time.perf_counter()
        try:
            await volume.flush()
        except BlockspaceError as error:
            log.error("flush %s failed: %s", volume.name, error)
            self._failed(volume.name, "flush", began, error)
        self.io.volume(volume.name).flush.add(0, time.perf_counter() - began, False)

    def _failed(self, name: str, op: str, began: float, error: BlockspaceError) -> NoReturn:
        """Count a failed request, report it, and answer it with its errno."""
        code = errno_of(error)
        getattr(self.io.volume(name), op).add(0, time.perf_counter() - began, True)
        if self.on_error is not None:
            self.on_error(name, op, code)
        raise pyfuse3.FUSEError(code) from None

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        current = self._attributes(inode)
        if fields.update_size and attr.st_size != current.st_size:
            raise pyfuse3.FUSEError(errno.EPERM)  # sizes change through `volume grow`
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)  # ownership is set at mount (--owner)
        return current  # timestamps: accepted and ignored
