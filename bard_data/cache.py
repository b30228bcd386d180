"""Persistent completion cache.

SQLite (standard library, one file under the run directory) was chosen over DuckDB or Parquet
because the cache is written a batch at a time while a run is live and must survive a kill at
any instant: SQLite's WAL journal makes each committed batch durable and a half-written one
invisible, lookups by primary key are O(log n), and a corrupt file can be detected
(``PRAGMA quick_check``) and set aside instead of killing the run.
"""

from __future__ import annotations

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


class CompletionCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            conn = self._connect()
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            conn.execute(_SCHEMA)
            conn.commit()
            return conn
        except sqlite3.DatabaseError as exc:
            # A damaged cache only costs recomputation; keep the file for inspection.
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
            conn.commit()
            return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
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

    def put_many(self, model: str, items: dict[str, Completion]) -> None:
        if not items:
            return
        now = time.time()
        rows = [(k, model, c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason, now) for k, c in items.items()]
        with self._lock:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO completions VALUES (?,?,?,?,?,?,?)", rows)
            self._conn.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
