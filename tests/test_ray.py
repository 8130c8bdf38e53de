"""The Ray executor, on a local Ray runtime with 2 CPUs started here: results in order, a stop that ends running
tasks and skips queued ones, and ``fbalign compare --executor ray`` giving the local executor's table."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fbalign import compare as cmp
from fbalign.runner import Interrupted, Stop, run

ray = pytest.importorskip("ray", reason="the Ray extra: pip install 'fbalign[ray]' (make test installs it)")

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # The tasks import this module's jobs from tests/, as the workers of a cluster would import a user's module.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def cube(job: int, stop: Stop) -> int:
    time.sleep(0.02 * (job % 3))
    return job ** 3


def until_stopped(job: tuple[str, int], stop: Stop) -> str:
    folder, i = job
    Path(folder, f"started-{i}").write_text("")
    deadline = time.monotonic() + 60
    while not stop.requested():
        assert time.monotonic() < deadline, "no stop came within 60 s"
        time.sleep(0.01)
    return f"stopped {i}"


def test_ray_tasks_return_in_job_order():
    heard: list[tuple[int, int]] = []
    assert run(cube, range(5), executor="ray", on_result=lambda i, r: heard.append((i, r))) == \
        [i ** 3 for i in range(5)]
    assert sorted(heard) == [(i, i ** 3) for i in range(5)]


def test_a_stop_ends_running_tasks_and_skips_queued_ones(tmp_path):
    stop = Stop()

    def request_once_running() -> None:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.request()

    threading.Thread(target=request_once_running, daemon=True).start()
    with pytest.raises(Interrupted) as caught:
        run(until_stopped, [(str(tmp_path), i) for i in range(4)], workers=2, executor="ray", stop=stop)
    assert caught.value.results == {0: "stopped 0", 1: "stopped 1"}
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-0", "started-1"]


GRID = {"name": "grid", "epochs": 1, "batch_size": 32, "threads": 1, "model": {"name": "mlp", "hidden": [16]},
        "data": {"name": "digits", "train_size": 480}, "optimizer": {"name": "sgd", "lr": 0.1}}


def test_compare_on_ray_gives_the_local_table_and_resumes(tmp_path):
    local = cmp.compare(GRID, ["fa", "bp"], [0, 1], out_dir=tmp_path / "local", executor="inline", progress=False)
    remote = cmp.compare(GRID, ["fa", "bp"], [0, 1], out_dir=tmp_path / "ray", executor="ray", progress=False)
    assert [o.status for o in remote] == ["finished"] * 4
    assert [(o.rule, o.seed, o.summary["final"]["test_error"], o.summary["final"]["train_loss"]) for o in remote] \
        == [(o.rule, o.seed, o.summary["final"]["test_error"], o.summary["final"]["train_loss"]) for o in local]
    # The table's numbers (all but the seconds per epoch) are the local ones.
    strip = [line.rsplit("|", 3)[0] for line in (tmp_path / "local" / "results.md").read_text().splitlines()[2:]]
    assert strip == [line.rsplit("|", 3)[0] for line in (tmp_path / "ray" / "results.md").read_text().splitlines()[2:]]
    for o in remote:  # each run in its directory, where the command said
        assert json.loads(Path(o.run_dir, "result.json").read_text())["final"] == o.summary["final"]
        assert Path(o.run_dir).parent == tmp_path / "ray"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").glob("*/checkpoint.pt")}
    again = cmp.compare(GRID, ["fa", "bp"], [0, 1], out_dir=tmp_path / "ray", executor="ray", resume=True,
                        progress=False)
    assert [o.summary["final"] for o in again] == [o.summary["final"] for o in remote]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished runs were reused, not trained again
