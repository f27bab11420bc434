"""One queued device job: wait for the device lock, run `style-dreambooth ...`, record how it ended.

Usage (the UI starts it): python -m style_dreambooth.ui.worker JOB_FILE LOCK_FILE
SIGTERM asks it to stop: a queued job leaves the queue, a running command gets SIGINT (Ctrl-C), so
`train` keeps its finished checkpoints and can be resumed.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .jobs import Job, active_jobs

_POLL_S = 0.5


class _Worker:
    def __init__(self, job_path: Path, lock_path: Path) -> None:
        self.job = Job(**json.loads(job_path.read_text(encoding="utf-8")))
        self.lock_path = lock_path
        self.child: subprocess.Popen | None = None
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)

    def _on_stop(self, signum, frame) -> None:
        self.job.stop_requested = True
        if self.child and self.child.poll() is None:
            self.child.send_signal(signal.SIGINT)

    def _my_turn(self) -> bool:
        """First in line among the workspace's live queued jobs (ties broken by the job file's path)."""
        root = self.lock_path.parent
        waiting = [j for j in active_jobs(root) if j.state == "queued"]
        mine = (self.job.queued_at, str(self.job.path))
        return not any((j.queued_at, str(j.path)) < mine for j in waiting)

    def _acquire(self, lock) -> bool:
        while not self.job.stop_requested:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(_POLL_S)
                continue
            if self._my_turn():
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            time.sleep(_POLL_S)
        return False

    def run(self) -> int:
        job = self.job
        job.worker_pid = os.getpid()
        job.save()
        with open(self.lock_path, "a+") as lock:
            if not self._acquire(lock):
                return self._end("stopped", None)
            job.state, job.started_at = "running", time.time()
            job.save()
            with open(job.log, "ab") as log:
                self.child = subprocess.Popen(
                    [sys.executable, "-m", "style_dreambooth", *job.argv],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=job.folder,
                )
                job.child_pid = self.child.pid
                job.save()
                if job.stop_requested:  # a stop that came while launching
                    self.child.send_signal(signal.SIGINT)
                code = self.child.wait()
        state = "finished" if code == 0 else "stopped" if job.stop_requested or code == 130 else "failed"
        return self._end(state, code)

    def _end(self, state: str, code: int | None) -> int:
        self.job.state, self.job.returncode, self.job.ended_at = state, code, time.time()
        self.job.save()
        return 0


def main() -> None:
    job_path, lock_path = Path(sys.argv[1]), Path(sys.argv[2])
    sys.exit(_Worker(job_path, lock_path).run())


if __name__ == "__main__":
    main()
