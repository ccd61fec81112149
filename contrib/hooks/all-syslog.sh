#!/bin/sh
# Blockspace event hook: every event to syslog (journald picks it up), at a priority by class.
# Install: cp all-syslog.sh /etc/blockspace/hooks.d/ && chmod 755 it (root-owned, writable
# by root only, or the daemon skips it). The event arrives as BLOCKSPACE_EVENT_* variables.
case "$BLOCKSPACE_EVENT_CLASS" in
    disk_state)
        case "$BLOCKSPACE_EVENT_STATE" in
            online|resyncing) priority=daemon.notice ;;
            *) priority=daemon.err ;;
        esac ;;
    checksum_error|io_error|enospc|threshold) priority=daemon.warning ;;
    *_finish) [ "${BLOCKSPACE_EVENT_RESULT:-done}" = done ] && priority=daemon.info \
              || priority=daemon.err ;;
    *) priority=daemon.info ;;
esac
details=$(env | grep '^BLOCKSPACE_EVENT_' | grep -v -e '_CLASS=' -e '_POOL=' -e '_TIME' \
          | sed 's/^BLOCKSPACE_EVENT_//' | sort | tr '\n' ' ')
exec logger -t blockspace -p "$priority" \
    "pool $BLOCKSPACE_EVENT_POOL: $BLOCKSPACE_EVENT_CLASS $details"
