"""Detection over many series: one task per series, in this process or on a Dask cluster.

``detect_many`` is what ``napari-spine-tracker detect INPUT... [--scheduler local|ADDRESS]`` runs.
Without a scheduler the series run one after the other in this process; with ``"local"`` they run
on a ``dask.distributed.LocalCluster`` of worker *processes* on this machine; with an address
(``tcp://host:8786``, or a scheduler JSON file) they run on an existing cluster, for instance one
that dask-jobqueue started on SLURM (docs/cluster.md). Inputs and outputs must be on a file system
that the workers and this process share.

- Each worker process loads the model once and keeps it (a per-process cache keyed by model,
  device and checkpoint file time); ``device="auto"`` picks each worker's own GPU when it has one.
- Each table is written atomically: an output appears only when its series is complete.
- Resumable: with ``skip_done`` an output that already holds a valid spine table is left alone.
- A failed series (corrupt TIFF, no voxel size, a lost worker, ...) is reported with its message
  and does not stop the others.

Dask is the optional ``[cluster]`` extra and is imported only when a scheduler is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import Cancelled, InputError
from .devices import usable_cores
from .models import DEFAULT_MODEL

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'napari-spine-tracker[cluster]'"
#: progress units per series: ``progress(done, total)`` counts hundredths of a series
SERIES_UNITS = 100
STATUSES = ("done", "skipped", "failed")


# --------------------------------------------------------------------------------------------
# results


@dataclass
class SeriesResult:
    """What happened to one input: ``status`` is ``done``, ``skipped`` or ``failed``."""

    input: str
    output: str
    status: str
    message: str = ""
    seconds: float = 0.0  # wall time on the worker, reading to writing
    spine_sessions: int = 0
    tracks: int = 0
    worker: str = ""  # host:pid of the process that ran it
    model_loaded: bool = False  # True when this task loaded the model (False: the worker's cached copy)


@dataclass
class BatchReport:
    """Every input's :class:`SeriesResult`, in input order, with the batch's wall time."""

    results: list[SeriesResult]
    seconds: float
    scheduler: str  # "this process", "LocalCluster (2 workers)" or the scheduler's address
    workers: int = 1

    def _with(self, status: str) -> list[SeriesResult]:
        return [r for r in self.results if r.status == status]

    @property
    def done(self) -> list[SeriesResult]:
        return self._with("done")

    @property
    def skipped(self) -> list[SeriesResult]:
        return self._with("skipped")

    @property
    def failed(self) -> list[SeriesResult]:
        return self._with("failed")

    @property
    def series_per_minute(self) -> float:
        """Series detected per minute of this batch's wall time (start-up included)."""
        return 60.0 * len(self.done) / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        """A plain-text table, one line per input, and a summary line."""
        lines = [f"{'status':<8} {'seconds':>8} {'spines':>7} {'tracks':>7}  input -> output / message"]
        for r in self.results:
            if r.status == "done":
                lines.append(f"{r.status:<8} {r.seconds:>8.1f} {r.spine_sessions:>7d} {r.tracks:>7d}  "
                             f"{r.input} -> {r.output}" + (f" ({r.message})" if r.message else ""))
            else:
                seconds = f"{r.seconds:.1f}" if r.status == "failed" else "-"
                lines.append(f"{r.status:<8} {seconds:>8} {'-':>7} {'-':>7}  {r.input}: {r.message}")
        lines.append(f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed in "
                     f"{self.seconds:.1f} s on {self.scheduler} ({self.series_per_minute:.1f} series/min)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# one series (runs on a worker, or in this process)


@dataclass(frozen=True)
class _Job:
    input: str
    output: str
    model: str  # a shipped model name or an absolute checkpoint path
    device: str
    voxel_size_um: tuple[float, float, float] | None
    channel: int | None
    threshold: float | None
    note: str = ""  # said in the result message (e.g. that an invalid table was replaced)
    torch_threads: int | None = None
    views: int | None = None
    max_rotation_deg: float | None = None
    gate_um: float | str | None = None
    max_gap: int | None = None
    suggestions: bool = False  # also write NAME.suggestions.csv beside the table
    track_evidence: bool = True


_MODEL_CACHE: dict[tuple[str, str], tuple[int, Any]] = {}
_MODEL_LOCK = threading.Lock()


def _worker_device(device: str) -> str:
    """``auto`` on a machine with several GPUs -> ``cuda:N`` from the worker's number N.

    LocalCluster names its workers 0, 1, ...; ``dask worker --nworkers K --name NAME`` names them
    NAME-0 ... NAME-(K-1). With one GPU visible (e.g. SLURM set CUDA_VISIBLE_DEVICES) or none,
    ``auto`` stays ``auto``.
    """
    if device != "auto":
        return device
    import torch

    count = torch.cuda.device_count()
    if count <= 1:
        return device
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):
        return device
    number = name.rsplit("-", 1)[-1]
    return f"cuda:{int(number) % count}" if number.isdigit() else device


def _cached_model(model: str, device: str):
    """(LoadedModel, loaded now) for this process; loaded once per model file, device and file time."""
    from .devices import get_device
    from .models import load_model, resolve_model

    device = str(get_device(_worker_device(device)))  # "auto" and "cpu" share one copy on a CPU worker
    stamp = resolve_model(model).stat().st_mtime_ns
    key = (model, device)
    with _MODEL_LOCK:
        cached = _MODEL_CACHE.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1], False
        loaded = load_model(model, device=device)
        _MODEL_CACHE[key] = (stamp, loaded)
        return loaded, True


def _process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _run_job(job: _Job, get_model: Callable[[], tuple[Any, bool]],
             progress: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> SeriesResult:
    """Detect one series and write its table; every error but a cancel becomes a failed result."""
    from ..io.series import load_series
    from ..io.tables import suggestions_path, write_spine_table, write_suggestions
    from .detect import detect_series, threshold_note

    started = time.perf_counter()
    result = SeriesResult(job.input, job.output, "failed", worker=_process_name())
    try:
        series = load_series(job.input, voxel_size_um=job.voxel_size_um, channel=job.channel)
        try:
            model, result.model_loaded = get_model()
            chosen = {name: getattr(job, name) for name in ("max_rotation_deg", "gate_um", "max_gap")
                      if getattr(job, name) is not None}  # the others: detect_series's defaults
            found = detect_series(series, model=model, threshold=job.threshold, views=job.views, **chosen,
                                  track_evidence=job.track_evidence, progress=progress, should_stop=should_stop,
                                  return_suggestions=job.suggestions)
        finally:
            series.close()
        table, suggestions = found if job.suggestions else (found, None)
        # suggestions beside the output belong to the table it held: gone before the new table
        # appears, so that a crash between the writes never pairs a table with another's suggestions
        beside = suggestions_path(job.output)
        stale = beside.exists()
        beside.unlink(missing_ok=True)
        write_spine_table(table, job.output)
        if suggestions is not None:
            write_suggestions(suggestions, beside)
    except Cancelled:
        raise
    except InputError as exc:
        # the report names the input already: "a.tif: a.tif: ..." reads as a stutter
        result.message = str(exc).removeprefix(f"{job.input}: ")
    except Exception as exc:  # a corrupt file can fail anywhere in a reader; report it, go on
        log.exception("detection failed on %s", job.input)
        result.message = f"{type(exc).__name__}: {exc}"
    else:
        result.status = "done"
        result.spine_sessions, result.tracks = len(table), int(table["track_id"].nunique())
        lowered = threshold_note(table)
        said = [job.note, lowered and f"{lowered} (--threshold model keeps it)"]
        if suggestions is not None:
            said.append(f"{len(suggestions)} suggestions of missed spines -> {beside}")
        elif stale:
            said.append(f"removed {beside.name}, the suggestions of the table replaced")
        result.message = "; ".join(filter(None, said))
    result.seconds = time.perf_counter() - started
    if result.status == "failed":
        log.warning("%s failed: %s", job.input, result.message)
    return result


def _torch_threads_on_worker() -> int:
    """CPU cores this worker process may use per task: its cores over its Dask threads.

    A Dask nanny starts workers with OMP_NUM_THREADS=1, which would leave torch one core.
    """
    cores = usable_cores()
    try:
        from distributed import get_worker

        tasks_at_once = max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        tasks_at_once = 1
    return max(1, cores // tasks_at_once)


def _detect_task(job: _Job) -> SeriesResult:
    """The Dask task: one series on a worker, with the worker's cached model."""
    import torch

    threads = job.torch_threads or _torch_threads_on_worker()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return _run_job(job, lambda: _cached_model(job.model, job.device))


# --------------------------------------------------------------------------------------------
# planning: outputs, what to skip


def _plan_outputs(inputs: Sequence[str | os.PathLike], out_dir, outputs) -> list[tuple[Path, Path]]:
    from ..io.tables import SUGGESTIONS_SUFFIX, default_table_path

    inputs = [Path(p) for p in inputs]
    if outputs is not None:
        if len(outputs) != len(inputs):
            raise InputError(f"{len(inputs)} inputs but {len(outputs)} outputs: give one output per input.")
        pairs = list(zip(inputs, (Path(o) for o in outputs)))
    elif out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"the output folder {out_dir} is a file: give a folder.")
        pairs = [(p, out_dir / default_table_path(p).name) for p in inputs]
    else:
        pairs = [(p, default_table_path(p)) for p in inputs]
    seen: dict[Path, Path] = {}
    for inp, out in pairs:
        if out.name.lower().endswith(SUGGESTIONS_SUFFIX):
            raise InputError(f"{out}: names ending in {SUGGESTIONS_SUFFIX} are for suggestions of missed spines; "
                             "give the spine table another name (NAME.spines.csv).")
        key = out.resolve()
        if key in seen:
            raise InputError(f"{seen[key]} and {inp} would both write {out}: give them different names, "
                             "or write each to its own output folder.")
        seen[key] = inp
    return pairs


def _existing_output(path: Path) -> tuple[str, str]:
    """(state, detail) of an output path: ``missing``, ``valid``, ``corrected`` or ``invalid``."""
    from ..io.tables import HUMAN_STATUSES, read_spine_table

    if not path.exists():
        return "missing", ""
    try:
        table = read_spine_table(path)
    except InputError as exc:
        return "invalid", str(exc)
    corrected = int(table["status"].isin(HUMAN_STATUSES).sum())
    if corrected:
        return "corrected", f"{corrected} hand-corrected points"
    return "valid", f"{len(table)} spine-sessions"


def _model_reference(model) -> str:
    """A model name or path -> what workers should load: a shipped name, or an absolute path."""
    from .models import SHIPPED_DIR, LoadedModel, resolve_model

    if isinstance(model, LoadedModel):
        raise InputError("on a Dask cluster each worker loads the model itself: pass a model name or a "
                         "checkpoint path, not a loaded model.")
    path = resolve_model(model).resolve()
    return path.stem if path.parent == SHIPPED_DIR.resolve() else str(path)


# --------------------------------------------------------------------------------------------
# the batch


def detect_many(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None, *,
                outputs: Sequence[str | os.PathLike] | None = None,
                scheduler: Any = "local", workers: int | None = None,
                model: Any = DEFAULT_MODEL, device: str = "auto",
                voxel_size_um: Sequence[float] | None = None, channel: int | None = None,
                threshold: float | None = None, views: int | None = None,
                max_rotation_deg: float | None = None, gate_um: float | str | None = None,
                max_gap: int | None = None, skip_done: bool = True, suggestions: bool = False,
                track_evidence: bool = True, progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> BatchReport:
    """Detect and track spines in many series, one task per series; returns a :class:`BatchReport`.

    Parameters
    ----------
    inputs
        4D TIFFs (T, Z, Y, X), 3D TIFFs or session folders, as for ``detect_series``.
    out_dir, outputs
        Where tables go: ``outputs`` (one path per input), else ``out_dir/NAME.spines.csv``, else
        next to each input (``NAME.spines.csv``).
    scheduler
        ``None``: one after the other in this process. ``"local"``: a LocalCluster of ``workers``
        processes (one thread each; default one per GPU, or one per two CPU cores), or this process
        when only one series needs running. Otherwise a scheduler address (``tcp://host:8786``), a
        scheduler file (``.json``), or a ``distributed.Client`` or cluster object.
    model, device, voxel_size_um, channel, threshold, views, max_rotation_deg, gate_um, max_gap, track_evidence
        As for ``detect_series`` (None: its default) and ``load_series``; ``device="auto"`` is resolved on each worker.
        ``voxel_size_um`` (z, y, x µm) overrides every file's metadata.
    skip_done
        Leave an output that already holds a valid spine table alone (a rerun resumes a batch).
        Without it, outputs are replaced, except tables holding hand corrections (status
        confirmed, added or edited), which are reported as failed and never overwritten.
    progress, should_stop
        ``progress(done, total)`` counts hundredths of a series (``SERIES_UNITS``); ``should_stop()``
        cancels: running tasks are dropped, finished tables stay, ``errors.Cancelled`` is raised.
    suggestions
        Also write each series' suggestions of missed spines beside its table
        (``NAME.suggestions.csv``, ``io.tables.write_suggestions``), for a review in napari, which
        opens them with the table. Without it, a suggestions file left beside a replaced table by
        an earlier run is removed, since it belongs to that table.

    Bad arguments (no inputs, colliding outputs, unknown model, bad voxel size) raise
    :class:`InputError` before anything runs; a bad input only fails its own series.
    """
    from ..io.series import validate_voxel_size
    from .infer import check_views
    from .link import check_linking
    from .register import check_max_rotation

    if not inputs:
        raise InputError("no inputs: give one or more TIFF files or session folders.")
    if workers is not None and (scheduler != "local" or workers < 1):
        raise InputError(f"workers={workers} sets the size of a local cluster: use a positive number "
                         "with scheduler 'local'.")
    voxel = validate_voxel_size(voxel_size_um) if voxel_size_um is not None else None
    if views is not None:
        check_views(views)
    if max_rotation_deg is not None:
        check_max_rotation(max_rotation_deg)
    check_linking(gate_um, max_gap)
    started = time.perf_counter()
    pairs = _plan_outputs(inputs, out_dir, outputs)
    results: dict[int, SeriesResult] = {}
    jobs: dict[int, _Job] = {}
    for i, (inp, out) in enumerate(pairs):
        state, detail = _existing_output(out)
        note = ""
        if state in ("valid", "corrected") and skip_done:
            results[i] = SeriesResult(str(inp), str(out), "skipped", f"{out} already holds a spine table ({detail})")
            continue
        if state == "corrected":
            results[i] = SeriesResult(str(inp), str(out), "failed",
                                      f"{out} holds {detail}; detection never overwrites corrections: move it "
                                      "away or write elsewhere (--out).")
            continue
        if state == "invalid":
            log.warning("%s is not a valid spine table; it will be replaced (%s)", out, detail)
            note = f"replaced an invalid table ({detail})"
        jobs[i] = _Job(str(inp), str(out), "", device, voxel, channel, threshold, note, views=views,
                       max_rotation_deg=max_rotation_deg, gate_um=gate_um, max_gap=max_gap,
                       suggestions=suggestions, track_evidence=track_evidence)

    where, n_workers = "this process", 1
    if jobs:
        in_process = scheduler is None or (isinstance(scheduler, str) and scheduler == "local" and len(jobs) == 1)
        if in_process:
            results.update(_run_in_process(jobs, model, device, progress, should_stop))
        else:
            reference = _model_reference(model)
            jobs = {i: replace(job, model=reference) for i, job in jobs.items()}
            ran, where, n_workers = _run_on_dask(jobs, scheduler, workers, progress, should_stop)
            results.update(ran)
    report = BatchReport([results[i] for i in range(len(pairs))], time.perf_counter() - started, where, n_workers)
    log.info("%d done, %d skipped, %d failed", len(report.done), len(report.skipped), len(report.failed))
    return report


def _run_in_process(jobs: dict[int, _Job], model, device, progress, should_stop) -> dict[int, SeriesResult]:
    """One series after the other, with one model loaded up front (a bad model stops the batch).

    The series share one heap (``reuse_freed_memory``): each reuses the memory the last one
    freed, which is given back to the system after the batch, not after each series (paging it
    in again for each series made a batch of six one-tile series take 11-16 % longer on 2 cores)."""
    from .devices import free_memory, reuse_freed_memory
    from .models import load_model

    loaded = load_model(model, device=device)
    total = len(jobs) * SERIES_UNITS
    results = {}
    unused = [True]  # the first series that asks for the model is told it was loaded for it

    def get_model() -> tuple[Any, bool]:
        fresh, unused[0] = unused[0], False
        return loaded, fresh

    try:
        with reuse_freed_memory():
            for n, (i, job) in enumerate(jobs.items()):
                if should_stop is not None and should_stop():
                    raise Cancelled("batch detection cancelled")

                def series_progress(done: int, of: int, base: int = n * SERIES_UNITS) -> None:
                    if progress is not None and of:
                        progress(base + min(SERIES_UNITS - 1, SERIES_UNITS * done // of), total)

                results[i] = _run_job(job, get_model, series_progress, should_stop)
                if progress is not None:
                    progress((n + 1) * SERIES_UNITS, total)
    finally:
        free_memory(loaded.device)
    return results


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise InputError(f"running on a cluster needs Dask's distributed scheduler: {INSTALL_HINT}") from exc
    return distributed


@contextlib.contextmanager
def _client(scheduler, workers: int | None, n_jobs: int):
    """(client, description, torch threads per task or None) for a scheduler argument."""
    distributed = _import_distributed()
    Client, LocalCluster = distributed.Client, distributed.LocalCluster
    if isinstance(scheduler, str) and scheduler == "local":
        n = workers or _default_local_workers(n_jobs)
        # processes, not threads: the GIL and torch's own thread pool; one task per process at a time
        with _quiet("distributed"), LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                 dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            yield client, f"LocalCluster ({n} workers)", max(1, (os.cpu_count() or 1) // n)
        return
    if hasattr(scheduler, "submit"):  # a distributed.Client the caller manages
        yield scheduler, str(scheduler.scheduler_info().get("address", "a Dask client")), None
        return
    address = getattr(scheduler, "scheduler_address", scheduler)  # a cluster object (SLURMCluster, ...)
    kwargs = {"scheduler_file": str(address)} if str(address).endswith(".json") else {"address": str(address)}
    try:
        client = Client(timeout="20s", **kwargs)
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(f"cannot reach the Dask scheduler at {address} ({exc}); check the address (e.g. "
                         "tcp://host:8786) or the scheduler file, and that the scheduler is running.") from exc
    with client:
        yield client, str(address), None


@contextlib.contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR):
    """The scheduler of our own LocalCluster logs every start and stop at INFO; keep its errors only."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


def _default_local_workers(n_jobs: int) -> int:
    """One worker per GPU; on CPUs one per two cores (torch uses the cores of its process)."""
    import torch

    per_machine = torch.cuda.device_count() or max(1, (os.cpu_count() or 1) // 2)
    return max(1, min(n_jobs, per_machine))


def _run_on_dask(jobs: dict[int, _Job], scheduler, workers, progress, should_stop):
    distributed = _import_distributed()
    WaitTimeout, wait = distributed.TimeoutError, distributed.wait
    with _client(scheduler, workers, len(jobs)) as (client, where, torch_threads):
        n_workers = len(client.scheduler_info().get("workers", {}))
        log.info("running %d series on %s (%d workers now)", len(jobs), where, n_workers)
        futures = {client.submit(_detect_task, replace(job, torch_threads=torch_threads), pure=False,
                                 key=f"detect-{Path(job.input).name}-{uuid.uuid4().hex[:8]}"): i
                   for i, job in jobs.items()}
        results: dict[int, SeriesResult] = {}
        pending = set(futures)
        total = len(jobs) * SERIES_UNITS
        try:
            while pending:
                if should_stop is not None and should_stop():
                    raise Cancelled("batch detection cancelled")
                with contextlib.suppress(WaitTimeout):
                    finished, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
                    for future in finished:
                        i = futures[future]
                        results[i] = _collect(future, jobs[i])
                    if progress is not None and finished:
                        progress(len(results) * SERIES_UNITS, total)
        finally:
            if pending:
                client.cancel(list(pending))
    return results, where, max(n_workers, 1)


def _collect(future, job: _Job) -> SeriesResult:
    """A finished future's result; a task that raised (a lost worker, say) becomes a failed result."""
    try:
        return future.result()
    except Exception as exc:
        message = f"the task did not finish ({type(exc).__name__}: {exc})"
        if type(exc).__name__ == "KilledWorker":
            message += "; the worker process died running it (out of memory?)"
        log.warning("%s failed: %s", job.input, message)
        return SeriesResult(job.input, job.output, "failed", message)
