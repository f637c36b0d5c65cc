"""Where the pipeline's per-file work runs: local processes, or a Ray cluster.

An engine has one method, `map(function, tasks, description) -> list of results in task
order`. `function` is a module-level function and each task a picklable tuple, so the same
stage code runs unchanged on both engines and gives the same output (the pipeline's only
ordering is the task order, never completion order).

- `LocalEngine(num_workers)`: a pool of `spawn`ed processes (spawn, not fork: the parent may have
  started threads, e.g. JAX's); one worker runs in-process with no pool at all.
- `RayEngine(address, num_cpus)`: one Ray task per file. `address=None` starts a local Ray
  (`ray.init(num_cpus=...)`); "auto" or "ray://host:port" joins an existing cluster. Ray is an
  optional extra: `pip install 'jaxlm[ray]'`. The input and output paths must be visible to
  every node (a shared file system), as for any file-based Ray job.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Sequence

from tqdm import tqdm


class LocalEngine:
    def __init__(self, num_workers: int = 1, progress: bool = True):
        self.num_workers = max(1, num_workers)
        self.progress = progress
        self._pool = None

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def map(self, function: Callable, tasks: Sequence[Any], description: str) -> list:
        bar = tqdm(total=len(tasks), desc=description, unit="file", disable=not self.progress or None)
        if self.num_workers == 1 or len(tasks) <= 1:
            results = []
            for task in tasks:
                results.append(function(task))
                bar.update()
        else:
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
            results = []
            for result in self._pool.imap(function, tasks):
                results.append(result)
                bar.update()
        bar.close()
        return results


class RayEngine:
    def __init__(self, address: str | None = None, num_cpus: int | None = None, progress: bool = True):
        try:
            import ray
        except ImportError as error:
            raise ImportError("--engine ray needs Ray: pip install 'jaxlm[ray]'") from error
        self._ray = ray
        self.progress = progress
        self._started_here = not ray.is_initialized()
        if self._started_here:
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._started_here:
            self._ray.shutdown()

    def map(self, function: Callable, tasks: Sequence[Any], description: str) -> list:
        remote = self._ray.remote(function)
        pending = [remote.remote(task) for task in tasks]
        bar = tqdm(total=len(tasks), desc=description, unit="file", disable=not self.progress or None)
        remaining = list(pending)
        while remaining:
            done, remaining = self._ray.wait(remaining, num_returns=1)
            bar.update(len(done))
        bar.close()
        return self._ray.get(pending)


def make_engine(name: str, num_workers: int, progress: bool = True, address: str | None = None):
    if name == "local":
        return LocalEngine(num_workers, progress)
    if name == "ray":
        return RayEngine(address, num_workers, progress)
    raise ValueError(f"unknown engine {name!r}; choose 'local' or 'ray'")
