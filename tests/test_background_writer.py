"""pipeline.build.BackgroundWriter: a second write runs beside the first only while the frames
pending stay within the byte budget; a large one waits for all before it."""

from __future__ import annotations

import threading

from bard_data.pipeline.build import BackgroundWriter


def test_small_writes_overlap_and_a_large_one_waits_for_the_others():
    release = threading.Event()
    started: list[str] = []

    def write(name):
        started.append(name)
        release.wait(5)

    with BackgroundWriter(in_flight=2, max_bytes=10) as w:
        w.submit(write, "a", nbytes=4)
        w.submit(write, "b", nbytes=4)  # within the budget: returns at once, both run
        for _ in range(100):
            if len(started) == 2:
                break
            threading.Event().wait(0.01)
        assert sorted(started) == ["a", "b"]
        t = threading.Thread(target=w.submit, args=(write, "c"), kwargs={"nbytes": 20})
        t.start()
        t.join(0.2)
        assert t.is_alive() and "c" not in started  # waits for a and b
        release.set()
        t.join(5)
        assert not t.is_alive()
    assert started[2] == "c"


def test_a_failed_write_is_raised():
    def boom():
        raise OSError("disk full")

    try:
        with BackgroundWriter(in_flight=2, max_bytes=1 << 20) as w:
            w.submit(boom, nbytes=1)
    except OSError as e:
        assert "disk full" in str(e)
    else:
        raise AssertionError("the write's error was lost")
