"""Done-marks: which blocks of a run are durably written, so a rerun resumes instead of recomputing.

A :class:`BlockLedger` lives beside a run's primary output, in the same storage (local disk, a
bucket): one small object per finished block at ``<output>/.volseg/<signature>/<stage>/<block id>``.
A mark is written only after every write of its block has completed, so a mark always means "this
block's data is there". It holds the block's *outcome* (a small JSON value a stage returns, e.g. the
merge pairs of an instance block), so a resumed run has every block's outcome without recomputing it.
Marks of a different run signature are never read; ``--overwrite`` clears them. The same folder
holds the run's lease (:mod:`volseg.engine.lease`); a ledger given the lease's ``token`` lets a
worker confirm, before it writes a block, that its run still holds the output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import tensorstore as ts

from volseg.engine.lease import LEASE_KEY, LeaseToken, state_kvstore
from volseg.errors import OutputExistsError
from volseg.geometry import Block
from volseg.io.storage import CONTEXT

#: Key of the output attributes holding the run signature (and what wrote the output).
SIGNATURE_KEY = "volseg"


class BlockLedger:
    """Done-marks of the run with ``signature``, in the key-value store ``kvstore`` (a tensorstore spec)."""

    def __init__(self, kvstore: dict[str, Any], signature: str, leases: tuple[LeaseToken, ...] = ()) -> None:
        self.kvstore = dict(kvstore)
        self.signature = signature
        self.leases = tuple(leases)
        self._store: ts.KvStore | None = None

    @classmethod
    def beside(cls, url: str, signature: str, leases: tuple[LeaseToken, ...] = ()) -> BlockLedger:
        """The ledger kept inside the output volume at ``url``; ``leases``: the run's leases on its outputs."""
        return cls(state_kvstore(url), signature, leases)

    def __getstate__(self) -> dict[str, Any]:
        return {"kvstore": self.kvstore, "signature": self.signature, "leases": self.leases}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["kvstore"], state["signature"], state["leases"])

    def confirm_leases(self) -> None:
        """Raise :class:`~volseg.engine.lease.LeaseLostError` if the run lost an output to another
        run (call before writing a block)."""
        for lease in self.leases:
            lease.confirm()

    @property
    def store(self) -> ts.KvStore:
        if self._store is None:
            self._store = ts.KvStore.open(self.kvstore, context=CONTEXT).result()
        return self._store

    def _prefix(self, stage: str) -> str:
        return f"{self.signature[:32]}/{stage}/"

    def mark(self, stage: str, block_id: int, outcome: Any = None) -> None:
        """Record that ``block_id`` of ``stage`` is durably written (call only after its writes finished)."""
        self.store.write(self._prefix(stage) + str(block_id), json.dumps(outcome).encode()).result()

    def done(self, stage: str) -> dict[int, Any]:
        """Block id → outcome of every block of ``stage`` marked done under this signature."""
        prefix = self._prefix(stage)
        keys = self.store.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()
        names = [key.decode() for key in keys]
        reads = [self.store.read(name) for name in names]
        done = {}
        for name, pending in zip(names, reads, strict=True):
            value = pending.result().value
            done[int(name[len(prefix):])] = json.loads(value) if value else None
        return done

    def unfinished(self, stage: str, blocks: Iterable[Block]) -> tuple[list[Block], dict[int, Any]]:
        """The blocks of ``stage`` still to run, and the outcomes of those already marked done."""
        done = self.done(stage)
        return [block for block in blocks if block.id not in done], done

    def clear(self) -> None:
        """Forget every mark, of this and of any other signature (a fresh start under --overwrite); the
        lease stays."""
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
