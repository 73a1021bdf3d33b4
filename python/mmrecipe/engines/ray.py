"""Running a build's work on a Ray cluster (`pip install "mmrecipe[ray]"`).

The builder submits one task per work unit of a source (the whole source, or a run of its
slices): a top-level function of its own (pickled by reference, so every node needs
mmrecipe installed) that tokenizes the unit and saves its token store entry onto storage
the nodes share, returning only small metadata; and one task per shard of the release,
which writes the shard's Parquet file from the row groups the driver emitted. A task is idempotent (its entry is written
beside its name and renamed into place), so Ray may run it again: `max_retries` retries a
task whose worker died. The driver waits for each result with Ray's failure signals, a look
at the cluster every POLL seconds and a stall timeout. Ray is imported only here, lazily."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..errors import MMRecipeError

#: How often Ray runs a task again after its worker process died (killed, out of memory).
MAX_RETRIES = 3

#: Seconds to wait for every node to read the staging folder's probe file.
PROBE_TIMEOUT = 120

#: Test-only: a folder; while it exists, each task kills its own worker the first time it
#: runs for a given name (a marker file records that), so that Ray has to retry it.
KILL_ONCE_ENV = "MMRECIPE_TEST_KILL_WORKER_ONCE"

#: Test-only: a folder; while it exists, every task waits without end (a task that never returns).
HANG_ENV = "MMRECIPE_TEST_HANG_TASKS"

#: Seconds the driver waits with no task finishing before it fails the build (a task
#: that never returns); generous: a work unit takes seconds to minutes.
TASK_TIMEOUT = 3600.0

#: Seconds between looks at whether the cluster is still there while a task runs.
POLL = 5.0


class RayEngineError(MMRecipeError):
    """Ray is missing, the cluster cannot be reached, or a task failed on it."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayEngineError('--engine ray needs Ray: pip install "mmrecipe[ray]"') from None
    return ray


class _Failed(NamedTuple):
    """A task's own error (bad data, a missing file), handed back as its result: raised on
    the driver as it is, as the local engine raises it (not wrapped in Ray's traceback)."""

    error: MMRecipeError


def _task(name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """What runs on a worker: the builder's function on its arguments."""
    marks = os.environ.get(KILL_ONCE_ENV)
    if marks and Path(marks).is_dir():  # test-only hook (see KILL_ONCE_ENV)
        mark = Path(marks) / name.replace("/", "-")
        if not mark.exists():
            mark.touch()
            os._exit(1)
    hang = os.environ.get(HANG_ENV)
    while hang and Path(hang).is_dir():  # test-only hook (see HANG_ENV)
        time.sleep(0.2)
    try:
        return fn(*args)
    except MMRecipeError as e:
        return _Failed(e)


def _sees(folder: str, name: str, token: str) -> dict[str, str]:
    """What runs on each node before any work: whether the probe file the driver wrote
    in the staging folder is there with its content (the folder is shared)."""
    import socket

    here = {"node": socket.gethostname()}
    try:
        ray = _ray()
        here["node"] = f"{ray.util.get_node_ip_address()} ({here['node']}, id {ray.get_runtime_context().get_node_id()[:12]})"
        found = (Path(folder) / name).read_text("utf-8")
    except OSError as e:
        return here | {"problem": f"cannot read {Path(folder) / name}: {e.strerror or e}"}
    if found != token:
        return here | {"problem": f"{Path(folder) / name} holds another build's probe: the path names another folder there"}
    return here


def write_probe(folder: Path, name: str, token: str) -> None:
    (folder / name).write_text(token, "utf-8")


class Cluster:
    """A connection to a Ray cluster for one build: tasks submitted, results awaited with a
    progress bar of the tasks done and the cluster's CPUs."""

    def __init__(self, address: str | None, progress: bool, timeout: float | None = None) -> None:
        ray = self.ray = _ray()
        self.owned = not ray.is_initialized()
        if self.owned:
            try:
                # A new local instance when no address is given (and $RAY_ADDRESS is unset).
                extra = {} if address else {"include_dashboard": False}
                ray.init(address=address, log_to_driver=False, configure_logging=False, **extra)
            except Exception as e:  # Ray raises ConnectionError, RuntimeError, ...
                raise RayEngineError(f"--engine ray: cannot connect to the Ray cluster at {address or 'a local instance'} ({e})") from None
        self.cpus = int(self.ray.cluster_resources().get("CPU", 0))
        self.remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(_task)
        self.pending: dict[Any, str] = {}
        self.done: dict[str, Any] = {}
        self.failed: dict[str, Exception] = {}
        self.labels: dict[str, str] = {}
        self.uncounted: set[str] = set()  # tasks the bar leaves out (it counts the tokenizing ones)
        self.timeout = TASK_TIMEOUT if timeout is None else timeout
        self.progress = progress
        self.bar: Any = None

    def check_shared(self, folder: Path) -> int:
        """That every alive node sees `folder` (the tasks' entries go there): a probe
        file written here, read by one task pinned to each node. RayEngineError naming
        the folder and each node that cannot; else the number of nodes."""
        import uuid

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name, token = f".probe-{uuid.uuid4().hex}", uuid.uuid4().hex
        write_probe(folder, name, token)
        try:
            nodes = [n["NodeID"] for n in self.ray.nodes() if n.get("Alive")]
            probe = self.ray.remote(num_cpus=0, max_retries=0)(_sees)
            refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(folder), name, token)
                    for node in nodes]
            try:
                seen = self.ray.get(refs, timeout=PROBE_TIMEOUT)
            except Exception as e:  # a node that cannot run the probe (gone, no mmrecipe)
                raise RayEngineError(f"--engine ray: could not check that every node sees the staging folder {folder} ({e})") from None
        finally:
            (folder / name).unlink(missing_ok=True)
        blind = [f"node {s['node']}: {s['problem']}" for s in seen if "problem" in s]
        if blind:
            raise RayEngineError(f"--engine ray: the staging folder {folder} must be on storage every node shares, and "
                                 f"{len(blind)} of {len(seen)} node(s) cannot see it ({'; '.join(blind)}); "
                                 "pass --ray-staging DIR on shared storage (and OUT's folder, or DIR, on it)")
        return len(seen)

    def submit(self, name: str, fn: Callable[..., Any], *args: Any, label: str | None = None, counted: bool = True) -> None:
        """Runs `fn(*args)` as a task; `name` (unique in the build) gets its result, `label`
        names it in errors; `counted`: on the bar of tasks done."""
        self.pending[self.remote.remote(name, fn, args)] = name
        self.labels[name] = label or f"task '{name}'"
        if not counted:
            self.uncounted.add(name)

    def start_bar(self) -> None:
        """The bar of tasks done, counting those submitted since it started too."""
        from tqdm.auto import tqdm

        if self.bar is not None:
            self.bar.total = self.bar.n + len(self.pending)
            self.bar.refresh()
            return
        self.bar = tqdm(total=len(self.pending), desc="tokenize (ray)", unit="task", disable=not self.progress,
                        file=sys.stderr, dynamic_ncols=True, leave=False)
        self.bar.set_postfix_str(f"{self.cpus} CPUs in the cluster")

    def result(self, name: str) -> Any:
        """The result of task `name`, waiting for it (and keeping those of others that end
        meanwhile, and their failures, each raised when its own result is asked for: errors
        come in the order the build asks, as the local engine's do). RayEngineError when
        the cluster goes away, or no task finishes for `timeout` seconds."""
        last = time.monotonic()  # when a task last finished (or the wait began)
        while name not in self.done and name not in self.failed:
            if not self.pending:
                raise RayEngineError(f"{self.labels.get(name, name)}: never submitted to the cluster")
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=min(POLL, self.timeout))
            if not ready:
                self.check_alive(name)
                if time.monotonic() - last > self.timeout:
                    raise RayEngineError(f"{self.labels[name]}: no task of the cluster finished in {self.timeout:g} s "
                                         f"({len(self.pending)} still running or queued); the build is stopped "
                                         "(--ray-task-timeout sets the wait)")
                continue
            last = time.monotonic()
            for ref in ready:
                which = self.pending.pop(ref)
                try:
                    value = self.ray.get(ref)
                    if isinstance(value, _Failed):
                        self.failed[which] = value.error
                    else:
                        self.done[which] = value
                except self.ray.exceptions.RayTaskError as e:
                    cause = e.as_instanceof_cause()
                    if isinstance(cause, MMRecipeError):
                        self.failed[which] = cause  # the source's own error, as the local engine gives it
                    else:
                        self.failed[which] = RayEngineError(f"{self.labels[which]}: its task failed on the cluster ({e})")
                except self.ray.exceptions.RayError as e:  # a worker died more than max_retries times, ...
                    self.failed[which] = RayEngineError(f"{self.labels[which]}: its task failed on the cluster ({e})")
                if self.bar is not None and which not in self.uncounted:
                    self.bar.update(1)
        if name in self.failed:
            raise self.failed.pop(name) from None
        return self.done.pop(name)

    def check_alive(self, name: str) -> None:
        """RayEngineError when the cluster is gone: not reachable, or no node alive."""
        try:
            alive = [n for n in self.ray.nodes() if n.get("Alive")]
        except Exception as e:  # noqa: BLE001 - Ray raises several types for a lost connection
            raise RayEngineError(f"{self.labels[name]}: the Ray cluster went away while it ran ({e}); no release was written") from None
        if not alive:
            raise RayEngineError(f"{self.labels[name]}: the Ray cluster went away while it ran (no node alive); no release was written")

    def close(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()
        if self.bar is not None:
            self.bar.close()
        if self.owned:
            self.ray.shutdown()
