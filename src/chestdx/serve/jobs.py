"""Asynchronous jobs: a volume (or series) prediction that runs after its request has been answered.

Routes (see `chestdx.serve.app`):

- `POST /api/v1/jobs` (scope predict; the form of `/api/v1/predict`: file, model, heatmap) answers
  202 `{"job_id", "status": "queued", "status_url", "created"}` with a `Location` header. It takes
  series models only (sample "volume" or "sequence"; an image model answers at once on /predict).
  The upload's size and kind are checked before the job exists (413, 415); everything else a
  synchronous predict would refuse (an unreadable series, ...) ends the job `failed` with that error.
- `GET /api/v1/jobs/{id}` (scope read) answers 200 `{"job_id", "status": queued | running | done |
  failed, "model", "created", "started", "finished", "status_url"}` plus `result` (exactly the body
  `/api/v1/predict` returns, study id included) when done, or `error` (the service's error schema,
  `{"status", "message", "file"}`; `file` is null, a job stores no file name) when failed. Like a
  study, a job is readable by its creator's organisation and by administrators; anyone else gets 404.
- `/api/v1/predict` on a volume model answers synchronously (200) when the model is fast enough and
  otherwise with the same 202 body as `POST /api/v1/jobs`. The rule, per model, fixed at start-up:
  the model's warm-up pass is timed at load (`registry.ServedModel.warm_up`: the calls
  `predict_volume` makes, on a zero volume of the model's input size, the second of two passes),
  and predict answers synchronously iff `SYNC_FACTOR x warm-up <= ServiceSettings.max_sync_seconds`
  (default 10 s); the factor 2 leaves as much time again for reading, resampling and the montage.
  `max_sync_seconds = 0` sends every volume to a job; a client can always ask for a job itself.

A full queue: each process runs jobs on `job_workers` threads with at most `job_queue` jobs waiting;
one more is refused with **503** and a `Retry-After` (seconds: the waiting and running jobs times the
model's estimate, over the workers). 503, not 429, because the refusal is about the capacity this
process shares with every client, not about one client's rate; retrying later, or at another copy
of the service behind the load balancer, is what the client should do.

State lives in the `jobs` table (migration 0003), so any process sharing the database answers a
status. A job is run only by the process that accepted it (`owner`): that process renews the job's
`lease_until` every `lease_s / 3` seconds while it is queued or running. A job whose lease passed
(its process died or hung) is marked failed, with the reason, by whichever process looks first:
every process's heartbeat, the status route itself, and each process at start-up. A job that runs
past `timeout_s` (from its creation) is failed by its own process. Finished jobs (their results and
montages) are deleted `keep_s` after they finish; the study they created stays.

The uploaded bytes wait in a temporary file (mode 0600, named by the job id only, in a folder
private to the service's user) that is removed as soon as the worker has read it, and in any case
when the job ends; at start-up each process removes files there whose job is no longer queued or
running (what a dead process on this host left). They never go into the database. What is stored
follows studies: the study records the verdict and the upload's SHA-256, no image for a series.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import secrets
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from chestdx.serve.db import JOB_ACTIVE, Database, Job

log = logging.getLogger("chestdx.serve")
SYNC_FACTOR = 2.0
SUFFIX = ".upload"


class JobError(Exception):
    """A job's failure in the service's error schema (what a synchronous predict would have answered)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class JobsFull(Exception):
    def __init__(self, retry_after: int, message: str):
        super().__init__(message)
        self.retry_after, self.message = retry_after, message


@dataclass
class Work:
    """What a worker needs besides the row: held in this process's memory only."""

    job_id: str
    model: str
    name: str  # the client's file name: its suffix tells NIfTI from zip; never stored
    heatmap: bool
    principal: Any
    path: Path  # the upload, in the spool folder


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime | None) -> datetime | None:
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=timezone.utc))  # SQLite: naive


def _iso(t: datetime | None) -> str | None:
    return None if t is None else _aware(t).isoformat()


def lost_error() -> dict:
    return {"status": 503, "file": None,
            "message": "the service process running this job stopped or stalled before finishing it (its lease "
                       "expired); submit the file again"}


class JobRunner:
    """This process's job workers, the heartbeat that renews their leases, and the sweeps."""

    def __init__(self, db: Database, run: Callable[[Work, bytes], dict], workers: int = 1, queue_size: int = 4,
                 lease_s: float = 30.0, timeout_s: float = 900.0, keep_s: float = 3600.0,
                 spool_dir: Path | None = None):
        self.db, self.run = db, run
        self.workers, self.queue_size = max(1, int(workers)), max(0, int(queue_size))
        self.lease_s, self.timeout_s, self.keep_s = float(lease_s), float(timeout_s), float(keep_s)
        self.spool = Path(spool_dir) if spool_dir else Path(tempfile.gettempdir()) / f"chestdx-jobs-{os.getuid()}"
        self.owner = f"{socket.gethostname()[:80]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.capacity = threading.BoundedSemaphore(self.workers + self.queue_size)
        self._queue: queue.Queue = queue.Queue()
        self._active: dict[str, datetime] = {}  # job id -> creation time, while queued or running here
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._generation = 0  # threads of an earlier start() (still finishing a job) stop after it

    # life cycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Sweep (expired leases, left-over uploads, old results), then start the threads. Idempotent."""
        if not self._stop.is_set() and any(t.is_alive() for t in self._threads):
            return
        self._generation += 1
        self._stop.clear()
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.spool, 0o700)
        self.sweep(startup=True)
        gen = self._generation
        self._threads = [threading.Thread(target=self._worker, args=(gen,), name=f"chestdx-job-{k}", daemon=True)
                         for k in range(self.workers)]
        self._threads.append(threading.Thread(target=self._heartbeat, args=(gen,), name="chestdx-job-lease",
                                              daemon=True))
        for t in self._threads:
            t.start()

    def close(self, wait_s: float = 5.0) -> None:
        """Stop taking work; the jobs still waiting here fail at once (no lease to wait for)."""
        self._stop.set()
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                break
            self.db.update_job(work.job_id, ("queued",), self.owner, status="failed", finished=_now(),
                               error={"status": 503, "file": None, "message": "the service stopped before the job "
                                                                              "ran; submit the file again"})
            self._done(work)
        deadline = time.monotonic() + wait_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # submitting ------------------------------------------------------------------------------------
    def submit(self, data: bytes, name: str, model: str, heatmap: bool, principal, estimate_s: float) -> Job:
        if self._stop.is_set():
            raise JobsFull(5, "the service is stopping; submit the job to another copy or retry shortly")
        if not self.capacity.acquire(blocking=False):
            with self._lock:
                waiting = len(self._active)
            retry = int(min(600, max(1, math.ceil(waiting * max(estimate_s, 0.1) / self.workers))))
            raise JobsFull(retry, f"the job queue is full ({waiting} jobs waiting or running, at most "
                                  f"{self.workers + self.queue_size} per service process); retry in {retry} s")
        job_id = str(uuid.uuid4())
        path = self.spool / f"{job_id}{SUFFIX}"
        try:
            now = _now()
            job = self.db.add_job(id=job_id, created=now, status="queued", model=model, heatmap=heatmap,
                                  org_id=principal.org_id, created_by=principal.actor, owner=self.owner,
                                  lease_until=now + timedelta(seconds=self.lease_s))
            # The row first, then the file: a start-up sweep that sees the file also sees the row active.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            with self._lock:
                self._active[job_id] = now
            self._queue.put(Work(job_id, model, name, heatmap, principal, path))
        except BaseException:
            path.unlink(missing_ok=True)
            with self._lock:
                self._active.pop(job_id, None)
            self.capacity.release()
            try:
                self.db.update_job(job_id, JOB_ACTIVE, status="failed", finished=_now(),
                                   error={"status": 503, "file": None, "message": "the job could not be queued"})
            except Exception:
                pass  # the database itself failed: the lease expires the row, if there is one
            raise
        return job

    # reading ---------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        """The job, failed first if its lease has passed (no process keeps it alive)."""
        job = self.db.get_job(job_id)
        if job is not None and job.status in JOB_ACTIVE and (job.lease_until is None
                                                             or _aware(job.lease_until) < _now()):
            if self.db.expire_jobs(_now(), lost_error(), job_id=job_id):
                log.warning("job %s: lease of %s expired; failed", job_id, job.owner)
            job = self.db.get_job(job_id)
        return job

    @staticmethod
    def body(job: Job, status_url: str) -> dict:
        out = {"job_id": job.id, "status": job.status, "model": job.model, "created": _iso(job.created),
               "started": _iso(job.started), "finished": _iso(job.finished), "status_url": status_url}
        if job.status == "done":
            out["result"] = job.result
        elif job.status == "failed":
            out["error"] = job.error
        return out

    def outstanding(self) -> int:
        with self._lock:
            return len(self._active)

    # the threads -----------------------------------------------------------------------------------
    def _live(self, gen: int) -> bool:
        return not self._stop.is_set() and gen == self._generation

    def _worker(self, gen: int) -> None:
        while self._live(gen):
            try:
                work = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._run(work)
            except Exception:  # a database failure while recording: the lease expires the job
                log.exception("job %s: could not be recorded", work.job_id)
            finally:
                self._done(work)

    def _run(self, work: Work) -> None:
        if not self.db.update_job(work.job_id, ("queued",), self.owner, status="running", started=_now()):
            return  # failed meanwhile (timeout, lease), or not ours
        try:
            data = work.path.read_bytes()
            work.path.unlink(missing_ok=True)  # held no longer than needed
            result, error = self.run(work, data), None
            del data
        except JobError as err:
            result, error = None, {"status": err.status, "message": err.message, "file": None}
        except Exception:
            log.exception("job %s: unexpected error", work.job_id)
            result, error = None, {"status": 500, "message": "internal error; the job was not processed",
                                   "file": None}
        if error is None:
            ok = self.db.update_job(work.job_id, ("running",), self.owner, status="done", finished=_now(),
                                    result=result, study_id=result.get("study_id"))
        else:
            ok = self.db.update_job(work.job_id, ("running",), self.owner, status="failed", finished=_now(),
                                    error=error)
        if not ok:
            log.warning("job %s finished after it had been failed (timeout or lease); its result is dropped",
                        work.job_id)

    def _done(self, work: Work) -> None:
        work.path.unlink(missing_ok=True)
        with self._lock:
            self._active.pop(work.job_id, None)
        self.capacity.release()

    def _heartbeat(self, gen: int) -> None:
        interval = max(0.05, self.lease_s / 3)
        while not self._stop.wait(interval) and gen == self._generation:
            try:
                self.beat()
            except Exception as err:  # the database is away: leases lapse, the jobs fail, nothing hangs
                log.warning("job heartbeat failed: %s", type(err).__name__)

    def beat(self) -> None:
        now = _now()
        with self._lock:
            active = dict(self._active)
        late = [i for i, created in active.items() if (now - created).total_seconds() > self.timeout_s]
        for job_id in late:
            self.db.update_job(job_id, JOB_ACTIVE, self.owner, status="failed", finished=now,
                               error={"status": 504, "file": None, "message": f"the job did not finish within "
                                                                             f"{self.timeout_s:g} s"})
        self.db.renew_leases(self.owner, [i for i in active if i not in late], now + timedelta(seconds=self.lease_s))
        self.sweep()

    def sweep(self, startup: bool = False) -> None:
        now = _now()
        expired = self.db.expire_jobs(now, lost_error())
        if expired:
            log.warning("%d job(s) failed: their service process stopped (lease expired)", expired)
        self.db.purge_jobs(now - timedelta(seconds=self.keep_s))
        if startup:  # uploads a dead process on this host left behind
            files = list(self.spool.glob(f"*{SUFFIX}"))
            if files:
                active = self.db.active_job_ids()
                for f in files:
                    if f.name[:-len(SUFFIX)] not in active:
                        f.unlink(missing_ok=True)


def sync_allowed(warmup_s: float | None, max_sync_seconds: float) -> bool:
    """The documented rule: synchronous iff SYNC_FACTOR x the model's warm-up pass <= max_sync_seconds."""
    return warmup_s is not None and SYNC_FACTOR * warmup_s <= max_sync_seconds
