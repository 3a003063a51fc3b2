"""Data-parallel training of one dataset in several processes (issue #16), launched by the
train job itself: ``train.num_processes`` workers on this machine, one per GPU on CUDA (NCCL)
or sharing the CPU (gloo), each an accelerate process of one DDP group.

The job's process starts each worker as a fresh interpreter (``python -m
loramill.distributed``: a Snakemake ``script:`` cannot be re-imported the way
multiprocessing's spawn would), with the variables accelerate and torch.distributed read
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` …) and the function's arguments as JSON; it waits
for them and returns rank 0's result. Rank 0 alone writes checkpoints, state, logs and
TensorBoard; its log lines reach the job's log file. When a worker fails the others are
stopped, and a worker's LoramillError becomes the job's one-line error.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.stopping import StopRequest

WORKER_ENV = "LORAMILL_WORKER"  # set in the workers: they run the function, never launch
POLL_SECONDS = 0.5
STOP_SECONDS = 30


def in_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def share(count: int, rank: int, world: int) -> tuple[slice, float]:
    """The rows of a batch of ``count`` a process trains on, and the factor on its mean loss
    that makes the processes' mean the batch's mean. A process left without a row (a batch
    shorter than the group) runs the first row at factor 0: DDP needs its gradients."""
    start, stop = rank * count // world, (rank + 1) * count // world
    if stop == start:
        return slice(0, 1), 0.0
    return slice(start, stop), (stop - start) * world / count


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_files() -> list[str]:
    """The files the job logs to, for rank 0 to append to."""
    root = logging.getLogger()
    return [h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else value


def _stop(workers: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL for a worker still there after STOP_SECONDS (one whose peer is
    gone cannot reach the step boundary where it would stop)."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _wait(workers: list[subprocess.Popen]) -> int | None:
    """Wait until every worker ended; the first failing rank (the others are stopped then).

    A stop asked of the job (a signal, its scheduler gone) is passed on to the workers, which
    save their state at the next step boundary and exit (loramill.stopping)."""
    with StopRequest() as stop:
        return _poll(workers, stop)


def _poll(workers: list[subprocess.Popen], stop: StopRequest) -> int | None:
    passed_on = False
    while True:
        if not passed_on and stop.requested():
            passed_on = True
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
        codes = [w.poll() for w in workers]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            _stop(workers)
            return failed[0]
        if all(code == 0 for code in codes):
            return None
        time.sleep(POLL_SECONDS)


def launch(
    function: Callable[..., Any], kwargs: dict[str, Any], num_processes: int, threads: int
) -> Any:
    """``function(**kwargs)`` in ``num_processes`` DDP workers; rank 0's return value."""
    with tempfile.TemporaryDirectory(prefix="loramill-ddp-") as tmp:
        job = Path(tmp) / "job.json"
        spec = {"function": f"{function.__module__}:{function.__qualname__}",
                "kwargs": _jsonable(kwargs), "log_files": _log_files()}  # fmt: skip
        job.write_text(json.dumps(spec), encoding="utf-8")
        env = {
            **os.environ, WORKER_ENV: "1", "WORLD_SIZE": str(num_processes),
            "LOCAL_WORLD_SIZE": str(num_processes), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": str(threads),  # accelerate picks its own count when unset
        }  # fmt: skip
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "loramill.distributed", str(job), str(rank)],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            )
            for rank in range(num_processes)
        ]
        try:
            failed = _wait(workers)
        finally:
            _stop(workers)  # the job itself killed or interrupted: take the workers along
        if failed is not None:
            # rank 0's word first: after a stop every rank reports, and rank 0 saved the state
            reports = [Path(tmp) / f"error-{rank}.txt" for rank in (0, failed)]
            report = next((r for r in reports if r.exists()), reports[-1])
            message = report.read_text(encoding="utf-8") if report.exists() else ""
            raise LoramillError(message or f"train: worker {failed} failed (see the log)")
        return json.loads((Path(tmp) / "result.json").read_text(encoding="utf-8"))


def _worker(job: Path, rank: int) -> int:
    spec = json.loads(job.read_text(encoding="utf-8"))
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0:  # one voice in the log: rank 0 speaks for the group
        handlers += [logging.FileHandler(p, mode="a", encoding="utf-8") for p in spec["log_files"]]
    fmt = f"%(asctime)s %(levelname)s %(name)s [rank {rank}]: %(message)s"
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)
    module, name = spec["function"].split(":")
    function = getattr(importlib.import_module(module), name)
    try:
        result = function(**spec["kwargs"])
    except LoramillError as error:
        (job.parent / f"error-{rank}.txt").write_text(str(error), encoding="utf-8")
        return 1
    if rank == 0:
        (job.parent / "result.json").write_text(json.dumps(_jsonable(result)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1]), int(sys.argv[2])))
