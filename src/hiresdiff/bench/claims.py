"""Claims: several ``hiresdiff bench`` runs on one ``--out`` share the work, and each image is made once.

Before making an item a process creates ``<stem>.claim`` next to the item's files with ``O_CREAT | O_EXCL`` (of
processes racing for it exactly one succeeds), holding its :class:`Owner` as JSON (pid, host, start time, rank), and
removes it when the item is finished, fails or is interrupted. The report is written under ``OUT/report.claim``
the same way, so the last run to finish writes the report of everything.

A claim held by a live process is left to it. A claim is stale, and is taken over, when

- its process is gone: same host and ``os.kill(pid, 0)`` finds no such process (or it is this very process: a
  leftover of an earlier run in it);
- it is older than :data:`STALE_AFTER_S` (processes on other hosts cannot be seen; this also covers reused pids);
- it is still unreadable after :data:`UNREADABLE_AFTER_S` (its process died between creating and writing it).

Takeover is race-free: the stale file is renamed to a name unique to the taker (atomic, so of two takers only one
moves it), checked to be the very file judged stale (inode and bytes; a fresh claim moved by mistake is put back),
removed, and the item is claimed anew with ``O_EXCL``. A process killed outright leaves its claim behind; the next
run sees it is stale and takes it over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLAIM_SUFFIX = ".claim"
#: claims older than this (seconds) are stale whoever holds them
STALE_AFTER_S = 24 * 3600.0
#: a claim file still unreadable after this long (seconds) was left by a process killed while creating it
UNREADABLE_AFTER_S = 60.0


@dataclass(frozen=True)
class Owner:
    """Who holds a claim (or made an image): process id, host, start of the claim, rank in its launch."""

    pid: int
    host: str
    started: float = 0.0
    process_index: int = 0
    num_processes: int = 1

    @classmethod
    def this_process(cls, process_index: int = 0, num_processes: int = 1) -> Owner:
        return cls(os.getpid(), socket.gethostname(), time.time(), process_index, num_processes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Owner:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def known(self) -> bool:
        return self.pid > 0

    def made_by(self) -> dict[str, Any]:
        """The ``made_by`` entry of an image record."""
        rank = {"process_index": self.process_index, "num_processes": self.num_processes}
        return {"pid": self.pid, "host": self.host, **rank}

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}" if self.known else "a process still writing its claim"


#: holder of a claim file that cannot be read (yet)
UNKNOWN = Owner(0, "")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts)."""
    if pid <= 0 or os.name == "nt":  # os.kill(pid, 0) would signal a process group / interrupt on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def is_stale(holder: Owner, age_s: float, me: Owner) -> bool:
    """Whether a claim of ``holder``, ``age_s`` seconds old, may be taken over by ``me`` (see the module)."""
    if age_s > STALE_AFTER_S:
        return True
    if not holder.known:
        return age_s > UNREADABLE_AFTER_S
    if holder.host != me.host:
        return False
    return holder.pid == me.pid or not pid_alive(holder.pid)


@dataclass
class _Seen:
    """A claim file as read: its holder, bytes and stat."""

    holder: Owner
    data: bytes
    stat: os.stat_result

    def same_file(self, other: _Seen) -> bool:
        return (self.stat.st_dev, self.stat.st_ino, self.data) == (other.stat.st_dev, other.stat.st_ino, other.data)


def _read(path: Path) -> _Seen | None:
    """The claim in ``path``, ``None`` when there is none."""
    try:
        with open(path, "rb") as f:
            stat, data = os.fstat(f.fileno()), f.read()
    except FileNotFoundError:
        return None
    try:
        holder = Owner.from_dict(json.loads(data))
    except (ValueError, TypeError, AttributeError):
        holder = UNKNOWN
    return _Seen(holder, data, stat)


class Claim:
    """A claim this process holds; :meth:`release` removes it."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data = path, data

    def release(self) -> None:
        """Remove the claim file, unless it is no longer this claim's."""
        seen = _read(self.path)
        if seen is not None and seen.data == self.data:
            self.path.unlink(missing_ok=True)


@contextmanager
def _sigint_held_back() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back for the block and delivered after it (main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])


def _create(path: Path, me: Owner, held: list[Claim]) -> Claim | None:
    """Create the claim file exclusively and add it to ``held`` (no Ctrl-C in between); ``None`` when it exists."""
    data = json.dumps(dataclasses.asdict(dataclasses.replace(me, started=time.time()))).encode()
    with _sigint_held_back():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        made = Claim(path, data)
        held.append(made)
    return made


def _take_over(path: Path, stale: _Seen) -> None:
    """Remove the stale claim ``path`` if it is still the file ``stale`` describes (else leave what is there)."""
    aside = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.stale")
    with _sigint_held_back():
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            moved = _read(aside)
            if moved is not None and not moved.same_file(stale):
                _put_back(aside, path)  # a fresh claim made since we read the stale one
        finally:
            aside.unlink(missing_ok=True)


def _put_back(aside: Path, path: Path) -> None:
    """Return a claim moved to ``aside`` by mistake to ``path``, unless another claim was made there since."""
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system
        if not path.exists():
            os.rename(aside, path)


def claim(path: Path, me: Owner, held: list[Claim], attempts: int = 3) -> Claim | Owner:
    """Claim ``path`` for ``me``: the :class:`Claim`, also added to ``held`` the moment it exists (release what
    ``held`` holds in a ``finally``, and a Ctrl-C at any point leaves no claim), or the :class:`Owner` of the live
    claim in the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = UNKNOWN
    for _ in range(attempts):
        made = _create(path, me, held)
        if made is not None:
            return made
        seen = _read(path)
        if seen is None:
            continue  # released meanwhile
        holder = seen.holder
        if not is_stale(holder, time.time() - seen.stat.st_mtime, me):
            return holder
        _take_over(path, seen)
    return holder


def release(held: list[Claim]) -> None:
    """Release every claim in ``held``."""
    while held:
        held.pop().release()


@contextmanager
def holding(path: Path, me: Owner, timeout_s: float = 600.0, poll_s: float = 0.2) -> Iterator[None]:
    """Hold the claim ``path`` for the block, waiting while a live process holds it (at most ``timeout_s``, then
    the block runs anyway, with a warning)."""
    deadline, held = time.monotonic() + timeout_s, []
    try:
        while isinstance(got := claim(path, me, held), Owner) and time.monotonic() < deadline:
            time.sleep(poll_s)
        if isinstance(got, Owner):
            print(f"hiresdiff: warning: {got} still holds {str(path)!r}; going ahead", file=sys.stderr)
        yield
    finally:
        release(held)
