"""Sharing the work of several `klaus index` runs on one database.

Each run plans its own work (the photos under its paths that are new, changed or failed),
then *claims* it a batch at a time in plan order, inside SQLite's write lock
(``BEGIN IMMEDIATE``): a photo another live run has claimed is left to that run, a photo
another run finished after this run planned is skipped, and a claim whose run has died
(SIGKILL, a crash) is taken over. So two runs over the same folders classify each photo
once between them, and the database ends exactly as one run would leave it — photo ids
included: an id is reserved for a new photo when it is claimed, in plan order, so it
does not depend on which run commits first.

Tables (schema version 2, :mod:`klaus.index.db`):

* ``runs`` — one row per run in progress: its owner id, the sequence number of its plan,
  and a heartbeat (Unix time of its last commit).
* ``claims`` — one row per claimed photo path: the id reserved for it (new photos), the
  owner, the model, ``claimed`` or ``done``, and a sequence number. ``done`` rows tell the
  runs that planned earlier that the photo is finished; they are deleted once no run
  that planned before them is left.

An owner id is ``host:pid:start`` (the process's start time in clock ticks since boot,
from ``/proc``), so a run on this machine is known dead as soon as its process is gone,
even if the pid is reused. A run on another machine (a database on a shared disk) is
taken for dead when its heartbeat is older than :data:`STALE_SECONDS`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .db import Database
from .pipeline import Result, Task

#: A run whose last commit is this old is taken for dead (if its liveness cannot be checked
#: directly, or it is alive but stopped): its claimed photos are taken over.
STALE_SECONDS = 600.0
#: How often a run that has nothing left to claim checks on the photos other runs hold.
POLL_SECONDS = 0.25
_SEQ_KEY = "claim_seq"


def owner_id(pid: int | None = None) -> str:
    """``host:pid:start`` for this process (or ``pid`` on this host)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or ''}"


def _start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) from ``/proc``; None if there is no such
    process; '' if this system has no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else ""
    except OSError:
        return ""
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state is field 3
    return fields[19] if len(fields) > 19 else ""


def alive(owner: str, heartbeat: float | None, now: float) -> bool:
    """Whether the run ``owner`` is still running (see the module docstring)."""
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if heartbeat is not None and now - heartbeat > STALE_SECONDS:
        return False
    if host != socket.gethostname() or not pid_text.isdigit():
        return heartbeat is not None  # another machine: trust a fresh heartbeat
    pid = int(pid_text)
    ticks = _start_ticks(pid)
    if ticks is None:
        return False
    if ticks and start:
        return ticks == start
    try:  # no /proc: ask the kernel whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class WorkQueue:
    """This run's planned tasks, handed out as claimed batches (see the module docstring)."""

    db: Database
    tasks: Sequence[Task]
    model_id: int
    batch: int
    owner: str = field(default_factory=owner_id)
    plan_seq: int = 0
    done_elsewhere: int = 0  # planned tasks another run finished after this run planned
    pending: list[Task] = field(default_factory=list)  # not yet looked at, in plan order
    waiting: list[Task] = field(default_factory=list)  # held by other live runs
    photo_ids: dict[str, int] = field(default_factory=dict)  # ids reserved for this run's new photos

    def register(self) -> None:
        """Join the runs on this database (in the caller's planning transaction): take a plan
        sequence number, and forget the runs that died and the done marks no run needs."""
        conn = self.db.conn
        now = time.time()
        for owner, heartbeat in conn.execute("SELECT owner, heartbeat FROM runs").fetchall():
            if not alive(owner, heartbeat, now):
                conn.execute("DELETE FROM runs WHERE owner = ?", (owner,))
        self.plan_seq = self._sequence() + 1
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_SEQ_KEY, str(self.plan_seq)))
        conn.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?)", (self.owner, self.plan_seq, now))
        # A run takes a done mark for "finished after I planned" if its sequence number is at least
        # the run's plan_seq: marks below every live run's are of no use to anyone.
        oldest = conn.execute("SELECT min(plan_seq) FROM runs").fetchone()[0]
        conn.execute("DELETE FROM claims WHERE state = 'done' AND seq < ?", (oldest,))
        self.pending = list(self.tasks)

    def _sequence(self) -> int:
        value = self.db.meta(_SEQ_KEY)
        return int(value) if value is not None and value.isdigit() else 0

    def claimed(self) -> Iterator[Task]:
        """Claim and yield this run's tasks, :attr:`batch` per transaction, in plan order, until
        none is left that another live run does not hold."""
        while self.pending:
            yield from self._claim_batch()

    def _claim_batch(self) -> list[Task]:
        out: list[Task] = []
        conn = self.db.conn
        with self.db.transaction():
            now = time.time()
            seq = self._sequence()
            next_id: int | None = None
            index = 0
            while index < len(self.pending) and len(out) < self.batch:
                task = self.pending[index]
                index += 1
                row = conn.execute(
                    "SELECT c.photo_id, c.owner, c.model_id, c.state, c.seq, r.heartbeat "
                    "FROM claims AS c LEFT JOIN runs AS r ON r.owner = c.owner WHERE c.path = ?",
                    (task.path,),
                ).fetchone()
                photo_id = None
                if row is not None:
                    photo_id, owner, model_id, state, done_seq, heartbeat = row
                    if state == "done" and done_seq >= self.plan_seq and model_id == self.model_id:
                        self.done_elsewhere += 1  # finished by another run after this one planned
                        continue
                    if state == "claimed" and owner != self.owner and alive(owner, heartbeat, now):
                        self.waiting.append(task)
                        continue
                existing = conn.execute("SELECT id FROM photos WHERE path = ?", (task.path,)).fetchone()
                if existing is not None:
                    photo_id = None
                elif photo_id is None:  # a new photo: its id, reserved in plan order
                    if next_id is None:
                        next_id = self._next_id()
                    photo_id, next_id = next_id, next_id + 1
                conn.execute(
                    "INSERT OR REPLACE INTO claims (path, photo_id, owner, model_id, state, seq) VALUES (?, ?, ?, ?, 'claimed', ?)",
                    (task.path, photo_id, self.owner, self.model_id, seq),
                )
                if photo_id is not None:
                    self.photo_ids[task.path] = photo_id
                out.append(task)
            del self.pending[:index]
            conn.execute("UPDATE runs SET heartbeat = ? WHERE owner = ?", (now, self.owner))
        return out

    def _next_id(self) -> int:
        conn = self.db.conn
        photos = conn.execute("SELECT coalesce(max(id), 0) FROM photos").fetchone()[0]
        claims = conn.execute("SELECT coalesce(max(photo_id), 0) FROM claims").fetchone()[0]
        return max(photos, claims) + 1

    def finish(self, results: Sequence[Result]) -> None:
        """Mark these results' claims done and beat the heart (in the caller's saving transaction)."""
        conn = self.db.conn
        seq = self._sequence()
        conn.executemany(
            "UPDATE claims SET state = 'done', seq = ?, owner = ?, model_id = ? WHERE path = ?",
            [(seq, self.owner, self.model_id, r.path) for r in results],
        )
        for r in results:
            self.photo_ids.pop(r.path, None)
        conn.execute("UPDATE runs SET heartbeat = ? WHERE owner = ?", (time.time(), self.owner))

    def wait_for_others(self) -> None:
        """Wait until a photo held by another run is finished or free to take over; returns at once
        if none is held. Finished ones count in :attr:`done_elsewhere`; free ones go back to
        :attr:`pending` in plan order."""
        while self.waiting and not self.pending:
            time.sleep(POLL_SECONDS)
            now = time.time()
            still = []
            for task in self.waiting:
                row = self.db.conn.execute(
                    "SELECT c.owner, c.model_id, c.state, c.seq, r.heartbeat "
                    "FROM claims AS c LEFT JOIN runs AS r ON r.owner = c.owner WHERE c.path = ?",
                    (task.path,),
                ).fetchone()
                if row is not None:
                    owner, model_id, state, done_seq, heartbeat = row
                    if state == "done" and done_seq >= self.plan_seq and model_id == self.model_id:
                        self.done_elsewhere += 1
                        continue
                    if state == "claimed" and owner != self.owner and alive(owner, heartbeat, now):
                        still.append(task)
                        continue
                self.pending.append(task)
            self.waiting = still

    def release(self) -> None:
        """Leave: drop this run's unfinished claims (their ids are free again), its runs row and the
        done marks no run left needs (all of them when this was the last run)."""
        conn = self.db.conn
        with self.db.transaction():
            conn.execute("DELETE FROM claims WHERE owner = ? AND state = 'claimed'", (self.owner,))
            conn.execute("DELETE FROM runs WHERE owner = ?", (self.owner,))
            oldest = conn.execute("SELECT min(plan_seq) FROM runs").fetchone()[0]
            if oldest is None:
                conn.execute("DELETE FROM claims WHERE state = 'done'")
            else:
                conn.execute("DELETE FROM claims WHERE state = 'done' AND seq < ?", (oldest,))
