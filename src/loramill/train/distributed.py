"""Data-parallel training of one dataset in several processes, started by the train job
through PyTorch's elastic launcher (what ``torchrun`` runs): ``train.num_processes`` workers on
each of ``train.num_machines`` machines, one per GPU on CUDA (NCCL) or sharing the CPU (gloo),
each an accelerate process of one DDP group.

The job's process is torchrun's agent (``elastic_launch``, in process): it meets the other
machines' agents at ``train.rdzv_endpoint`` (c10d rendezvous; one machine meets on localhost),
starts each worker as a fresh interpreter (``python -m loramill.train.distributed``: a
Snakemake ``script:`` cannot be re-imported the way multiprocessing's spawn would) with the
variables torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``TORCHELASTIC_RUN_ID`` …, which accelerate reads), and returns rank 0's result. Rank 0 alone
writes checkpoints, state, logs and TensorBoard; its log lines reach the job's log file.

Failures are torchrun's: a worker failing stops the others (SIGTERM, SIGKILL after
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds, 30 by default), and a SIGINT or SIGTERM to the job
is passed on to the workers, which save their state at the next step boundary and stop
(loramill.train.stopping). A worker's LoramillError becomes the job's one-line error.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loramill import LoramillError

WORKER_ENV = "LORAMILL_WORKER"  # set in the workers: they run the function, never launch
# what torchrun's agent takes over in the job's process, and does not give back
AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
AGENT_ENV = (WORKER_ENV, "OMP_NUM_THREADS", "TORCHELASTIC_SIGNALS_TO_HANDLE")
RDZV_TIMEOUT = 900  # seconds the first machine waits for the others (torchrun's default)


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


def launch_config(
    num_processes: int, num_machines: int, rdzv_endpoint: str, log_dir: str | None = None
) -> Any:
    """torchrun's settings: ``--standalone`` on one machine, ``--nnodes N --rdzv-backend c10d
    --rdzv-endpoint HOST:PORT`` on several."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    alone = num_machines == 1
    # One id for every machine's agent: the Slurm allocation's, as srun gives it to each node.
    run_id = str(uuid.uuid4()) if alone else os.environ.get("SLURM_JOB_ID", "loramill")
    return LaunchConfig(
        min_nodes=num_machines,
        max_nodes=num_machines,
        nproc_per_node=num_processes,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if alone else rdzv_endpoint,  # port 0: a free one
        rdzv_configs={"timeout": RDZV_TIMEOUT},
        max_restarts=0,  # a rerun resumes from the saved state; a restart would train twice
        # alone: the loopback, not this host's name, which a sandbox may not resolve
        local_addr="127.0.0.1" if alone else None,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),  # torchrun's error files, in our folder
        signals_to_handle=",".join(AGENT_SIGNALS),
    )


@contextlib.contextmanager
def _agent_process(threads: int) -> Iterator[None]:
    """The job's process while it is torchrun's agent: the workers inherit its environment
    (their thread count, the mark that they are workers), and the agent's signal handlers and
    variables are undone afterwards, so a SIGINT after the training reaches the job as usual."""
    saved_env = {name: os.environ.get(name) for name in AGENT_ENV}
    numbers = [getattr(signal, name) for name in AGENT_SIGNALS]
    saved_handlers = {number: signal.getsignal(number) for number in numbers}
    # accelerate picks its own thread count when OMP_NUM_THREADS is unset
    os.environ.update({WORKER_ENV: "1", "OMP_NUM_THREADS": str(threads)})
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        with contextlib.suppress(ValueError):  # not the main thread: the agent set none
            for number, handler in saved_handlers.items():
                signal.signal(number, handler)


def launch(
    function: Callable[..., Any], kwargs: dict[str, Any], processes: int, threads: int,
    machines: int = 1, endpoint: str = "",
) -> Any:  # fmt: skip
    """``function(**kwargs)`` in ``processes`` DDP workers of ``threads`` threads on each of
    ``machines`` machines (meeting at ``endpoint``); rank 0's return value, or [] on a machine
    without rank 0 (whose agent returns once every machine's workers are done)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    with tempfile.TemporaryDirectory(prefix="loramill-ddp-") as tmp:
        job = Path(tmp) / "job.json"
        spec = {"function": f"{function.__module__}:{function.__qualname__}",
                "kwargs": _jsonable(kwargs), "log_files": _log_files()}  # fmt: skip
        job.write_text(json.dumps(spec), encoding="utf-8")
        agent = elastic_launch(launch_config(processes, machines, endpoint, tmp), sys.executable)
        try:
            with _agent_process(threads):
                agent("-m", "loramill.train.distributed", str(job))
        except ChildFailedError as error:
            rank = error.get_first_failure()[0]
            why = f"train: worker {rank} failed (see the log)"
            raise LoramillError(_report(Path(tmp)) or why) from None
        except RendezvousError as error:  # a machine missing, or the endpoint unreachable
            raise LoramillError(
                f"train.rdzv_endpoint {endpoint}: the {machines} machines' "
                f"train jobs did not all meet there ({type(error).__name__}: {error})"
            ) from None
        except SignalException as error:
            why = f"interrupted ({error.sigval.name}); rerun the same command to continue"
            raise LoramillError(_report(Path(tmp)) or why) from None
        result = Path(tmp) / "result.json"
        return json.loads(result.read_text(encoding="utf-8")) if result.exists() else []


def check_gpus(processes: int, device: Any) -> None:
    """On CUDA every process needs a GPU of its own."""
    import torch

    if device.type == "cuda" and torch.cuda.device_count() < processes:
        raise LoramillError(
            f"train.num_processes: {processes} processes, and this machine has "
            f"{torch.cuda.device_count()} GPU(s)"
        )


def _report(folder: Path) -> str:
    """The lowest rank's LoramillError on this machine: rank 0's word first, as after a stop
    every rank reports and rank 0 is the one that saved the state."""
    reports = sorted(folder.glob("error-*.txt"), key=lambda p: int(p.stem.split("-")[1]))
    return reports[0].read_text(encoding="utf-8") if reports else ""


def _worker(job: Path) -> int:
    rank = int(os.environ["RANK"])  # set by torchrun's agent, as for any torchrun worker
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
    sys.exit(_worker(Path(sys.argv[1])))
