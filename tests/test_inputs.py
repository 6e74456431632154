"""deepfm.inputs.Prefetcher: nothing of a batch stream runs once it is closed (issue 13, item 16)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from deepfm.inputs import Prefetcher
from tests.conftest import ROOT


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


EXIT_RIGHT_AFTER_CLOSE = """
import time
import numpy as np
from deepfm.inputs import Prefetcher, to_batch

ids, labels, keys = np.ones((2048, 39), np.int32), np.zeros(2048, np.float32), [f"f{i}" for i in range(39)]

def stream():                               # each batch takes a while to make, in torch ops
    while True:
        for _ in range(200):
            b = to_batch(ids, labels, keys)
        yield b

p = Prefetcher(stream(), depth=1)
next(p)
time.sleep(0.05)
p.close()                                   # then the interpreter exits, as training did after --no-test
"""


def test_the_process_exits_cleanly_right_after_a_close():
    """The abort itself: a stream thread still inside a torch op when the interpreter exits ends the
    process with 'terminate called without an active exception' (SIGABRT, exit 134)."""
    r = subprocess.run([sys.executable, "-c", EXIT_RIGHT_AFTER_CLOSE], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert "terminate called" not in r.stderr
    assert r.returncode == 0, r.stderr[-2000:]
