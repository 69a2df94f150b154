"""The spool: the durable journal (a SQLite file per client) of what could not be delivered,
its format and checks, the live spooling of a session's failed work, and its replay.
"""

from actors.spool._ends import end_pending_runs
from actors.spool._files import check_spool_dir, remove_stale_new, side_files, spool_files
from actors.spool._format import (
    NEW_SUFFIX,
    PREFIX,
    SIDE_SUFFIXES,
    SpoolCorrupt,
    SpoolError,
    SpoolGone,
    SpoolLocked,
    SpoolVersion,
)
from actors.spool._replay import deliver, deliver_run
from actors.spool._spool import Spool
from actors.spool._spooling import Spooler

__all__ = [
    "NEW_SUFFIX",
    "PREFIX",
    "SIDE_SUFFIXES",
    "Spool",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolGone",
    "SpoolLocked",
    "SpoolVersion",
    "Spooler",
    "check_spool_dir",
    "deliver",
    "deliver_run",
    "end_pending_runs",
    "remove_stale_new",
    "side_files",
    "spool_files",
]
