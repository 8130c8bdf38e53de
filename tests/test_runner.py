"""fbalign.runner: results in job order, one explicit stop decision, failures surface, signals stop every worker."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fbalign.runner import Interrupted, Stop, run

# -- jobs (top level: the workers import them from this module)


def square(job: int, stop: Stop) -> int:
    time.sleep(0.01 * (job % 3))  # finish out of order
    return job * job


def fail_on_two(job: int, stop: Stop) -> int:
    if job == 2:
        raise ValueError("job two is bad")
    return job


def until_stopped(job: tuple[str, int], stop: Stop) -> str:
    """Say it started (a file), then 'train' until asked to stop; return how it ended."""
    folder, i = job
    Path(folder, f"started-{i}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not stop.requested():
        assert time.monotonic() < deadline, "no stop came within 60 s"
        time.sleep(0.01)  # one "step"
    Path(folder, f"saved-{i}").write_text("checkpoint")
    return f"stopped {i}"


def request_stop_then_return(job: int, stop: Stop) -> int:
    if job == 0:
        stop.request()
    return job


# -- tests


@pytest.mark.parametrize("executor", ["inline", "process"])
def test_results_come_back_in_job_order(executor):
    assert run(square, range(7), workers=3, executor=executor) == [i * i for i in range(7)]
    assert run(square, [], executor=executor) == []


@pytest.mark.parametrize("executor", ["inline", "process"])
def test_on_result_hears_of_each_job_as_it_returns(executor):
    heard: list[tuple[int, int]] = []
    assert run(square, range(5), workers=2, executor=executor, on_result=lambda i, r: heard.append((i, r))) == \
        [i * i for i in range(5)]
    assert sorted(heard) == [(i, i * i) for i in range(5)]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="choose one of inline, process, ray"):
        run(square, [1], executor="threads")
    with pytest.raises(ValueError, match="needs executor='ray'"):
        run(square, [1], executor="process", address="auto")
    with pytest.raises(ValueError, match="at least 1"):
        run(square, [1], workers=0)


@pytest.mark.parametrize("executor", ["inline", "process"])
def test_a_failing_job_raises_its_own_error(executor):
    with pytest.raises(ValueError, match="job two is bad"):
        run(fail_on_two, range(4), workers=2, executor=executor)


def test_a_stop_requested_before_the_run_starts_nothing():
    stop = Stop()
    stop.request()
    with pytest.raises(Interrupted) as caught:
        run(square, range(3), executor="process", workers=2, stop=stop)
    assert caught.value.results == {} and caught.value.reason == "requested"


def test_a_worker_can_stop_the_others():
    """Job 0 asks for the stop; jobs still queued then never start (one worker: the rest are queued)."""
    with pytest.raises(Interrupted) as caught:
        run(request_stop_then_return, range(5), executor="process", workers=1)
    assert 0 in caught.value.results and len(caught.value.results) < 5


def test_stop_survives_pickling_and_carries_a_request():
    stop = Stop()
    assert not pickle.loads(pickle.dumps(stop)).requested()
    stop.request("because")
    copy = pickle.loads(pickle.dumps(stop))
    assert copy.requested() and copy.reason == "because"


@pytest.mark.parametrize("executor", ["inline", "process"])
def test_a_stop_from_another_thread_ends_running_jobs_and_skips_queued_ones(executor, tmp_path):
    stop = Stop()
    jobs = [(str(tmp_path), i) for i in range(4)]
    workers = 1 if executor == "inline" else 2

    def request_once_running() -> None:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("started-*"))) < workers and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.request()

    threading.Thread(target=request_once_running, daemon=True).start()
    with pytest.raises(Interrupted) as caught:
        run(until_stopped, jobs, workers=workers, executor=executor, stop=stop)
    started = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("started-*"))
    assert started == list(range(workers))  # the queued ones never started
    assert caught.value.results == {i: f"stopped {i}" for i in started}
    assert sorted(p.name for p in tmp_path.glob("saved-*")) == [f"saved-{i}" for i in started]


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from fbalign.runner import Interrupted, run
import test_runner
try:
    run(test_runner.until_stopped, [({folder!r}, i) for i in range(3)], workers=2, executor="process")
except Interrupted as e:
    print(sorted(e.results.values()), e.reason)
    sys.exit(130)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("whole_group", [False, True])
def test_a_signal_to_the_parent_stops_every_worker_within_seconds(tmp_path, signum, whole_group):
    """``kill PID`` reaches the parent alone; Ctrl-C in a terminal reaches the whole process group."""
    script = SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("started-*"))) < 2:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the workers did not start within 120 s"
        time.sleep(0.02)
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    sent = time.monotonic()
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "the workers took more than 10 s to stop"
    assert process.returncode == 130, err
    name = signal.Signals(signum).name
    assert out.strip() == f"['stopped 0', 'stopped 1'] {name}", err
    assert sorted(p.name for p in tmp_path.glob("saved-*")) == ["saved-0", "saved-1"]
    assert not (tmp_path / "started-2").exists()
