"""Device jobs (train, evaluate, sweep) as separate processes whose folder is their only state.

Starting a job writes `<folder>/ui-<kind>.json` and launches a worker (`python -m
style_dreambooth.ui.worker`) in its own session, so the job outlives a page reload or a restart of
the UI. The worker waits for its turn on the workspace's device lock (first queued, first served:
one job at a time per device), then runs `style-dreambooth <kind> ...` with its output in
`<folder>/ui-<kind>.log`, and records the state and exit code in the job file. The UI finds jobs
again by reading those files; nothing is kept in the UI process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..files import write_text_atomically

KINDS = ("train", "evaluate", "sweep")
ACTIVE = ("queued", "running")
LOCK_NAME = ".ui-device.lock"
WORKER_MODULE = "style_dreambooth.ui.worker"
COMMAND_MODULE = "style_dreambooth"
_START_GRACE_S = 60.0  # a job whose worker has not yet written its pid counts as alive this long


@dataclass
class Job:
    kind: str
    folder: str
    argv: list[str]
    state: str = "queued"  # queued, running, finished, failed, stopped
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    returncode: int | None = None
    worker_pid: int | None = None
    child_pid: int | None = None
    stop_requested: bool = False

    @property
    def path(self) -> Path:
        return job_file(Path(self.folder), self.kind)

    @property
    def log(self) -> Path:
        return Path(self.folder) / f"ui-{self.kind}.log"

    def save(self) -> None:
        write_text_atomically(self.path, json.dumps(asdict(self), indent=1))

    def is_alive(self) -> bool:
        """Whether the job's worker, or the command it started, still runs (a job just queued counts too)."""
        if self.state not in ACTIVE:
            return False
        if self.worker_pid is None:
            return time.time() - self.queued_at < _START_GRACE_S
        return _runs(self.worker_pid, WORKER_MODULE) or self._command_runs()

    def _command_runs(self) -> bool:
        return self.child_pid is not None and _runs(self.child_pid, COMMAND_MODULE)

    @property
    def shown_state(self) -> str:
        """The state as the UI shows it: an active job whose worker is gone was interrupted."""
        if self.state in ACTIVE and not self.is_alive():
            return "interrupted"
        return self.state


def job_file(folder: Path, kind: str) -> Path:
    return folder / f"ui-{kind}.json"


def read_job(folder: Path, kind: str) -> Job | None:
    path = job_file(folder, kind)
    try:
        return Job(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None  # torn or foreign file: no job the UI can follow


def _runs(pid: int, module: str) -> bool:
    """A live (not zombie) process running `module`: a reused pid does not count."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            status = (proc / "status").read_text()
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        zombie = any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())
        return not zombie and module in cmdline
    try:  # no /proc (macOS): existence only
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def all_jobs(root: Path) -> list[Job]:
    """Every job in the workspace (run and sweep folders), oldest first."""
    jobs = []
    for pattern in ("runs/*/ui-*.json", "sweeps/*/ui-*.json"):
        for path in root.glob(pattern):
            kind = path.stem.removeprefix("ui-")
            if kind in KINDS and (job := read_job(path.parent, kind)):
                jobs.append(job)
    return sorted(jobs, key=lambda j: j.queued_at)


def active_jobs(root: Path) -> list[Job]:
    """Jobs running or waiting their turn, in queue order (the running one first)."""
    jobs = [j for j in all_jobs(root) if j.is_alive()]
    return sorted(jobs, key=lambda j: (j.state != "running", j.queued_at))


def _reap(proc: subprocess.Popen) -> None:
    threading.Thread(target=proc.wait, daemon=True).start()


def submit(root: Path, kind: str, folder: Path, argv: list[str]) -> Job:
    """Queue `style-dreambooth <argv>` for `folder`; it starts when the device is free."""
    if kind not in KINDS:
        raise ValueError(kind)
    current = read_job(folder, kind)
    if current and current.is_alive():
        raise UserError(f"a {kind} job for '{folder.name}' is already {current.state}; stop it first")
    folder.mkdir(parents=True, exist_ok=True)
    job = Job(kind=kind, folder=str(folder), argv=list(argv))
    job.save()
    with open(job.log, "ab") as log:
        log.write(f"\n$ style-dreambooth {' '.join(argv)}\n".encode())
    env = {**os.environ, "COLUMNS": "160"}  # the log file gets rich's lines unwrapped at 80 columns
    proc = subprocess.Popen(
        [sys.executable, "-m", WORKER_MODULE, str(job.path), str(root / LOCK_NAME)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        start_new_session=True,  # Ctrl-C in the UI's terminal does not reach the training
    )
    _reap(proc)
    return job


def stop(folder: Path, kind: str) -> str:
    """Ask a queued or running job to stop (a running `train` gets Ctrl-C: finished checkpoints stay)."""
    job = read_job(folder, kind)
    if not job or not job.is_alive():
        return f"no {kind} job is running for '{folder.name}'"
    if job.worker_pid is None:
        raise UserError(f"the {kind} job for '{folder.name}' is starting; try Stop again in a moment")
    if _runs(job.worker_pid, WORKER_MODULE):
        os.kill(job.worker_pid, signal.SIGTERM)
    else:  # the worker was killed but its command runs on: Ctrl-C it directly
        os.kill(job.child_pid, signal.SIGINT)
    return f"stopping the {kind} job for '{folder.name}'"


def wait_for(folder: Path, kind: str, timeout: float) -> Job | None:
    """Block until the job is no longer alive (tests, the notebook); returns its last state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = read_job(folder, kind)
        if job is None or not job.is_alive():
            return job
        time.sleep(0.5)
    raise TimeoutError(f"{kind} job for {folder} still running after {timeout:.0f} s")


def log_tail(job: Job, lines: int = 20) -> str:
    try:
        with open(job.log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
