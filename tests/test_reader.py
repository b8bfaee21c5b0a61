"""The adapter pool's reader thread: calls run in order, one at a time, on a thread that
exits when it runs out of work (so its OpenMP team does not slow the engine down)."""
import threading
import time

import pytest

from polyadapter.serve.reader import Reader


def _wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def test_calls_run_in_order_on_one_thread_that_is_not_the_callers():
    reader = Reader("test-reader")
    gate = threading.Event()
    seen = []

    def call(i):
        gate.wait(5)
        seen.append((i, threading.current_thread().name))
        return i * 10

    futures = [reader.submit(call, i) for i in range(5)]
    gate.set()
    assert [f.result(5) for f in futures] == [0, 10, 20, 30, 40]
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"test-reader"}
    assert reader.threads_started == 1
    reader.shutdown()


def test_the_thread_exits_when_idle_and_runs_on_exit_in_itself():
    exits = []
    reader = Reader("test-reader", on_exit=lambda: exits.append(threading.current_thread()))
    worker = reader.submit(threading.current_thread).result(5)
    _wait_until(lambda: not worker.is_alive())
    assert exits == [worker]
    second = reader.submit(threading.current_thread).result(5)
    assert second is not worker and reader.threads_started == 2
    reader.shutdown()
    assert not second.is_alive() and exits == [worker, second]


def test_an_error_goes_to_its_future_and_later_calls_still_run():
    reader = Reader("test-reader")

    def fail():
        raise ValueError("bad adapter file")

    failed = reader.submit(fail)
    after = reader.submit(lambda: "ok")
    with pytest.raises(ValueError, match="bad adapter file"):
        failed.result(5)
    assert after.result(5) == "ok"
    reader.shutdown()


def test_shutdown_waits_for_submitted_work_and_refuses_more():
    reader = Reader("test-reader")
    slow = reader.submit(time.sleep, 0.2)
    reader.shutdown()
    assert slow.done() and slow.exception() is None
    with pytest.raises(RuntimeError, match="test-reader: cannot take work after shutdown"):
        reader.submit(lambda: None)
