"""Where independent jobs run: in-process, on local worker processes, or on a Ray cluster.

Campaign cells, ``reproduce`` cases and multi-profile searches are independent jobs that
each write their own part of a results store; the caller saves every result as it arrives
and rebuilds its tables from the store in a fixed order, so the tables are byte-identical
whichever executor ran the jobs (and a killed run resumes from the same store with any
executor).

* :class:`LocalExecutor`: ``workers = 1`` runs in this process; more spawn a process pool,
  each worker getting ``cpu_count // workers`` torch threads.
* :class:`RayExecutor`: every job is a Ray task (one CPU each). ``address=None`` starts a
  local Ray instance; ``"auto"`` or ``"HOST:PORT"`` joins a running cluster. Ray is an
  optional extra: ``pip install 'hasched[ray]'``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hasched.errors import HaschedError

__all__ = ["Executor", "LocalExecutor", "RayExecutor"]

# (setup, args) -> result; ``setup(device, threads)`` prepares a worker once per job
Job = Callable[[Any], Any]


class Executor:
    """Runs ``fn(job)`` for every job; yields ``(index, result)`` as jobs finish."""

    name = "executor"

    def map_unordered(self, fn: Job, jobs: list[Any],
                      setup: Callable[[str, int], None] | None = None
                      ) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _indexed(args: tuple) -> tuple[int, Any]:
    fn, i, job = args
    return i, fn(job)


def _init_pool(setup, devices, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if setup is not None:
        setup(devices.get(), threads)


@dataclass
class LocalExecutor(Executor):
    """This process (``workers == 1``) or a pool of spawned processes.

    Args:
        workers: Processes; ignored when ``devices`` names more than one.
        devices: One device per worker (``["cuda:0", "cuda:1"]``); CPU by default.
    """

    workers: int = 1
    devices: tuple[str, ...] = ()
    name = "local"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise HaschedError(f"--workers must be >= 1, got {self.workers}")

    def map_unordered(self, fn, jobs, setup=None):
        devices = list(self.devices) or ["cpu"] * self.workers
        devices = devices[:max(1, len(jobs))]
        if len(devices) <= 1:
            if setup is not None:
                setup(devices[0], 0)  # 0: keep this process's thread count
            for i, job in enumerate(jobs):
                yield i, fn(job)
            return
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        for d in devices:
            queue.put(d)
        threads = max(1, (os.cpu_count() or 1) // len(devices))
        with ctx.Pool(len(devices), initializer=_init_pool,
                      initargs=(setup, queue, threads)) as pool:
            yield from pool.imap_unordered(_indexed, ((fn, i, j) for i, j in enumerate(jobs)))

    def describe(self) -> str:
        return "local" if self.workers == 1 else f"local ({self.workers} processes)"


def _ray_job(fn, setup, job, threads: int):
    import torch

    torch.set_num_threads(threads)
    if setup is not None:
        setup("cpu", threads)
    return fn(job)


@dataclass
class RayExecutor(Executor):
    """Every job a Ray task.

    Args:
        address: ``None`` starts a local Ray instance (``num_cpus`` CPUs); ``"auto"`` or
            ``"HOST:PORT"`` joins a running cluster.
        num_cpus: CPUs of a local instance (default: all of this machine's).
        cpus_per_job: CPUs (and torch threads) each task reserves.
    """

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_job: int = 1
    name = "ray"

    def __post_init__(self) -> None:
        # Connect (or start the local instance) now: a missing Ray or an unreachable
        # cluster must fail before the caller creates any output folder.
        self._ray()

    @staticmethod
    def _import():
        try:
            import ray
        except ImportError:
            raise HaschedError("--executor ray needs Ray: pip install 'hasched[ray]'"
                               ) from None
        return ray

    def _ray(self):
        ray = self._import()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address,
                         num_cpus=self.num_cpus if self.address is None else None,
                         include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = self.address or "a local instance"
                raise HaschedError(f"cannot start Ray on {where}: {err}") from None
        return ray

    def map_unordered(self, fn, jobs, setup=None):
        ray = self._ray()
        task = ray.remote(num_cpus=self.cpus_per_job)(_ray_job)
        refs = {task.remote(fn, setup, job, self.cpus_per_job): i
                for i, job in enumerate(jobs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs[ref], ray.get(ref)

    def describe(self) -> str:
        return f"ray ({self.address or 'local instance'})"
