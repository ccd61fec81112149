"""The one wording of a failed device request in the log: which disk, what, where, how much,
and the errno the OS (or the fault layer) gave, so an operator can match a line to the
kernel's or the drive's own log without guessing."""

import errno as errno_module

from blockspace.errors import BlockspaceError


def errno_text(error: BaseException) -> str:
    """"errno 5 (EIO)", or "errno ?" when the OS gave none (a short read, a closed device)."""
    code = getattr(error, "os_errno", None)
    if not isinstance(code, int):
        code = getattr(error, "errno", None) if not isinstance(error, BlockspaceError) else None
    if not isinstance(code, int):
        return "errno ?"
    return f"errno {code} ({errno_module.errorcode.get(code, 'unknown')})"


def io_error_line(disk_id: int, what: str, offset: int | None, length: int | None,
                  error: BaseException) -> str:
    """`disk 2: read failed at offset 1048576 length 65536, errno 5 (EIO): <the error>`;
    a request with no range (a flush) says so."""
    where = ("the whole disk" if offset is None
             else f"offset {offset} length {length if length is not None else '?'}")
    return f"disk {disk_id}: {what} failed at {where}, {errno_text(error)}: {error}"
