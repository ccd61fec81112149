#!/bin/sh
# Blockspace event hook: mail root when a disk leaves service (failed, missing, failing).
# Needs a working `mail` (bsd-mailx or s-nail); edit `to` to mail someone else (a hook gets
# PATH and the BLOCKSPACE_EVENT_* variables only). Install as for all-syslog.sh.
case "$BLOCKSPACE_EVENT_STATE" in
    failed|missing|failing) ;;
    *) exit 0 ;;
esac
to=root
mail -s "blockspace: pool $BLOCKSPACE_EVENT_POOL disk $BLOCKSPACE_EVENT_DISK is $BLOCKSPACE_EVENT_STATE" "$to" <<MAIL
Pool:    $BLOCKSPACE_EVENT_POOL
Disk:    $BLOCKSPACE_EVENT_DISK ($BLOCKSPACE_EVENT_PATH)
State:   $BLOCKSPACE_EVENT_OLD_STATE -> $BLOCKSPACE_EVENT_STATE
Reason:  $BLOCKSPACE_EVENT_REASON
Time:    $BLOCKSPACE_EVENT_TIME_ISO

See: blockspace pool status $BLOCKSPACE_EVENT_POOL
MAIL
