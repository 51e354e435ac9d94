"""Leases: a run holds each of its outputs exclusively, so two runs never write one output.

A lease is one small JSON object, ``<output>/.volseg/lease.json``, beside the done-marks. It is
created with a conditional write ("only if absent", tensorstore's ``if_equal`` on the storage
generation), so of two runs starting at once on one output exactly one gets it, on local disk and
in buckets alike. It names its holder (run id, host, pid, command, start time) and carries a
heartbeat that the holder renews every ``stale_seconds / 6`` seconds, again conditionally on the
generation it last wrote: if anyone else has written the lease since, the holder has lost it and
stops (:class:`LeaseLostError`).

A second run finding a live lease is refused with a message naming the holder
(:class:`OutputBusyError`). A lease whose heartbeat is older than ``stale_seconds`` belongs to a run
that died without releasing it (killed, lost node) and is taken over, again by a conditional write,
so of several runs taking over one stale lease one wins. A lease whose holder ran on this machine, in
this process namespace, and is no longer alive (``kill -9``, a crash) is taken over at once.
Heartbeats compare wall clocks of two machines: ``stale_seconds`` must exceed their clock skew by a
margin (the default, 120 s, does).

Block workers check the lease before writing a block (:meth:`LeaseToken.confirm`), so a run that
stalled past its lease and lost it does not write over the run that took its outputs over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil
import tensorstore as ts

from volseg.errors import OutputExistsError, VolsegError
from volseg.io.storage import CONTEXT, open_kvstore, wait
from volseg.io.urls import parse_url

LEASE_KEY = "lease.json"
#: Folder inside each output holding the lease and the done-marks.
STATE_DIRECTORY = ".volseg"
DEFAULT_STALE_SECONDS = 120.0


class OutputBusyError(OutputExistsError):
    """Another run holds the output (its lease is live)."""


class LeaseLostError(VolsegError):
    """This run's lease on an output was taken over by another run; it must stop writing."""


def state_kvstore(url: str) -> dict[str, Any]:
    """The tensorstore spec of the ``.volseg`` folder inside the output at ``url``."""
    return parse_url(url).child(STATE_DIRECTORY).kvstore()


@dataclass(frozen=True)
class LeaseToken:
    """What a block worker needs to check that its run still holds an output (pickles small)."""

    kvstore: dict[str, Any]
    run: str
    url: str

    def confirm(self) -> None:
        """Raise :class:`LeaseLostError` unless the lease still names this run."""
        store = ts.KvStore.open(self.kvstore, context=CONTEXT).result()
        current = store.read(LEASE_KEY).result()
        holder = _decode(current.value).get("run") if current.state == "value" else None
        if holder != self.run:
            raise LeaseLostError(f"This run no longer holds {self.url}: "
                                 + ("its lease was released." if holder is None else f"run {holder} took it over."),
                                 "run the command again once the other run has finished; it resumes.")


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


class Lease:
    """This run's lease on the output at ``url`` (see the module docstring)."""

    def __init__(self, url: str, run: str, stale_seconds: float, holder: dict[str, Any]) -> None:
        self.url = url
        self.run = run
        self.stale_seconds = stale_seconds
        self.holder = holder
        self.kvstore = state_kvstore(url)
        self._where = parse_url(url).child(STATE_DIRECTORY)
        self._store = open_kvstore(self._where)
        self._generation: bytes | None = None
        self._new_folders = _missing_folders(url)

    @property
    def token(self) -> LeaseToken:
        return LeaseToken(self.kvstore, self.run, self.url)

    def _record(self) -> bytes:
        return json.dumps({**self.holder, "run": self.run, "heartbeat": time.time(),
                           "stale_after_s": self.stale_seconds}).encode()

    def acquire(self) -> str | None:
        """Take the lease; returns a warning line when a stale lease of a dead run was taken over.

        Raises :class:`OutputBusyError` naming the holder when another run holds it."""
        current = wait(self._store.read(LEASE_KEY), self._where)
        warning = None
        if current.state == "value":
            other = _decode(current.value)
            age = time.time() - float(other.get("heartbeat", 0.0))
            if other.get("run") != self.run and age <= self.stale_seconds and not _dead_here(other):
                raise OutputBusyError(f"{self.url} is being written by another volseg run ({describe(other, age)}); "
                                      "two runs writing one output would mix their results.",
                                      "wait for that run to finish or stop it, then run again (it resumes); a run "
                                      f"whose heartbeat is older than {self.stale_seconds:g} s is taken over.")
            warning = (f"took over {self.url} from a run that stopped without releasing it ({describe(other, age)})")
        written = wait(self._store.write(LEASE_KEY, self._record(), if_equal=current.stamp.generation), self._where)
        if not written.generation:  # another run wrote the lease between our read and write
            return self.acquire()
        self._generation = written.generation
        return warning

    def renew(self) -> None:
        """Write a new heartbeat; raises :class:`LeaseLostError` if another run wrote the lease."""
        written = wait(self._store.write(LEASE_KEY, self._record(), if_equal=self._generation), self._where)
        if not written.generation:
            raise LeaseLostError(f"Another volseg run took over {self.url} while this run was writing it (this run's "
                                 "heartbeat was late); this run stopped.",
                                 "make sure only one run writes an output; rerun to resume.")
        self._generation = written.generation

    def release(self) -> None:
        """Delete the lease if this run still holds it (never another run's)."""
        if self._generation is not None:
            wait(self._store.write(LEASE_KEY, None, if_equal=self._generation), self._where)
            self._generation = None
        for folder in self._new_folders:  # local folders the lease created, if the run left them empty
            try:
                os.rmdir(folder)
            except OSError:
                break


def _missing_folders(url: str) -> list[str]:
    """The local folders (deepest first) that writing the lease of ``url`` creates."""
    parsed = parse_url(url)
    if parsed.scheme != "file":
        return []
    folder = os.path.join(parsed.path, STATE_DIRECTORY)
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def describe(record: dict[str, Any], age: float) -> str:
    """``run 3f2a…, pid 123 on host h, `volseg run x.yaml`, last heartbeat 4 s ago``."""
    parts = [f"run {str(record.get('run', '?'))[:8]}",
             f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"]
    if record.get("command"):
        parts.append(f"`{record['command']}`")
    parts.append(f"last heartbeat {max(age, 0.0):.0f} s ago")
    return ", ".join(parts)


class Leases:
    """Leases on several outputs with one heartbeat thread; :meth:`check` raises once one is lost."""

    def __init__(self, leases: Sequence[Lease], stale_seconds: float) -> None:
        self.leases = list(leases)
        self.interval = max(0.2, stale_seconds / 6)
        self.lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="volseg-lease", daemon=True)

    def tokens(self) -> dict[str, LeaseToken]:
        return {lease.url: lease.token for lease in self.leases}

    def check(self) -> None:
        if self.lost is not None:
            raise self.lost

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for lease in self.leases:
                try:
                    lease.renew()
                except LeaseLostError as error:
                    self.lost = error
                    return
                except Exception:  # storage hiccup: the next beat tries again, well within the stale bound
                    continue

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for lease in reversed(self.leases):  # the last taken first: it may sit in folders the first one made
            try:
                lease.release()
            except Exception:  # a lease left behind goes stale and is taken over; never hide the run's own error
                continue


def holder_record(command: str | None = None) -> dict[str, Any]:
    """Who a lease names: host, pid (with its process namespace and start time, so that this machine
    can tell a dead holder), command line and start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "domain": _process_domain(),
            "process_started": psutil.Process().create_time(), "started": time.time(),
            "command": command or " ".join(["volseg", *sys.argv[1:]])}


def _process_domain() -> str:
    """Names the set of processes whose pids this process can see: the kernel's boot id and the pid
    namespace (containers on one host share the first, not the second); the host name elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"host:{socket.gethostname()}"


def _dead_here(record: dict[str, Any]) -> bool:
    """Whether the lease's holder ran where this process can see its pid, and is gone."""
    if record.get("domain") != _process_domain():
        return False
    try:
        started = psutil.Process(int(record["pid"])).create_time()
    except psutil.NoSuchProcess:
        return True
    except (KeyError, TypeError, ValueError, psutil.Error):
        return False
    return abs(started - float(record.get("process_started", started))) > 1e-3  # the pid was reused


@contextmanager
def holding(urls: Sequence[str], stale_seconds: float = DEFAULT_STALE_SECONDS,
            warn: Any = None) -> Iterator[Leases]:
    """Hold a lease on every output of ``urls`` for the duration of the block.

    Leases are taken in a fixed order (sorted URLs), so two runs over overlapping sets of outputs
    cannot each hold a part; if one cannot be taken, those already taken are released and
    :class:`OutputBusyError` is raised. ``warn`` (default: print to stderr) receives a line for each
    stale lease taken over."""
    run = uuid.uuid4().hex
    record = holder_record()
    taken: list[Lease] = []
    try:
        for url in sorted(set(urls)):
            lease = Lease(url, run, stale_seconds, record)
            warning = lease.acquire()
            taken.append(lease)
            if warning:
                (warn or _stderr)(f"volseg: warning: {warning}")
    except BaseException:
        Leases(taken, stale_seconds).stop()
        raise
    leases = Leases(taken, stale_seconds)
    leases.start()
    try:
        yield leases
    finally:
        leases.stop()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
