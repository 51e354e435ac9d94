"""Done-marks: which blocks of a run are durably written, so a rerun resumes instead of recomputing.

A :class:`BlockLedger` lives beside a run's primary output, in the same storage (local disk, a
bucket), under ``<output>/.volseg/<signature>/<stage>/``. Marks are grouped: one object per
**super-block** of :data:`SUPER_BLOCK` consecutive block ids, ``groups/<k>`` for ids
``k·SUPER_BLOCK … (k+1)·SUPER_BLOCK − 1``, holding a bitmap of the blocks done and their *outcomes*
(small JSON values a stage returns, e.g. the merge pairs of an instance block), so a resumed run reads
O(super-blocks) objects and has every block's outcome without recomputing it::

    .volseg/<signature>/segment/groups/0      blocks 0..1023:    done bitmap + outcomes
    .volseg/<signature>/segment/groups/1      blocks 1024..2047
    .volseg/<signature>/segment/17            a per-block mark of an older volseg (read, then folded in)

Why this is safe under crashes:

- **A mark follows the data.** Only the driver writes marks, and only for a block whose writes an
  executor reported complete (a Ray actor answers after its writes are durable; the serial executor
  waits for them). So a mark always means "this block's data is there", whoever crashes when.
- **No writer loses another's marks.** Writing a super-block's object is a compare-and-swap that merges
  the new marks into what the object holds (:func:`~volseg.io.storage.update_json`: read, add, write
  only if unchanged since the read, else again). Each write replaces the object atomically (a rename on
  disk, one PUT in a bucket) with a superset of it, so a crash mid-write leaves the previous version,
  and even two drivers (one that lost its lease and has not noticed yet) keep each other's marks. Marks
  of one signature are interchangeable: that signature writes the same bytes whoever runs the block.
- **Bounded loss.** A thread of the driver writes the marks of finished blocks every
  :data:`FLUSH_SECONDS`, and the driver writes the rest when a pass ends (also on Ctrl-C or an error).
  A driver killed outright (``kill -9``, a lost node) loses the marks of at most its last
  :data:`FLUSH_SECONDS` of blocks: their data is written, and a resume computes them again, writing the
  same bytes. A killed actor loses only its blocks in flight, which are retried.

Marks of a different run signature are never read; ``--overwrite`` clears them. The same folder holds
the run's lease; a ledger given the lease's ``token`` lets a worker confirm, before it writes a block,
that its run still holds the output.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorstore as ts

from volseg.engine.lease import LEASE_KEY, STATE_DIRECTORY, LeaseToken
from volseg.errors import OutputExistsError
from volseg.io.storage import CONTEXT, env_seconds, read_keys, update_json
from volseg.io.urls import VolumeURL, parse_url

#: Key of the output attributes holding the run signature (and what wrote the output).
SIGNATURE_KEY = "volseg"
#: Blocks per done-mark object (consecutive block ids).
SUPER_BLOCK = 1024
#: Seconds between writes of the marks while a pass runs: what a driver killed outright may lose
#: (``$VOLSEG_MARK_SECONDS`` overrides it, e.g. longer for a bucket that bills each write).
FLUSH_SECONDS = 1.0
MARK_SECONDS_ENV = "VOLSEG_MARK_SECONDS"
#: Done-mark objects read at once when a run resumes.
READ_BATCH = 512


@dataclass
class DoneMarks:
    """The blocks of one stage marked done: super-blocks done whole, a bitmap (bool, one per block of the
    super-block) for the others, and the outcomes that are not ``None``.

    Memory is one entry per super-block, not per block; iterating yields the done ids in order."""

    complete: set[int] = field(default_factory=set)
    partial: dict[int, np.ndarray] = field(default_factory=dict)
    outcomes: dict[int, Any] = field(default_factory=dict)

    def add(self, group: int, bits: np.ndarray, outcomes: dict[int, Any]) -> None:
        """Fold in one super-block's bitmap and outcomes (marks only ever accumulate)."""
        if group in self.complete:
            return
        if group in self.partial:
            bits = bits | self.partial[group]
        if bits.all():
            self.complete.add(group)
            self.partial.pop(group, None)
        else:
            self.partial[group] = bits
        self.outcomes.update(outcomes)

    def __contains__(self, block_id: int) -> bool:
        group, offset = divmod(block_id, SUPER_BLOCK)
        return group in self.complete or (group in self.partial and bool(self.partial[group][offset]))

    def __len__(self) -> int:
        return len(self.complete) * SUPER_BLOCK + sum(int(bits.sum()) for bits in self.partial.values())

    def __iter__(self) -> Iterator[int]:
        for group in sorted(self.complete | self.partial.keys()):
            offsets = range(SUPER_BLOCK) if group in self.complete else np.flatnonzero(self.partial[group]).tolist()
            yield from (group * SUPER_BLOCK + offset for offset in offsets)

    def pending(self, num_blocks: int) -> Iterator[int]:
        """The ids below ``num_blocks`` not marked done, in order, computed as they are asked for."""
        for group in range(-(-num_blocks // SUPER_BLOCK)):
            if group in self.complete:
                continue
            first, stop = group * SUPER_BLOCK, min((group + 1) * SUPER_BLOCK, num_blocks)
            bits = self.partial.get(group)
            if bits is None:
                yield from range(first, stop)
            else:
                yield from (first + np.flatnonzero(~bits[: stop - first])).tolist()


def encode_group(bits: np.ndarray, outcomes: dict[int, Any]) -> dict[str, Any]:
    """A super-block's mark object: its bitmap (packed, base64) and its outcomes that are not ``None``."""
    packed = base64.b64encode(np.packbits(bits).tobytes()).decode()
    return {"blocks": SUPER_BLOCK, "done": packed,
            "outcomes": {str(block_id): value for block_id, value in sorted(outcomes.items())}}


def decode_group(document: dict[str, Any]) -> tuple[np.ndarray, dict[int, Any]]:
    """The bitmap and outcomes of a mark object written by :func:`encode_group`."""
    packed = np.frombuffer(base64.b64decode(document["done"]), np.uint8)
    bits = np.unpackbits(packed, count=int(document["blocks"])).astype(bool)
    return bits, {int(block_id): value for block_id, value in document.get("outcomes", {}).items()}


def merged_group(current: dict[str, Any] | None, marks: dict[int, Any]) -> dict[str, Any]:
    """``current`` (a mark object, or ``None``) with the blocks of ``marks`` (id → outcome) added."""
    bits, outcomes = decode_group(current) if current is not None else (np.zeros(SUPER_BLOCK, bool), {})
    for block_id, outcome in marks.items():
        bits[block_id % SUPER_BLOCK] = True
        if outcome is not None:
            outcomes[block_id] = outcome
    return encode_group(bits, outcomes)


class BlockLedger:
    """Done-marks of the run with ``signature`` in the state folder ``where`` (see the module docstring).

    The driver calls :meth:`mark` as blocks finish and :meth:`flush` when a pass ends; workers only
    call :meth:`confirm_leases`. A ledger pickles without its unwritten marks."""

    def __init__(self, where: VolumeURL, signature: str, leases: tuple[LeaseToken, ...] = ()) -> None:
        self.where = where
        self.signature = signature
        self.leases = tuple(leases)
        self._store: ts.KvStore | None = None
        self._unwritten: dict[tuple[str, int], dict[int, Any]] = {}  # (stage, super-block) → id → outcome
        self._lock = threading.Lock()  # guards _unwritten
        self._writes = threading.Lock()  # one writer of marks at a time
        self._writer: tuple[threading.Thread, threading.Event] | None = None  # the thread and its stop
        self._error: BaseException | None = None
        self.flush_seconds = env_seconds(MARK_SECONDS_ENV, FLUSH_SECONDS, 10)

    @classmethod
    def beside(cls, url: str, signature: str, leases: tuple[LeaseToken, ...] = ()) -> BlockLedger:
        """The ledger kept inside the output volume at ``url``; ``leases``: the run's leases on its outputs."""
        return cls(parse_url(url).child(STATE_DIRECTORY), signature, leases)

    def __getstate__(self) -> dict[str, Any]:
        return {"where": self.where, "signature": self.signature, "leases": self.leases}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["where"], state["signature"], state["leases"])

    def confirm_leases(self) -> None:
        """Raise :class:`~volseg.engine.lease.LeaseLostError` if the run lost an output to another
        run (call before writing a block)."""
        for lease in self.leases:
            lease.confirm()

    @property
    def store(self) -> ts.KvStore:
        if self._store is None:
            self._store = ts.KvStore.open(self.where.kvstore(), context=CONTEXT).result()
        return self._store

    def _prefix(self, stage: str) -> str:
        return f"{self.signature[:32]}/{stage}/"

    def run_folder(self, name: str) -> VolumeURL:
        """A folder for data of this run kept beside its marks (the prompts a pass found), cleared with them."""
        return self.where.child(self.signature[:32]).child(name)

    def group_key(self, stage: str, group: int) -> str:
        """The key of super-block ``group``'s mark object of ``stage``."""
        return f"{self._prefix(stage)}groups/{group}"

    # -- writing (the driver) ---------------------------------------------------------------------------
    def mark(self, stage: str, block_id: int, outcome: Any = None) -> None:
        """Record that ``block_id`` of ``stage`` is durably written (call only after its writes finished);
        a background thread writes the marks within ``flush_seconds``, :meth:`flush` at once."""
        self._raise_writer_error()
        with self._lock:
            self._unwritten.setdefault((stage, block_id // SUPER_BLOCK), {})[block_id] = outcome
            if self._writer is None:
                stop = threading.Event()
                thread = threading.Thread(target=self._write_periodically, args=(stop,), name="volseg-marks")
                self._writer = (thread, stop)
                thread.start()

    def flush(self) -> None:
        """Write every recorded mark now and stop the background writer (a pass ends); raises what the
        writer met (a storage error) if it failed."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer[1].set()
            writer[0].join()
        self._raise_writer_error()
        self._write_marks()

    def _write_periodically(self, stop: threading.Event) -> None:
        """Write the marks every ``flush_seconds`` until stopped, or until a round finds nothing new (then
        the next mark starts a writer again): a ledger nobody flushes still writes its marks, and the
        thread never outlives them (it is not a daemon, so the interpreter waits for it at exit)."""
        while not stop.wait(self.flush_seconds):
            try:
                self._write_marks()
            except BaseException as error:  # handed to the driver at its next mark or flush
                self._error = error
            with self._lock:
                if self._error is not None or not self._unwritten:
                    if self._writer is not None and self._writer[0] is threading.current_thread():
                        self._writer = None
                    return

    def _raise_writer_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_marks(self) -> None:
        """Merge the recorded marks into their super-blocks' objects (compare-and-swap, so no mark is
        ever lost to another writer); marks not written stay recorded."""
        with self._writes:
            with self._lock:
                batch, self._unwritten = self._unwritten, {}
            try:
                while batch:
                    (stage, group), marks = next(iter(batch.items()))
                    update_json(self.where, self.group_key(stage, group),
                                lambda current, m=marks: merged_group(current, m))
                    del batch[(stage, group)]
            finally:
                with self._lock:
                    for key, marks in batch.items():
                        self._unwritten.setdefault(key, {}).update(marks)

    # -- reading (a resume) -----------------------------------------------------------------------------
    def done(self, stage: str, outcomes: bool = True) -> DoneMarks:
        """Every block of ``stage`` marked done under this signature, with the outcomes kept in the marks
        (none with ``outcomes=False``: a stage whose outcomes are read per super-block where needed);
        reads one object per super-block (and folds in per-block marks of older volseg versions first)."""
        self._fold_in_per_block_marks(stage)
        prefix = f"{self._prefix(stage)}groups/"
        marks = DoneMarks()
        for key, document in self._read_all(prefix, prefix[:-1] + "0"):
            if key[len(prefix):].isdigit():  # nothing else lives there; a stray file is not a mark
                bits, found = decode_group(json.loads(document))
                marks.add(int(key[len(prefix):]), bits, found if outcomes else {})
        return marks

    def outcomes(self, stage: str, first: int, stop: int) -> dict[int, Any]:
        """The outcomes of blocks ``first … stop - 1`` of ``stage``, from their super-blocks' mark objects
        (written by a finished pass). Raises ``RuntimeError`` naming a block that has no mark."""
        groups = range(first // SUPER_BLOCK, -(-stop // SUPER_BLOCK))
        keys = [self.group_key(stage, group) for group in groups]
        found = read_keys(self.where, keys)
        outcomes: dict[int, Any] = {}
        for key in keys:
            if found[key] is not None:
                _, values = decode_group(json.loads(found[key]))
                outcomes.update((block, value) for block, value in values.items() if first <= block < stop)
        missing = next((b for b in range(first, stop) if b not in outcomes), None)
        if missing is not None:
            raise RuntimeError(f"block {missing} of pass {stage!r} has no outcome in its done-mark under "
                               f"{self.where.url}; rerun the run to compute it again")
        return outcomes

    def _read_all(self, start: str, stop: str) -> Iterator[tuple[str, bytes]]:
        """``(key, value)`` of every key in ``[start, stop)``, read :data:`READ_BATCH` at a time."""
        keys = [key.decode() for key in self.store.list(ts.KvStore.KeyRange(start, stop)).result()]
        for begin in range(0, len(keys), READ_BATCH):
            batch = keys[begin : begin + READ_BATCH]
            for key, pending in zip(batch, [self.store.read(key) for key in batch], strict=True):
                value = pending.result()
                if value.state == "value":
                    yield key, value.value

    def _fold_in_per_block_marks(self, stage: str) -> None:
        """Older volseg versions wrote one object per block, ``<stage>/<block id>``: write them into the
        super-block objects, then delete them (a crash in between leaves both; marks only accumulate)."""
        prefix = self._prefix(stage)
        found = list(self._read_all(prefix + "0", prefix + ":"))  # keys that start with a digit
        if not found:
            return
        for key, value in found:
            block_id = int(key[len(prefix):])
            self.mark(stage, block_id, json.loads(value or b"null"))
        self.flush()
        self.store.delete_range(ts.KvStore.KeyRange(prefix + "0", prefix + ":")).result()

    def forget(self) -> None:
        """Delete this signature's marks and run folders (a run that kept them only while it ran)."""
        with self._lock:
            self._unwritten.clear()
        prefix = f"{self.signature[:32]}/"
        self.store.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()

    def clear(self) -> None:
        """Forget every mark, of this and of any other signature (a fresh start under --overwrite); the
        lease stays."""
        with self._lock:
            self._unwritten.clear()
        self.store.delete_range(ts.KvStore.KeyRange("", LEASE_KEY)).result()
        self.store.delete_range(ts.KvStore.KeyRange(LEASE_KEY + "\0", "")).result()
def check_signature(existing: Any, url: str, field: str, signature: str, overwrite: bool) -> None:
    """Refuse an existing output unless this run wrote it; with ``overwrite``, one another volseg
    run wrote may be replaced, but never data volseg did not write."""
    stamp = existing.attributes.get(SIGNATURE_KEY)
    found = stamp.get("signature") if isinstance(stamp, dict) else None
    if found is None:
        raise OutputExistsError(
            f"{field} {url!r} holds data that volseg did not write; volseg never writes into it, with or "
            "without --overwrite.", f"choose another path for {field}.")
    if found == signature or overwrite:
        return
    raise OutputExistsError(
        f"{field} {url!r} holds the output of another volseg run ({_run_description(stamp)}); writing into it "
        "would mix two results.", f"choose another path for {field}, or pass --overwrite to replace that output.")


def _run_description(stamp: dict[str, Any]) -> str:
    parts = [f"signature {str(stamp.get('signature'))[:12]}"]
    if stamp.get("checkpoint"):
        parts.append(f"model {stamp['checkpoint']}")
    if stamp.get("input"):
        parts.append(f"input {stamp['input']}")
    return ", ".join(parts)
