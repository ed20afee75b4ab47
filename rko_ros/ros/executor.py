"""The executor every rko_ros process spins: callbacks inline, service requests on a small pool.

rclpy's `MultiThreadedExecutor` (9.1, Kilted) rebuilds its wait set in Python after every event
and every finished callback. Measured on the 2-core development machine with one 96x96 camera and
joint states at 30 Hz: the process used 54-80% of a core doing nothing else, and a 10 Hz timer in
it fired 8-14 ms late at the median and 50-60 ms at p99. A `SingleThreadedExecutor` on the same
streams: 5-6% of a core. But on a single thread a slow service (a model load, a CUDA graph capture
of several seconds, starting a fine-tuning) would hold up every camera callback meanwhile, and
the policy would stop on a stale camera.

`ServiceThreadsExecutor` is the single-threaded executor with one change: a service request runs on
a pool thread, so the spinning thread keeps taking frames and joint states while it runs (measured:
60 frames of 60 arrived during a 2 s service call, 5% of a core). Callback groups keep their
meaning: an entity whose group is busy is left out of the wait set until the group is free.
Subscription, timer and client callbacks run in the spinning thread, one at a time: keep them short
(policy_node's control tick does not run here at all, see `control.TickThread`).
"""
from concurrent.futures import ThreadPoolExecutor
import threading

from rclpy.executors import (ConditionReachedException, ExternalShutdownException,
                             ShutdownException, SingleThreadedExecutor, TimeoutException)
from rclpy.service import Service


class ServiceThreadsExecutor(SingleThreadedExecutor):
    """Callbacks in the spinning thread; service requests on `service_threads` pool threads."""

    def __init__(self, service_threads=2, *, context=None):
        super().__init__(context=context)
        if int(service_threads) < 1:
            raise ValueError(f'service_threads={service_threads} must be >= 1')
        self._pool = ThreadPoolExecutor(int(service_threads), thread_name_prefix='rko-service')
        self._futures = []
        self._futures_lock = threading.Lock()

    def _spin_once_impl(self, timeout_sec=None, wait_condition=lambda: False):
        try:
            handler, entity, node = self.wait_for_ready_callbacks(timeout_sec, None,
                                                                  wait_condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException,
                ConditionReachedException):
            return
        if isinstance(entity, Service):
            with self._futures_lock:
                self._futures.append(handler)
            self._pool.submit(handler)
            self._raise_finished()
            return
        handler()
        exception = handler.exception()
        if exception is not None:
            raise exception
        self._raise_finished()

    def _raise_finished(self):
        """Re-raise, in the spinning thread, what a finished service callback raised (as
        MultiThreadedExecutor does): a bug in a handler stops the process, never silently."""
        with self._futures_lock:
            done, running = [], []
            for task in self._futures:
                (done if task.done() else running).append(task)
            self._futures = running
        for task in done:
            task.result()   # raises what the callback raised

    def shutdown(self, timeout_sec=None):
        result = super().shutdown(timeout_sec)
        self._pool.shutdown(wait=True, cancel_futures=True)
        return result
