"""One invocation per run directory at a time."""

from __future__ import annotations

import os
from pathlib import Path

from bard_data.errors import BardError


class RunLock:
    """``flock`` on ``RUN_DIR/.lock``: released by the kernel when the holder dies, so a killed
    run never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._f = None

    def acquire(self) -> "RunLock":
        import fcntl

        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise BardError(f"{self.path.parent}: the run directory is in use by {holder}; "
                            "wait for that run to end or use another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            import fcntl

            try:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            finally:
                self._f.close()
                self._f = None
