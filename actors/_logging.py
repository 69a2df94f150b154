"""The ``runactors`` logger hierarchy: every logger of :mod:`actors` and :mod:`client` is
named under ``runactors`` (Pykka names its loggers under ``pykka``), one per subpackage of
the runtime and one per concern of the client, so an application sets a level or a handler
once, on ``logging.getLogger("runactors")``.

A library logger without a handler reaches Python's ``logging.lastResort`` when the program
configured no logging, which prints the bare message: a warning at exit would not say where it
came from. Pykka's ``NullHandler`` would silence them instead, and they are what a script
without logging learns about a lost flush or a spool to replay. So ``runactors`` has one
handler, :class:`_LastResort`: while no handler of the program's own is on a record's way up
(root included), it writes what ``lastResort`` would (``WARNING`` and above, to the stderr of
now) with the package named, ``runactors: <message>``; once logging is configured, it stays
silent and the program's handlers alone decide (as MLflow's own handler does not).
"""

from __future__ import annotations

import logging
import sys

ROOT_LOGGER = "runactors"


class _LastResort(logging.Handler):
    """Python's ``logging.lastResort`` for runactors' records, with the package named."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(f"{ROOT_LOGGER}: %(message)s"))

    def handle(self, record: logging.LogRecord) -> bool:
        if logging.lastResort is None or _configured(logging.getLogger(record.name), self):
            return False  # the program decides (or turned the last resort off)
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")  # stderr of now, as lastResort
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _configured(logger: logging.Logger, own: logging.Handler) -> bool:
    """Whether a record of ``logger`` meets a handler other than ``own`` on its way up."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(h is not own for h in current.handlers):  # a NullHandler too, as for lastResort
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


logging.getLogger(ROOT_LOGGER).addHandler(_LastResort())
