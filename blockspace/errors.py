"""Exception types. A `BlockspaceError` is a user-facing error: one line, no traceback."""

import errno


class BlockspaceError(Exception):
    """An error the user can act on; the CLI prints its message and exits non-zero."""

    exit_code = 1


class InvalidInput(BlockspaceError):
    """Bad arguments: nothing was changed."""

    exit_code = 2


class NoSpace(BlockspaceError):
    """The pool has no room for the requested allocation."""

    errno = errno.ENOSPC


class FormatError(BlockspaceError):
    """An on-disk structure (label, metadata) is damaged, foreign or crafted; it is not trusted."""


class DeviceError(BlockspaceError):
    """A disk could not be opened, read or written."""

    errno = errno.EIO


class HostSpaceError(DeviceError):
    """The host file system under an image (or a thin device's pool) has no room for a write
    (ENOSPC, EDQUOT): a fault of the host, not of the disk. The write fails with ENOSPC and
    the disk stays in service (README, "Disks and failures")."""

    errno = errno.ENOSPC


class Unrecoverable(BlockspaceError):
    """Data cannot be read: too many columns of a stripe are unavailable."""

    errno = errno.EIO


class SlabUnmapped(BlockspaceError):
    """The slab an I/O was working on was unmapped (discarded) while it waited for its
    locks: the caller starts again from the map (where the slab now reads as zeros)."""

    errno = errno.EIO
