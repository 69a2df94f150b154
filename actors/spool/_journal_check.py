"""What a journal holds, and whether all of it can be read (its -wal checked without SQLite).

SQLite's WAL recovery reads frames while their salts and chained checksums are valid and
silently stops at the first bad one: one flipped byte in the middle of a ``-wal`` file
drops every transaction committed after it, and the database opens as if they never
happened. A journal that opened that way would be delivered and deleted with half its
calls. This module reads the ``-wal`` file as bytes (nothing is written, SQLite never opens
it): if complete commit frames of the current WAL generation follow the point where
recovery would stop, committed writes would be lost, and the journal must be refused.

The journal's ``totals`` row (kept by triggers in the same transaction as every write and
delete, see :mod:`actors.spool._spool`) is read from the frames themselves, to say what the last
commit promised and what the readable part holds.
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path
from typing import NamedTuple

_MAGIC = (0x377F0682, 0x377F0683)  # little- / big-endian checksums
_WAL_HEADER = 32
_FRAME_HEADER = 24
TOTALS = ("runs", "calls", "metrics", "params", "tags", "datasets")
# What the rows hold, to compare with the totals row (the same columns, in order).
_FOUND = (
    "SELECT (SELECT COUNT(*) FROM runs), COUNT(*), COALESCE(SUM(metrics), 0),"
    " COALESCE(SUM(params), 0), COALESCE(SUM(tags), 0), COALESCE(SUM(datasets), 0) FROM calls"
)


class WalLoss(NamedTuple):
    """Committed writes SQLite would not read from a journal's ``-wal``."""

    offset: int  # byte of the -wal where SQLite's recovery stops
    commits: int  # committed transactions after that point
    promised: dict[str, int] | None  # totals at the last commit (None: unknown)
    readable: dict[str, int] | None  # totals at the last commit SQLite reads


def _checksum(data: bytes, seed: tuple[int, int], big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), continuing ``seed``."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    s0, s1 = seed
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        byte = data[at + i]
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, at + i + 1
    return (value << 8) | data[at + 8], at + 9


def totals_of_page(page: bytes) -> dict[str, int] | None:
    """The one row of the ``totals`` table from its b-tree leaf page; None if it is not one."""
    try:
        if page[0] != 0x0D or struct.unpack(">H", page[3:5])[0] != 1:
            return None
        at = struct.unpack(">H", page[8:10])[0]
        _, at = _varint(page, at)  # payload size
        _, at = _varint(page, at)  # rowid
        header_size, body = _varint(page, at)
        types = []
        while body < at + header_size:
            serial, body = _varint(page, body)
            types.append(serial)
        at += header_size
        values = []
        sizes = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 8: 0, 9: 0}
        for serial in types:
            size = sizes[serial]  # KeyError for a float, text or blob: not our row
            raw = page[at : at + size]
            values.append(
                int.from_bytes(raw, "big", signed=True) if size else (1 if serial == 9 else 0)
            )
            at += size
        if len(values) != 1 + len(TOTALS):  # the id column (a rowid alias) reads as NULL
            return None
        return dict(zip(TOTALS, values[1:], strict=True))
    except (IndexError, KeyError, struct.error):
        return None


def totals_in_file(path: Path) -> tuple[int | None, dict[str, int] | None]:
    """The ``totals`` table's root page and row in the main file alone (``immutable``:
    SQLite neither reads nor touches the ``-wal`` and ``-shm`` files); None for a journal
    without the table (format version 1)."""
    db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        row = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'totals'").fetchone()
        if row is None:
            return None, None
        values = db.execute(f"SELECT {', '.join(TOTALS)} FROM totals").fetchone()
        return int(row[0]), None if values is None else dict(zip(TOTALS, values, strict=True))
    finally:
        db.close()


def check_wal(path: Path) -> WalLoss | None:
    """What SQLite would silently drop from ``path``'s ``-wal`` file; None if nothing."""
    wal = path.with_name(path.name + "-wal")
    try:
        handle = open(wal, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with handle:
        header = handle.read(_WAL_HEADER)
        rest = handle.read(1)
        if not rest:  # empty, or a header without frames: nothing to lose
            return None
        magic, _, page_size, _, salt1, salt2, ck1, ck2 = struct.unpack(">8I", header)
        big = magic == _MAGIC[1]
        if (
            magic not in _MAGIC
            or not 512 <= page_size <= 65536
            or page_size & (page_size - 1)
            or _checksum(header[:24], (0, 0), big) != (ck1, ck2)
        ):
            # SQLite ignores a WAL whose header is unreadable, and every frame with it.
            return WalLoss(0, -1, None, _readable_from_file(path))
        handle.seek(_WAL_HEADER)
        root, file_totals = totals_in_file(path)
        seed = (ck1, ck2)
        in_prefix, stop, commits = True, _WAL_HEADER, 0
        readable = promised = file_totals  # as of the last readable / the last commit
        pending: tuple[bytes, bool] | None = None  # the totals page of the open transaction
        offset = _WAL_HEADER
        while len(frame := handle.read(_FRAME_HEADER + page_size)) == _FRAME_HEADER + page_size:
            pgno, commit, s1, s2, c1, c2 = struct.unpack(">6I", frame[:_FRAME_HEADER])
            current = (s1, s2) == (salt1, salt2)
            ok = current and _checksum(frame[:8] + frame[_FRAME_HEADER:], seed, big) == (c1, c2)
            seed = (c1, c2)  # each frame checked against its predecessor's stored sum
            offset += len(frame)
            if in_prefix and not ok:
                in_prefix, stop = False, offset - len(frame)
            if not current:
                continue
            if pgno == root:
                pending = (frame[_FRAME_HEADER:], ok)
            if commit:
                if pending is not None:
                    page, page_ok = pending
                    promised = totals_of_page(page) if page_ok else None
                if in_prefix:
                    readable = promised
                if not in_prefix:
                    commits += 1
                pending = None
        if commits == 0:
            return None
        return WalLoss(stop, commits, promised, readable)


def _readable_from_file(path: Path) -> dict[str, int] | None:
    try:
        return totals_in_file(path)[1]
    except sqlite3.Error:
        return None


def describe(totals: dict[str, int] | None) -> str:
    """``"1 runs, 20 calls (20000 metrics)"``, or ``"unknown"``."""
    if totals is None:
        return "unknown"
    entities = ", ".join(f"{totals[k]} {k}" for k in TOTALS[2:] if totals[k])
    return f"{totals['runs']} runs, {totals['calls']} calls ({entities or 'no entities'})"


def loss_message(path: Path, loss: WalLoss) -> str:
    """What a damaged ``-wal`` would lose, for the error that refuses the journal."""
    if loss.commits < 0:
        what = "its -wal file has an unreadable header, so SQLite would ignore all of it"
    else:
        what = (
            f"its -wal file is damaged at byte {loss.offset}: SQLite would silently drop the "
            f"{loss.commits} committed writes after it"
        )
    lost = ""
    if loss.promised is not None and loss.readable is not None:
        gone = {k: loss.promised[k] - loss.readable[k] for k in loss.promised}
        lost = f"; lost: {describe(gone)}"
    return (
        f"Journal {path} is damaged: {what}. Its header promises {describe(loss.promised)}; "
        f"what can be read holds {describe(loss.readable)}{lost}. Nothing was delivered from "
        "it and its files are left as they are."
    )


def totals_mismatch(connection: sqlite3.Connection) -> str | None:
    """How an opened journal's rows disagree with its ``totals`` row; None if they agree."""
    row = connection.execute(f"SELECT {', '.join(TOTALS)} FROM totals").fetchone()
    found = dict(zip(TOTALS, connection.execute(_FOUND).fetchone(), strict=True))
    promised = None if row is None else dict(zip(TOTALS, row, strict=True))
    if promised == found:
        return None
    return f"its header promises {describe(promised)}; what can be read holds {describe(found)}."
