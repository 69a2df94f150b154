"""The keeper: a small process that outlives its parent, to deliver the journal of a
process with ``spool_dir`` that died without closing, and end the runs it left running.

The parent's side (:mod:`actors.keeper._link`: start, records, restarts), the keeper's own
loop (:mod:`actors.keeper._main`: standard library only, loaded by its path) and what it does
after the death (:mod:`actors.keeper._recovery`).
"""

from actors.keeper._link import LINK, KeeperLink

__all__ = ["LINK", "KeeperLink"]
