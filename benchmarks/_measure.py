"""Helpers shared by the benchmarks: peak-RSS sampling, timing wrappers, subprocess runs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RSSSampler:
    """Samples this process's RSS every ``interval`` seconds; peak per labelled span."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.label: str | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            lab = self.label
            if lab is not None and rss > self.peaks.get(lab, 0):
                self.peaks[lab] = rss
            self._stop.wait(self.interval)

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join()


class Timer:
    """Wall time and sampled peak RSS per named step (nested steps allowed; the innermost label
    gets the RSS samples, so a step's own peak excludes its parent's other work)."""

    def __init__(self, sampler: RSSSampler | None = None):
        self.sampler = sampler
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.order: list[str] = []
        self._stack: list[str] = []

    @contextmanager
    def step(self, name: str):
        if name not in self.wall:
            self.order.append(name)
            self.wall[name] = 0.0
            self.cpu[name] = 0.0
            self.calls[name] = 0
        self._stack.append(name)
        if self.sampler:
            self.sampler.label = name
            # count the RSS at entry too
            rss = self.sampler.proc.memory_info().rss
            self.sampler.peaks[name] = max(self.sampler.peaks.get(name, 0), rss)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - t0
            self.cpu[name] += time.process_time() - c0
            self.calls[name] += 1
            self._stack.pop()
            if self.sampler:
                rss = self.sampler.proc.memory_info().rss
                self.sampler.peaks[name] = max(self.sampler.peaks.get(name, 0), rss)
                parent = self._stack[-1] if self._stack else None
                if parent is not None:
                    self.sampler.peaks[parent] = max(self.sampler.peaks.get(parent, 0), self.sampler.peaks[name])
                self.sampler.label = parent

    def wrap(self, owner, attr: str, name: str | None = None):
        """Replace ``owner.attr`` (a module function or a class method) by a timed version.
        A ``name`` starting with "/" is taken relative to the step it is called in."""
        fn = getattr(owner, attr)
        timer = self

        def timed(*a, **kw):
            label = name or attr
            if label.startswith("/"):  # relative to the enclosing step: "sft/balance", "rl/messages"
                label = (timer._stack[-1] if timer._stack else "") + label
            with timer.step(label):
                return fn(*a, **kw)

        timed.__wrapped__ = fn
        setattr(owner, attr, timed)
        return fn

    def result(self) -> dict:
        peaks = self.sampler.peaks if self.sampler else {}
        return {n: {"wall_s": round(self.wall[n], 3), "cpu_s": round(self.cpu[n], 3), "calls": self.calls[n], "peak_rss_gib": round(peaks.get(n, 0) / GiB, 3)}
                for n in self.order}


def run_child(args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``python <args>`` in a fresh process; its last stdout line is JSON, returned parsed."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONPATH", str(REPO))
    if str(REPO) not in full_env["PYTHONPATH"].split(os.pathsep):
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env["PYTHONPATH"]
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
        raise RuntimeError(f"child {' '.join(args)} failed with exit code {p.returncode}")
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
    return json.loads(lines[-1])


def fmt_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def load_average() -> str:
    """The 1-minute load average and the CPU count: other work on the machine inflates wall times."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        return ""


def machine() -> str:
    import platform

    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / GiB:.0f} GiB RAM"
    except Exception:
        mem = ""
    return f"{platform.machine()} {os.cpu_count()} CPUs {mem}, Python {platform.python_version()}"
