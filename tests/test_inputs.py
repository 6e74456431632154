"""deepfm.inputs.Prefetcher: nothing of a batch stream runs once it is closed (issue 13, item 16)."""
from __future__ import annotations

import threading
import time

import pytest

from deepfm.inputs import Prefetcher


def _alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "deepfm-prefetch" and t.is_alive()]


def test_close_waits_for_the_thread_and_the_stream_it_closes():
    """The train stream is endless: closed mid-stream, its generator's cleanup (a petastorm reader
    stopping and joining its workers) ran later in the thread, which was still running at exit."""
    events = []

    def stream():
        try:
            i = 0
            while True:
                time.sleep(0.05)            # a row group read and decoded
                yield i
                i += 1
        finally:
            time.sleep(0.3)                 # the reader joining its worker threads
            events.append("reader closed")

    p = Prefetcher(stream(), depth=2)       # type: ignore[arg-type]
    assert [next(p), next(p)] == [0, 1]
    time.sleep(0.2)                         # the queue is full: the thread waits to put the next batch
    p.close()
    assert events == ["reader closed"]
    assert _alive() == []


def test_a_finished_stream_ends_and_an_error_reaches_the_consumer():
    p = Prefetcher(iter([1, 2]), depth=1)   # type: ignore[arg-type]
    assert list(p) == [1, 2]
    p.close()

    def failing():
        yield 1
        raise OSError("row group 3: truncated")

    p = Prefetcher(failing(), depth=4)      # type: ignore[arg-type]
    assert next(p) == 1
    with pytest.raises(OSError, match="truncated"):
        next(p)
    p.close()
    assert _alive() == []
