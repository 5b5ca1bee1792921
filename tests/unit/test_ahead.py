"""A stream produced on a thread ahead of its consumer keeps order, hands the producer's
error to the consumer, and stops the producer when the consumer stops."""

from __future__ import annotations

import threading
import time

import pytest

from vmreplica.transport.ahead import ahead


def test_items_arrive_in_order():
    assert list(ahead(iter(range(1000)), depth=4, name="t")) == list(range(1000))


def test_the_producers_error_is_the_consumers():
    def items():
        yield 1
        raise ValueError("bad record")

    got = []
    with pytest.raises(ValueError, match="bad record"):
        for x in ahead(items(), depth=4, name="t"):
            got.append(x)  # noqa: PERF402 — what came before the error
    assert got == [1]


def test_a_consumer_that_stops_stops_the_producer():
    made = []
    done = threading.Event()

    def items():
        try:
            for i in range(10_000):
                made.append(i)
                yield i
        finally:
            done.set()

    stream = ahead(items(), depth=2, name="t")
    assert next(stream) == 0
    stream.close()                     # the consumer gives up (an error of its own)
    assert done.wait(5)
    time.sleep(0.1)
    assert len(made) < 10              # it did not run on to the end
