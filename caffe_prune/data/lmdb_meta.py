"""An LMDB's meta pages, read with struct before anything maps the file: how big its data.mdb must be.

liblmdb (which Caffe, py-lmdb and caffe_prune.data.db_reader all read LMDBs through) maps
``data.mdb`` and reads pages by dereferencing the map. A file cut short (a copy that stopped, a
full disk, a download truncated) still opens: the pages past its end are mapped too, and the first
read of one kills the process with SIGBUS, no error, no line. The file says how long it must be:
its first two pages are meta pages (offsets 0 and the page size), each an ``MDB_meta`` after a
16-byte page header, and the newer one (the larger txnid) names the last page the committed
B-trees use. lmdb 0.9's layout (mdb.c, 64-bit; little-endian here):

    MDB_page header         16 bytes: pgno (8), pad (2), flags (2), lower/upper (2 + 2)
    MDB_meta  +0   uint32   mm_magic 0xBEEFC0DE
              +4   uint32   mm_version (1)
              +8   void *   mm_address
              +16  size_t   mm_mapsize
              +24  MDB_db   mm_dbs[2], 48 bytes each: md_pad (uint32; in the FREE db, the page
                            size), md_flags, md_depth (uint16), branch, leaf, overflow pages,
                            entries, root (size_t each)
              +120 pgno_t   mm_last_pg
              +128 txnid_t  mm_txnid

``check(source, where)`` reads them (pread, no map) and refuses a data.mdb shorter than
(last page + 1) x page size in one line naming the file: what was a SIGBUS is a DataError.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from caffe_prune.errors import DataError

MAGIC = 0xBEEFC0DE
PAGE_HEADER = 16
META = struct.Struct("<IIQQ48s48sQQ")     # magic, version, address, mapsize, dbs[0], dbs[1], last_pg, txnid
DB_HEAD = struct.Struct("<IHHQQQQQ")      # md_pad, md_flags, md_depth, branch, leaf, overflow, entries, root


@dataclass(frozen=True)
class Meta:
    """The newer meta page of an LMDB: its page size, last used page, transaction, map size, records."""
    page_size: int
    last_page: int
    txnid: int
    map_size: int
    entries: int

    @property
    def needed_bytes(self) -> int:
        """What data.mdb must hold for every page the committed trees use to be readable."""
        return (self.last_page + 1) * self.page_size


def _meta_at(data: bytes, offset: int) -> tuple | None:
    """(magic ok, fields) of the MDB_meta in the page at ``offset``, or None when the bytes end first."""
    start = offset + PAGE_HEADER
    if len(data) < start + META.size:
        return None
    magic, version, _, mapsize, free_db, main_db, last_pg, txnid = META.unpack_from(data, start)
    if magic != MAGIC:
        return None
    return DB_HEAD.unpack(free_db)[0], last_pg, txnid, mapsize, DB_HEAD.unpack(main_db)[6]


def read(path) -> Meta | None:
    """The newer of the two meta pages of the data.mdb at ``path`` (None: no valid meta page at 0)."""
    with open(path, "rb") as f:
        first = _meta_at(os.pread(f.fileno(), PAGE_HEADER + META.size, 0), 0)
        if first is None:
            return None
        page = first[0]
        second = _meta_at(os.pread(f.fileno(), PAGE_HEADER + META.size, page), 0) if page else None
    chosen = second if second is not None and second[2] > first[2] else first
    return Meta(page_size=page, last_page=chosen[1], txnid=chosen[2], map_size=chosen[3], entries=chosen[4])


def check(source, where: str) -> Meta | None:
    """Refuse an LMDB directory whose data.mdb is shorter than its meta page says (reading it would
    end the process with SIGBUS); the Meta, or None where there is no data.mdb or no meta page to
    judge by (liblmdb's own open then says what is wrong, without mapping past the file)."""
    data = Path(source) / "data.mdb"
    try:
        size = data.stat().st_size
        meta = read(data)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(f"{where}: cannot read {data}: {exc.strerror}") from None
    if meta is None or not meta.page_size:
        return None
    if size < meta.needed_bytes:
        raise DataError(f"{where}: {data} is truncated: {size:,} bytes, but its meta page says the LMDB uses "
                        f"{meta.last_page + 1:,} pages of {meta.page_size} bytes ({meta.needed_bytes:,} bytes); "
                        f"reading it would fault (SIGBUS): copy or write the LMDB again")
    return meta
