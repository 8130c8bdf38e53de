"""Run independent jobs (a config, a seed, a condition) in order, in parallel, or on Ray, with one stop decision.

    >>> from fbalign.runner import Stop, run
    >>> results = run(train_one, jobs, workers=2)            # results[i] belongs to jobs[i]

``function(job, stop)`` is a top-level (picklable) callable; long jobs look at ``stop.requested()`` between
steps and, when it is set, save what they have and return (:func:`fbalign.train.train` does this when given
``stop=``). Three executors run the same jobs:

* ``"inline"``: this process, one job after another (debugging, one GPU);
* ``"process"``: local worker processes (fresh interpreters, ``spawn``), at most ``workers`` at a time;
* ``"ray"``: Ray tasks on a local Ray runtime, or on the cluster at ``address`` (``pip install 'fbalign[ray]'``).

Ctrl-C or SIGTERM sent to this process (alone, or to its whole process group) requests the stop: jobs not yet
started never start, running ones finish their current step, checkpoint and return, and once every worker has
ended :func:`run` raises :class:`Interrupted` (a ``KeyboardInterrupt``) carrying the results it got. A second
Ctrl-C raises ``KeyboardInterrupt`` at once (the workers, told to stop, still end after their current step).
Workers ignore SIGINT and SIGTERM themselves: the parent decides, so a Ctrl-C in the terminal (which reaches
every process of the group) cannot kill a worker mid-write.

Ensembles of small runs that can be stacked into one vectorised model stay in one process
(:class:`fbalign.Ensemble`); the runner is for what cannot be stacked.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.managers import BaseProxy, SyncManager
from typing import Any

__all__ = ["Stop", "run", "Interrupted", "EXECUTORS"]

EXECUTORS = ("inline", "process", "ray")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop:
    """An explicit stop decision, shared by a parent and its workers.

    ``requested()`` is cheap enough to call after every training step: it reads a local flag, and looks at the
    shared one (a ``multiprocessing`` manager's Event, or a Ray actor) at most every ``poll`` seconds. A Stop
    sent to a worker before :func:`run` shared it is an independent copy; :func:`run` shares it for you.
    A worker whose parent has died (the shared flag cannot be reached) sees a stop, so orphans end cleanly.

    Args:
        poll: seconds between looks at the shared flag.
    """

    def __init__(self, poll: float = 0.1) -> None:
        self.poll = poll
        self.reason: str | None = None  # what asked for the stop: 'SIGINT', 'SIGTERM', 'requested', ...
        self._local = threading.Event()
        self._shared: Any = None  # a manager Event proxy or a Ray actor handle (set by run)
        self._last_look = 0.0

    def request(self, reason: str = "requested") -> None:
        """Ask every job sharing this Stop to end after its current step."""
        self._mark(reason)
        self._publish()

    def requested(self) -> bool:
        """Whether a stop has been requested (here, by the parent, or by another worker)."""
        if self._local.is_set():
            return True
        if self._shared is None:
            return False
        now = time.monotonic()
        if now - self._last_look < self.poll:
            return False
        self._last_look = now
        return self._look()

    def _look(self) -> bool:
        """Read the shared flag now (a round trip to the manager or the actor)."""
        if self._local.is_set() or self._shared is None:
            return self._local.is_set()
        try:
            seen = _shared_is_set(self._shared)
        except Exception:  # the parent (the manager or the Ray actor) is gone: stop rather than run on orphaned
            seen = True
        if seen:
            self._mark("a stop request from another process")
        return seen

    @contextmanager
    def catch_signals(self) -> Iterator[Stop]:
        """Within the block, SIGINT and SIGTERM request this stop instead of killing the process; a second
        SIGINT raises ``KeyboardInterrupt`` at once. Only the main thread may set handlers: elsewhere this
        does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handle(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self.reason == "SIGINT":  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._mark(signal.Signals(signum).name)  # no I/O in a handler; run() publishes it

        previous = {s: signal.signal(s, handle) for s in _SIGNALS}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def __repr__(self) -> str:
        return f"Stop(requested={self._local.is_set()}, reason={self.reason!r})"

    # -- sharing

    def _mark(self, reason: str) -> None:
        if not self._local.is_set():
            self.reason = reason
        self._local.set()

    def _publish(self) -> None:
        """Copy a local request to the shared flag (outside signal handlers: this may talk to another process)."""
        if self._local.is_set() and self._shared is not None:
            try:
                _set_shared(self._shared)
            except Exception:  # pragma: no cover - the manager or actor is gone; nobody is left to tell
                pass

    def __getstate__(self) -> dict[str, Any]:
        self._publish()
        return {"poll": self.poll, "reason": self.reason if self._local.is_set() else None, "shared": self._shared,
                "requested": self._local.is_set()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["poll"])  # type: ignore[misc]
        self._shared = state["shared"]
        if state["requested"]:
            self._mark(state["reason"] or "requested")


def _shared_is_set(shared: Any) -> bool:
    if isinstance(shared, BaseProxy):  # a manager's Event
        return bool(shared.is_set())
    import ray

    return bool(ray.get(shared.is_set.remote()))


def _set_shared(shared: Any) -> None:
    if isinstance(shared, BaseProxy):
        shared.set()
    else:
        shared.set.remote()


class Interrupted(KeyboardInterrupt):
    """:func:`run` was stopped (Ctrl-C, SIGTERM or ``stop.request()``) after every worker had ended.

    Attributes:
        results: job index → result, for the jobs that returned (an interrupted training run returns too,
            with its checkpoint saved); jobs missing from it never started.
        reason: what asked for the stop ('SIGINT', 'SIGTERM', 'requested', ...).
    """

    def __init__(self, results: dict[int, Any], reason: str | None) -> None:
        super().__init__(f"stopped ({reason or 'requested'}); {len(results)} job(s) returned")
        self.results = results
        self.reason = reason


def _ignore_signals() -> None:
    """Worker start-up: the parent decides when to stop (see the module docstring)."""
    if threading.current_thread() is threading.main_thread():
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def _noted(error: BaseException, index: int) -> BaseException:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(f"(raised by job {index} of fbalign.runner.run)")
    return error


def _call(function: Callable[[Any, Stop], Any], job: Any, stop: Stop) -> tuple[bool, Any]:
    """In a worker: ``(started, result)``; a job still queued when the stop came does not start."""
    if stop.requested():
        return False, None
    return True, function(job, stop)


def run(function: Callable[[Any, Stop], Any], jobs: Sequence[Any], *, workers: int | None = None,
        executor: str = "process", address: str | None = None, stop: Stop | None = None,
        on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Call ``function(job, stop)`` for every job; return the results in job order.

    Args:
        function: a top-level callable (picklable by reference): ``function(job, stop) -> result``.
        jobs: the jobs (picklable).
        workers: jobs at a time; default: one per core for ``"process"`` (at most one per job), the cluster's
            CPUs for ``"ray"``; ``"inline"`` runs one at a time.
        executor: ``"inline"``, ``"process"`` or ``"ray"``.
        address: the Ray cluster to join (``"auto"``, ``"HOST:6379"`` or ``"ray://HOST:10001"``); None starts
            a local Ray runtime unless one is running in this process. Only for ``executor="ray"``.
        stop: the stop decision to share (a new one by default); requesting it from another thread stops the
            run as Ctrl-C does.
        on_result: called here, in this process, as ``on_result(index, result)`` as soon as each job returns
            (in the order they finish), e.g. to save finished work before the slowest job ends.

    Raises:
        Interrupted: a stop was requested; raised after every worker has ended, with the results it got.
        ValueError: an unknown executor, or ``address`` without Ray.
        Exception: the first exception a job raised, once the running jobs have stopped (queued ones do not
            start).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor = {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise ValueError(f"address = {address!r} is a Ray cluster's address; it needs executor='ray'")
    if workers is not None and workers < 1:
        raise ValueError(f"workers = {workers}; give at least 1")
    jobs = list(jobs)
    stop = stop if stop is not None else Stop()
    results: dict[int, Any] = _Results(on_result)
    with stop.catch_signals():
        if executor == "inline":
            error = _run_inline(function, jobs, stop, results)
        elif executor == "process":
            error = _run_processes(function, jobs, stop, results, workers)
        else:
            error = _run_ray(function, jobs, stop, results, workers, address)
    if error is not None:
        raise error
    if stop.requested():
        raise Interrupted(dict(results), stop.reason)
    return [results[i] for i in range(len(jobs))]


class _Results(dict):
    """Job index → result, telling ``on_result`` of each as it is stored."""

    def __init__(self, on_result: Callable[[int, Any], None] | None) -> None:
        super().__init__()
        self.on_result = on_result

    def __setitem__(self, index: int, result: Any) -> None:
        super().__setitem__(index, result)
        if self.on_result is not None:
            self.on_result(index, result)


def _run_inline(function: Callable, jobs: list[Any], stop: Stop, results: dict[int, Any]) -> BaseException | None:
    for i, job in enumerate(jobs):
        started, result = _call(function, job, stop)
        if not started:
            break
        results[i] = result
    return None


def _run_processes(function: Callable, jobs: list[Any], stop: Stop, results: dict[int, Any],
                   workers: int | None) -> BaseException | None:
    if not jobs:
        return None
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    context = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited by accident
    manager = SyncManager(ctx=context)
    # A Ctrl-C to the group must not take the shared flag down with it. (A stdlib initializer: the manager
    # then starts without importing fbalign and torch.)
    manager.start(functools.partial(signal.pthread_sigmask, signal.SIG_BLOCK, _SIGNALS))
    error: BaseException | None = None
    try:
        stop._shared = manager.Event()
        stop._publish()
        pool = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_signals)
        waiting = True
        try:
            futures = {pool.submit(_call, function, job, stop): i for i, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    if future.cancelled():
                        continue
                    try:
                        started, result = future.result()
                    except BaseException as e:  # the job raised, or its worker died
                        if error is None:
                            error = _noted(e, futures[future])
                            stop._mark(f"job {futures[future]} failed")
                        continue
                    if started:
                        results[futures[future]] = result
                if stop.requested():
                    stop._publish()  # running jobs see it within stop.poll seconds
                    for future in pending:
                        future.cancel()  # jobs still queued here never start
                    pending = {f for f in pending if not f.cancelled()}
        except BaseException:  # a second Ctrl-C: tell the workers and return without waiting for them
            stop._mark("SIGINT")
            stop._publish()
            waiting = False
            raise
        finally:
            pool.shutdown(wait=waiting, cancel_futures=True)
    finally:
        stop._look()  # a worker may have asked in the last moments
        stop._shared = None
        manager.shutdown()
    return error


class _StopFlag:
    """The shared flag on Ray: a tiny actor every task can reach, wherever it runs."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


def _call_in_ray_task(function: Callable[[Any, Stop], Any], job: Any, stop: Stop) -> tuple[bool, Any]:
    previous = {s: signal.getsignal(s) for s in _SIGNALS} if threading.current_thread() is threading.main_thread() \
        else {}
    _ignore_signals()
    try:
        return _call(function, job, stop)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run_ray(function: Callable, jobs: list[Any], stop: Stop, results: dict[int, Any], workers: int | None,
             address: str | None) -> BaseException | None:
    try:
        import ray
    except ImportError as e:
        raise ImportError("executor='ray' needs Ray: pip install 'fbalign[ray]'") from e
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, logging_level="warning")
    error: BaseException | None = None
    try:
        stop._shared = ray.remote(num_cpus=0)(_StopFlag).remote()
        stop._publish()
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, max_retries=0)(_call_in_ray_task)
        queue = list(enumerate(jobs))
        running: dict[Any, int] = {}
        # At most ``workers`` tasks in flight: a queued task cannot be withdrawn without Ray interrupting it
        # mid-step (ray.cancel raises KeyboardInterrupt in a running task), so the queue stays here.
        while queue or running:
            while queue and len(running) < workers and not stop.requested():
                i, job = queue.pop(0)
                running[task.remote(function, job, stop)] = i
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.1)
            for ref in done:
                i = running.pop(ref)
                try:
                    started, result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    if error is None:
                        error = _noted(e.as_instanceof_cause(), i)
                        stop._mark(f"job {i} failed")
                    continue
                except Exception as e:  # the worker or its node died
                    if error is None:
                        error = e
                        stop._mark(f"job {i} failed")
                    continue
                if started:
                    results[i] = result
            if stop.requested():
                stop._publish()
    finally:
        stop._look()
        stop._shared = None
        if started_here:
            ray.shutdown()
    return error
