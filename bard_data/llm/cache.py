"""Persistent completion cache.

SQLite (standard library, one file under the run directory) was chosen over DuckDB or Parquet
because the cache is written a batch at a time while a run is live and must survive a kill at
any instant: SQLite's WAL journal makes each committed batch durable and a half-written one
invisible, lookups by primary key are O(log n), and a corrupt file can be detected
(``PRAGMA quick_check``) and set aside instead of killing the run.

Beside the completions, a ``ledger`` table holds each invocation's LLM counters (requests sent,
errors, tokens), written in the same transaction as the completions they paid for. A run killed
with SIGKILL never writes its manifest's final numbers; the next invocation reads them back from
the ledger, so the manifest's request counts stay exact across kills.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

from bard_data.llm.base import Completion

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    created REAL NOT NULL
)
"""

_LEDGER = """
CREATE TABLE IF NOT EXISTS ledger (
    invocation TEXT NOT NULL,
    slot TEXT NOT NULL,
    model TEXT NOT NULL,
    stats TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (invocation, slot)
)
"""

_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 600.0


def _busy(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


class CompletionCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = None
        try:
            self._check_header()
            conn = self._connect()
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            conn.execute(_SCHEMA)
            conn.execute(_LEDGER)
            # A file that opens but is not ours (or lost its table) is as good as corrupt.
            conn.execute("SELECT key, model, text, prompt_tokens, completion_tokens, finish_reason FROM completions LIMIT 1").fetchall()
            conn.commit()
            return conn
        except sqlite3.OperationalError as exc:
            if _busy(exc):  # another run holds the (shared) cache longer than the busy timeout
                raise
            return self._set_aside(conn, exc)
        except sqlite3.DatabaseError as exc:
            return self._set_aside(conn, exc)

    def _set_aside(self, conn, exc) -> sqlite3.Connection:
        """A damaged cache only costs recomputation; keep the file for inspection."""
        bad = self.path.with_name(self.path.name + f".corrupt-{int(time.time())}")
        log.warning("completion cache %s is corrupt (%s); moved to %s and starting empty", self.path, exc, bad)
        try:
            conn.close()
        except Exception:
            pass
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                p.rename(Path(str(bad) + suffix))
        conn = self._connect()
        conn.execute(_SCHEMA)
        conn.execute(_LEDGER)
        conn.commit()
        return conn

    def _check_header(self) -> None:
        """A non-empty file that does not start with SQLite's header (or is shorter than one page
        header) was truncated or overwritten; SQLite would otherwise treat a short file as empty."""
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        if size == 0:
            # SQLite opens a 0-byte file as a new, empty database: say so, since it is either a
            # run killed before its first write or a cache that lost everything.
            log.warning("completion cache %s is an empty file (truncated, or its run was killed before "
                        "the first write); starting empty", self.path)
            return
        with open(self.path, "rb") as f:
            head = f.read(100)
        if len(head) < 100 or not head.startswith(_HEADER):
            raise sqlite3.DatabaseError(f"not an SQLite database ({size} bytes, bad header)")

    def _connect(self) -> sqlite3.Connection:
        # Several runs may share one cache (recipe cache_dir): a writer waits for another's
        # transaction (WAL: readers never wait) instead of failing after SQLite's default 5 s.
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        out: dict[str, Completion] = {}
        uniq = list(dict.fromkeys(keys))
        with self._lock:
            for i in range(0, len(uniq), 500):
                chunk = uniq[i : i + 500]
                q = "SELECT key, text, prompt_tokens, completion_tokens, finish_reason FROM completions WHERE key IN (%s)" % ",".join("?" * len(chunk))
                for k, text, pt, ct, fr in self._conn.execute(q, chunk):
                    out[k] = Completion(text=text, prompt_tokens=pt, completion_tokens=ct, finish_reason=fr)
        return out

    def put_many(self, model: str, items: dict[str, Completion],
                 ledger: tuple[str, str, dict] | None = None) -> None:
        """Store completions; ``ledger`` = (invocation, slot, counters) is recorded in the same
        transaction, so the counters on disk always match the completions on disk."""
        if not items and ledger is None:
            return
        now = time.time()
        rows = [(k, model, c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason, now) for k, c in items.items()]
        with self._lock:
            # IMMEDIATE takes the write lock up front (waiting for another process's commit), so
            # a transaction never fails half way on a lock upgrade.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    self._conn.executemany("INSERT OR REPLACE INTO completions VALUES (?,?,?,?,?,?,?)", rows)
                if ledger is not None:
                    inv, slot, stats = ledger
                    self._conn.execute("INSERT OR REPLACE INTO ledger VALUES (?,?,?,?,?)",
                                       (inv, slot, model, json.dumps(stats, sort_keys=True), now))
                self._conn.execute("COMMIT")
            except BaseException:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise

    def ledger(self, invocation: str) -> dict[str, dict]:
        """Counters an invocation recorded, summed per model."""
        out: dict[str, dict] = {}
        with self._lock:
            rows = self._conn.execute("SELECT model, stats FROM ledger WHERE invocation = ?", (invocation,)).fetchall()
        for model, stats in rows:
            acc = out.setdefault(model, {})
            for k, v in json.loads(stats).items():
                if isinstance(v, (int, float)):
                    acc[k] = acc.get(k, 0) + v
        return out

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def lookup(path: str | Path, keys: list[str], text: bool = True) -> dict[str, Completion]:
    """The completions of ``keys`` stored in the cache at ``path``, read-only: creates, locks and
    repairs nothing ({} when there is no cache yet). For ``bard-data plan``, which sends nothing.
    ``text=False``: token counts only (the texts of long completions are not read)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0 or not keys:
        return {}
    out: dict[str, Completion] = {}
    # A cache some run has open (its WAL is there) is read as WAL readers do, through that run's
    # index; a closed one as an immutable file, so that not even SQLite's -wal/-shm files appear.
    live = Path(str(path) + "-wal").exists()
    mode = "mode=ro" if live else "immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 500):
            chunk = uniq[i : i + 500]
            q = ("SELECT key, %s, prompt_tokens, completion_tokens, finish_reason FROM completions WHERE key IN (%s)"
                 % ("text" if text else "''", ",".join("?" * len(chunk))))
            for k, text, pt, ct, fr in conn.execute(q, chunk):
                out[k] = Completion(text=text, prompt_tokens=pt, completion_tokens=ct, finish_reason=fr, cached=True)
    except sqlite3.DatabaseError as exc:
        log.warning("completion cache %s unreadable (%s); counting nothing as cached", path, exc)
        return {}
    finally:
        conn.close()
    return out


class LedgerView:
    """The completion cache as one ``CachedLLM`` sees it: every store of completions also records
    that LLM's counters under (invocation, slot), in the same SQLite transaction (``CachedLLM``
    updates its counters before it stores, so the snapshot covers the batch being stored)."""

    def __init__(self, cache: CompletionCache, invocation: str, slot: str, llm):
        self.cache, self.invocation, self.slot, self.llm = cache, invocation, slot, llm

    def get_many(self, keys):
        return self.cache.get_many(keys)

    def put_many(self, model, items):
        self.cache.put_many(model, items, ledger=(self.invocation, self.slot, self.llm.stats.as_dict()))

    def __len__(self) -> int:
        return len(self.cache)
