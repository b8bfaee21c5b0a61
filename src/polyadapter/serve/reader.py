"""The adapter pool's background reader: calls run one at a time, in order, on a thread
that exits as soon as it runs out of work (the next call starts a new one).

Why not a ``ThreadPoolExecutor(1)``: its thread lives as long as the pool. On CPU,
torch's OpenMP runtime (libgomp) keeps a team of worker threads for every thread that
ran parallel work, such as copying an adapter's tensors. While the workers of all teams
outnumber the cores, idle workers stop spinning and every parallel operation of the
engine pays a wake-up (see ``serve.start_in_thread``). A reader that exits takes its
team with it, so the engine runs at full speed between loads.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future


class Reader:
    def __init__(self, name: str, on_exit=lambda: None):
        self.name = name
        self.on_exit = on_exit          # runs in the reader thread before it exits
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None   # the thread that takes queued work
        self._alive: set[threading.Thread] = set()      # it and any still running on_exit
        self._closed = False
        self.threads_started = 0

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: cannot take work after shutdown")
            self._queue.append((future, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self.threads_started += 1
                self._alive.add(self._thread)
                self._thread.start()
        return future

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        self._thread = None
                        return
                    future, fn, args = self._queue.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn(*args)
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(e)
                else:
                    future.set_result(result)
        finally:
            try:
                self.on_exit()
            finally:
                with self._lock:
                    self._alive.discard(threading.current_thread())

    def shutdown(self, timeout: float = 60) -> None:
        """Take no more work; wait for what was submitted to finish."""
        with self._lock:
            self._closed = True
            threads = list(self._alive)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
