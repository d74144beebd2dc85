"""Results on disk as they are made, by one writer per output, never a torn line.

The output holds the results of the first requests in input order, one whole line each (HELM
reads it as it is, and a rerun resumes after them). A result that is ready before every result
ahead of it (continuous batching finishes short requests first) waits in `OUTPUT.pending`,
appended and synced the moment it is made, and moves to the output as soon as the results ahead
of it exist; the pending file goes once the output is complete. A kill therefore loses only the
requests in flight: a rerun takes the output's results and the pending ones, and computes the
rest.

- One writer: an exclusive lock on `OUTPUT.lock` (flock, so it dies with its process; the file
  goes when the run ends) holds any second run off with a one-line error naming its process.
- A failed write (a full disk, say) is cut back to the last whole line before the error is raised.
- SIGINT and SIGTERM wait for a write in progress to end (`stop_on_signals`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from h2o.serve.helm_io import InputError, Request, completed_count, whole_lines


def write_whole(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a kill) finds the old file or the new one,
    never half of one."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)


class Stopped(Exception):
    """A run stopped once results may exist, those on disk kept for a rerun to resume. `saved`: what
    the output holds then (`ResultsWriter.saved`), where this process writes it."""

    saved: str | None = None


class WriteError(Stopped, OSError):
    """A result could not be written; the message names the file and what is safe."""


class Interrupted(Stopped):
    """SIGINT or SIGTERM arrived; raised between writes, never inside one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_writing = 0
_deferred: int | None = None


def _on_signal(signum: int, frame: object) -> None:
    global _deferred
    if _writing:
        _deferred = signum
    else:
        raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise `Interrupted`, deferred to the end of any write."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _protected() -> Iterator[None]:
    global _writing, _deferred
    _writing += 1
    try:
        yield
    finally:
        _writing -= 1
        if not _writing and _deferred is not None:
            signum, _deferred = _deferred, None
            raise Interrupted(signum)


def _write_line(fd: int, path: Path, record: dict) -> None:
    """Append one line and sync it; on failure cut the file back to where it was."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with _protected():
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as error:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # a rerun cuts the torn line
            reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror
            raise WriteError(error.errno, f"writing {path}: {reason}") from None


def _lock(output: Path) -> int:
    path = Path(f"{output}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputError(f"{output}: another run (pid {holder}) is writing it; wait for it to end or use "
                         "another --output_path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _pending(path: Path, requests: list[Request], done: int) -> dict[int, dict]:
    """The pending file's results for requests after the first `done`; a torn last line is cut."""
    found = {}
    for number, text in enumerate(whole_lines(path), start=1):
        try:
            entry = json.loads(text)
            index, record = entry["index"], entry["record"]
            ok = isinstance(index, int) and 0 <= index < len(requests) and record["request"] == requests[index].raw
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise InputError(f"{path}:{number}: not a pending result of these requests; move the file away "
                             "to start over")
        if index >= done:
            found[index] = record
    return found


def unfinished(output: str | Path, requests: list[Request]) -> list[int]:
    """Indices of the requests that neither the output nor its pending file answers."""
    done = completed_count(output, requests)
    pending = _pending(Path(f"{output}.pending"), requests, done)
    return [i for i in range(done, len(requests)) if i not in pending]


class Discard:
    """A writer that keeps nothing, for a rank whose results rank 0 writes (tensor parallel)."""

    def __init__(self, requests: list[Request], todo: list[int]) -> None:
        self.requests, self._todo = requests, todo
        self.pending: dict[int, dict] = {}
        self.done = 0

    def todo(self) -> list[int]:
        return [i for i in self._todo if i not in self.pending]

    def add(self, index: int, record: dict) -> None:
        self.pending[index] = record

    def close(self) -> None:
        pass


class ResultsWriter:
    """The results of `requests` (all of this output's, in input order), as they come, in any order."""

    def __init__(self, output: str | Path, requests: list[Request]) -> None:
        self.output, self.requests = Path(output), requests
        # Folders made for this output go again if the run ends before writing anything in them.
        self._made = [p for p in self.output.parents if not p.exists()]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.journal = Path(f"{self.output}.pending")
        self._lock = _lock(self.output)
        try:
            self.done = completed_count(self.output, requests)
            self.pending = _pending(self.journal, requests, self.done)
            self._out: int | None = None
            self._journal: int | None = None
            self._drain()
        except BaseException:
            Path(f"{self.output}.lock").unlink(missing_ok=True)
            os.close(self._lock)
            self._remove_made()
            raise

    def todo(self) -> list[int]:
        """Indices of the requests that have no result yet."""
        return [i for i in range(self.done, len(self.requests)) if i not in self.pending]

    def add(self, index: int, record: dict) -> None:
        """Keep the result of request `index` (synced before this returns)."""
        if index == self.done:
            self._write_output(record)
            self._drain()
        else:
            if self._journal is None:
                self._journal = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            _write_line(self._journal, self.journal, {"index": index, "record": record})
            self.pending[index] = record

    def _write_output(self, record: dict) -> None:
        if self._out is None:  # created with the first result, not before
            self._out = os.open(self.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _write_line(self._out, self.output, record)
        self.done += 1

    def _drain(self) -> None:
        while self.done in self.pending:
            self._write_output(self.pending.pop(self.done))
        if self.done == len(self.requests) and self.journal.exists():
            self.journal.unlink()

    def saved(self) -> str:
        """How many results the output and its pending file hold, in words."""
        pending = f", {len(self.pending)} more in {self.journal}" if self.pending else ""
        return f"{self.done} of {len(self.requests)} results in {self.output}{pending}"

    def close(self) -> None:
        for fd in (self._out, self._journal):
            if fd is not None:
                os.close(fd)
        Path(f"{self.output}.lock").unlink(missing_ok=True)  # still ours: the lock goes with the file
        os.close(self._lock)
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # it holds something now (a result, another run's file): it stays
                break

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
