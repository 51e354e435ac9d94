"""Key-value storage under volume URLs: one shared tensorstore context, JSON documents, atomic updates,
and waits on storage that end.

All tensorstore opens in volseg go through :data:`CONTEXT` (metadata through its child
:data:`PROBE_CONTEXT`, which shares its resources). Sharing it matters for ``memory://`` URLs:
tensorstore's memory store lives in a context, so two opens with separate contexts would see two
different, empty stores. (The cache pool of the context holds 0 bytes, so nothing is cached across
opens and a reader always sees what another process wrote.)

Every open or probe of storage waits at most :func:`storage_timeout_s` (``VOLSEG_STORAGE_TIMEOUT_S``,
default 30 s) and then raises :class:`~volseg.errors.StorageUnreachableError`. Without that bound a
bucket that cannot be reached hangs for good: tensorstore retries a failed request (no route, no name
resolution) with backoff for about a quarter of an hour. Metadata goes through :data:`PROBE_CONTEXT`,
whose requests give up by themselves within the bound, so the error can name the cause (``Could not
resolve host: storage.googleapis.com``). Any other storage failure becomes one line through
:func:`storage_error`, without tensorstore's ``[source locations=...]`` and ``[tensorstore_spec=...]``.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import tensorstore as ts

from volseg.errors import (
    ConfigError,
    StorageUnreachableError,
    UnsupportedURLError,
    VolsegError,
    VolumeFormatError,
    VolumeNotFoundError,
)
from volseg.io.urls import VolumeURL

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

CONTEXT = ts.Context()
"""The tensorstore context of this process (memory stores, concurrency limits)."""

_PROBE_RETRIES = {"max_retries": 5, "initial_delay": "1s", "max_delay": "8s"}
PROBE_CONTEXT = ts.Context(
    {f"{driver}_request_retries": _PROBE_RETRIES for driver in ("gcs", "s3", "http")}, parent=CONTEXT
)
"""A child of :data:`CONTEXT` (the same memory stores) for metadata: a failed gs://, s3:// or http(s)://
request is retried 5 times (about 23 s of backoff, under the default timeout) instead of tensorstore's
32 (about 15 minutes). Arrays are opened with :data:`CONTEXT`, whose chunk I/O keeps the long retries."""

STORAGE_TIMEOUT_ENV = "VOLSEG_STORAGE_TIMEOUT_S"
DEFAULT_STORAGE_TIMEOUT_S = 30.0
MESSAGE_CHARS = 300
"""The longest message :func:`storage_error` and :func:`unreachable` aim for (one terminal line or two)."""

REMOTE_SCHEMES = frozenset({"gs", "s3", "http", "https"})
_ACCESS_FAILURES = frozenset(
    {"UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}
)
"""tensorstore status codes that, from a remote store, mean "not reachable or not allowed", not "no volume"."""

_REACH_FIX = {
    "gs": "supply Google Cloud credentials (GOOGLE_APPLICATION_CREDENTIALS=key.json, or gcloud auth "
    "application-default login) and check the network reaches storage.googleapis.com",
    "s3": "supply AWS credentials (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and check the "
    "network reaches the bucket at s3.amazonaws.com",
    "http": "check the host is up and reachable from this machine (e.g. curl the URL)",
    "https": "check the host is up and reachable from this machine (e.g. curl the URL)",
}
_PAYLOAD = re.compile(r"\s*\[[A-Za-z_ ]+='(?:[^'\\]|\\.)*'\]", re.DOTALL)
_STATUS = re.compile(r"^([A-Z][A-Z_]+): ")
_CAS_ATTEMPTS = 64


class _Pending(Protocol[T_co]):
    """A tensorstore or concurrent.futures future."""

    def result(self, timeout: float | None = None) -> T_co: ...

    def cancel(self) -> bool: ...


# --- bounded waits ---------------------------------------------------------------------------------


def storage_timeout_s() -> float:
    """How long one storage operation may take: ``$VOLSEG_STORAGE_TIMEOUT_S`` seconds, default 30.

    Raises :class:`~volseg.errors.ConfigError` for a value that is not a positive number.
    """
    return env_seconds(STORAGE_TIMEOUT_ENV, DEFAULT_STORAGE_TIMEOUT_S, 60)


def env_seconds(name: str, default: float, example: float) -> float:
    """The environment variable ``name`` as a positive number of seconds, ``default`` when unset.

    Raises :class:`~volseg.errors.ConfigError` for a value that is not a positive number (``example``
    is the value the fix suggests)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{name}={raw!r} is not a positive number of seconds.",
                          f"unset it (default {default:g} s) or set e.g. {name}={example:g}.")
    return seconds


def storage_deadline() -> float:
    """The :func:`time.monotonic` time by which an operation starting now must have finished."""
    return time.monotonic() + storage_timeout_s()


def wait(future: _Pending[T], url: VolumeURL, deadline: float | None = None) -> T:
    """``future.result()``, waiting until ``deadline`` (default: :func:`storage_deadline` from now).

    When time runs out the future is cancelled and :class:`~volseg.errors.StorageUnreachableError`
    names ``url``. The future's own errors (tensorstore: ``ValueError``) propagate unchanged.
    """
    end = storage_deadline() if deadline is None else deadline
    with native_logs_dropped(url):
        try:
            return future.result(timeout=max(end - time.monotonic(), 0.0))
        except TimeoutError:
            future.cancel()
            if _dropping(url):  # the abandoned native call may still log, e.g. when its credential lookup gives up
                _drop_native_logs_from_now_on()
            raise unreachable(url) from None


#: Set by the command line: while it waits on remote storage, the log lines that tensorstore's native
#: code (and the AWS SDK inside it) writes to stderr are dropped, e.g. ``E1129 16:53:08.068 3037
#: google_auth_provider.cc:188] Could not find the credentials file``: the one-line volseg error says
#: what failed and how to fix it. ``VOLSEG_NATIVE_LOGS=1`` keeps them.
drop_native_logs = False
NATIVE_LOGS_ENV = "VOLSEG_NATIVE_LOGS"
_NATIVE_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [^\]\s]+\] ")
_redirect_lock = threading.Lock()
_redirect_depth = 0
_redirect: tuple[int, Any] | None = None
_filter: threading.Thread | None = None


def _dropping(url: VolumeURL) -> bool:
    return drop_native_logs and url.scheme in REMOTE_SCHEMES and not os.environ.get(NATIVE_LOGS_ENV)


@contextmanager
def native_logs_dropped(url: VolumeURL) -> Iterator[None]:
    """Send file descriptor 2 to a temporary file while waiting on remote storage; afterwards write
    back every line that is not a native log line (see :data:`drop_native_logs`)."""
    if not _dropping(url):
        yield
        return
    _enter_redirect()
    try:
        yield
    finally:
        _leave_redirect()


def _enter_redirect() -> None:
    global _redirect, _redirect_depth
    with _redirect_lock:
        if _redirect_depth == 0:
            sys.stderr.flush()
            sink = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _leave_redirect
            _redirect = (os.dup(2), sink)
            os.dup2(sink.fileno(), 2)
        _redirect_depth += 1


def _leave_redirect() -> None:
    global _redirect, _redirect_depth
    with _redirect_lock:
        _redirect_depth -= 1
        if _redirect_depth or _redirect is None:
            return
        saved, sink = _redirect
        _redirect = None
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sink.seek(0)
        kept = [line for line in sink.read().decode(errors="replace").splitlines(keepends=True)
                if not _NATIVE_LOG_LINE.match(line)]
        sink.close()
    if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def _drop_native_logs_from_now_on() -> None:
    """After a wait on remote storage was abandoned, its native call can still log at any later time
    (the AWS SDK's metadata-service lookup gives up seconds on). From then on file descriptor 2 is a
    pipe whose reader thread forwards every line but native log lines to the real stderr; at exit,
    descriptor 2 goes to the null device and the reader is given a moment to forward what is left."""
    global _filter
    with _redirect_lock:
        if _filter is not None:
            return
        read_end, write_end = os.pipe()
        # while a redirect is active, descriptor 2 is its sink and the real stderr is its saved copy
        target = _redirect[0] if _redirect is not None else 2
        terminal = os.dup(target)
        sys.stderr.flush()
        os.dup2(write_end, target)  # a redirect that ends now restores descriptor 2 onto the pipe
        os.close(write_end)
        _filter = threading.Thread(target=_forward_lines, args=(read_end, terminal), name="volseg-stderr",
                                   daemon=True)
        _filter.start()
    atexit.register(_stop_filter)


def _forward_lines(read_end: int, terminal: int) -> None:
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            if not _NATIVE_LOG_LINE.match(line.decode(errors="replace")):
                os.write(terminal, line)
    os.close(terminal)


def _stop_filter() -> None:
    if _filter is None:
        return
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # closes the pipe's last write end in this process: the reader sees its end
    os.close(null)
    _filter.join(timeout=2.0)


def run_bounded(function: Callable[[], T], url: VolumeURL) -> T:
    """``function()`` (a blocking call into storage, e.g. a cloud-volume open) within the storage timeout.

    It runs on a daemon thread, so one that never returns cannot keep the process alive; after the
    timeout it is abandoned and :class:`~volseg.errors.StorageUnreachableError` is raised. Its own
    exceptions propagate.
    """
    outcome: Future[T] = Future()

    def target() -> None:
        try:
            outcome.set_result(function())
        except BaseException as error:  # handed to the waiting caller
            outcome.set_exception(error)

    threading.Thread(target=target, name="volseg-storage-open", daemon=True).start()
    return wait(outcome, url)


# --- one-line errors -------------------------------------------------------------------------------


def short_error(error: BaseException | str, limit: int = 160) -> str:
    """``error``'s message as one line of at most ``limit`` characters, for a volseg message.

    tensorstore's machine-readable parts (``[source locations='...']``, ``[tensorstore_spec='...']``,
    ``[os_error_code='20']``...) and an HTTP response body are dropped, and so is the status code
    (``FAILED_PRECONDITION: ``). tensorstore chains causes as ``context: context: cause``; when the text
    is too long, leading contexts are dropped first (marked ``…``), since the cause comes last.
    """
    text = _PAYLOAD.sub("", str(error))
    for marker in ("[source locations=", "[tensorstore_spec=", " with body:"):
        text = text.split(marker, 1)[0]
    text = _STATUS.sub("", " ".join(text.split())).rstrip(" .")
    if len(text) <= limit:
        return text
    while len(text) > limit - 1 and ": " in text:
        text = text.split(": ", 1)[1]
    return "…" + text[-(limit - 1):]


def status_code(error: BaseException | str) -> str | None:
    """The status code a tensorstore error message starts with (``NOT_FOUND``...), if any."""
    match = _STATUS.match(str(error).lstrip())
    return match.group(1) if match else None


def unreachable(url: VolumeURL, cause: str | None = None) -> StorageUnreachableError:
    """The error for storage at ``url`` that did not answer within the storage timeout (``cause`` is
    ``None``) or failed to be reached or refused access (``cause``, shortened by :func:`short_error`).

    The fix says how to supply credentials (gs://, s3://) or check the host (http(s)://).
    """
    fix = _REACH_FIX.get(url.scheme, "check the file system is mounted and responds")
    head = f"Could not reach {url.url}: "
    if cause is not None:
        return StorageUnreachableError(f"{head}{short_error(cause, _budget(head, fix))}.", f"{fix}.")
    seconds = storage_timeout_s()
    return StorageUnreachableError(
        f"{head}no answer within {seconds:g} s.", f"{fix}; {STORAGE_TIMEOUT_ENV} sets the wait (now {seconds:g} s)."
    )


def storage_error(
    error: BaseException | str, url: VolumeURL, action: str, kind: type[VolsegError], fix: str
) -> VolsegError:
    """The one-line volseg error for ``error``, raised by storage while doing ``action`` at ``url``.

    ``action`` starts the message (e.g. ``"Could not create gs://b/out.zarr/0"``), the short cause
    follows. Remote storage that could not be reached or refused access gives
    :class:`~volseg.errors.StorageUnreachableError`; anything else ``kind`` with ``fix``.
    """
    if url.scheme in REMOTE_SCHEMES and status_code(error) in _ACCESS_FAILURES:
        return unreachable(url, str(error))
    return kind(f"{action}: {short_error(error, _budget(action, fix))}.", fix)


def _budget(head: str, fix: str) -> int:
    """Characters left for the cause in a message of ``head``, cause and `` Fix: `` + ``fix``."""
    return max(MESSAGE_CHARS - len(head) - len(fix) - 10, 60)


# --- key-value stores and JSON documents -----------------------------------------------------------


def open_kvstore(url: VolumeURL, deadline: float | None = None) -> ts.KvStore:
    """Open the key-value store of ``url``'s directory (:data:`PROBE_CONTEXT`; no I/O for most drivers).

    Raises :class:`~volseg.errors.StorageUnreachableError` if that takes past ``deadline`` (default:
    the storage timeout from now) and tensorstore's ``ValueError`` for an invalid store.
    """
    with native_logs_dropped(url):  # opening may already look for credentials
        return wait(ts.KvStore.open(url.kvstore(), context=PROBE_CONTEXT), url, deadline)


def read_keys(url: VolumeURL, keys: Iterable[str]) -> dict[str, bytes | None]:
    """Read several keys of ``url``'s directory concurrently; a missing key maps to ``None``.

    All reads together wait at most the storage timeout. Raises
    :class:`~volseg.errors.StorageUnreachableError` when remote storage does not answer in time or
    refuses access, and :class:`~volseg.errors.VolumeNotFoundError` when it cannot be read otherwise
    (permission, a path under a file), in one line naming the URL.
    """
    names = list(keys)
    deadline = storage_deadline()
    try:
        store = open_kvstore(url, deadline)
        results = [wait(pending, url, deadline) for pending in [store.read(key) for key in names]]
    except ValueError as err:
        raise storage_error(
            err, url, f"Could not read {', '.join(names)} under {url.url}", VolumeNotFoundError,
            "check the URL and that the storage is readable.",
        ) from err
    return {k: (r.value if r.state == "value" else None) for k, r in zip(names, results, strict=True)}


def parse_json(raw: bytes, where: str) -> dict[str, Any]:
    """Decode a JSON object; anything else raises :class:`~volseg.errors.VolumeFormatError`."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VolumeFormatError(
            f"{where} is not valid JSON: {short_error(err, 120)}.", "repair or remove the file."
        ) from err
    if not isinstance(value, dict):
        raise VolumeFormatError(f"{where} holds {type(value).__name__}, not a JSON object.", "repair it.")
    return value


def read_json(url: VolumeURL, key: str) -> dict[str, Any] | None:
    """The JSON object stored at ``key`` in ``url``'s directory, or ``None`` if the key is missing."""
    raw = read_keys(url, [key])[key]
    return None if raw is None else parse_json(raw, f"{url.url.rstrip('/')}/{key}")


def update_json(
    url: VolumeURL,
    key: str,
    change: Callable[[dict[str, Any] | None], dict[str, Any] | None],
) -> dict[str, Any] | None:
    """Atomically replace the JSON object at ``key`` by ``change(current)``.

    ``current`` is ``None`` when the key is missing; ``change`` returning ``None`` leaves the key as it
    is. The write is conditional on the key not having changed since it was read (compare-and-swap on
    the storage generation), and retried with a fresh read otherwise, so concurrent updates from many
    processes never lose each other's changes. ``change`` may therefore run more than once and must not
    have side effects. Returns the object that was written (or ``None``).

    Each read and write waits at most the storage timeout; storage failures raise a one-line
    :class:`~volseg.errors.VolsegError` (:class:`~volseg.errors.StorageUnreachableError` for remote
    storage that does not answer or refuses access).
    """
    if url.read_only:
        raise UnsupportedURLError(
            f"Cannot write {key} under {url.url}: {url.scheme}:// storage is read-only.",
            "copy the volume to writable storage (local disk, gs://, s3://).",
        )
    where = f"{url.url.rstrip('/')}/{key}"
    try:
        store = open_kvstore(url)
        for attempt in range(_CAS_ATTEMPTS):
            done, written = _compare_and_swap(store, url, key, change)
            if done:
                return written
            time.sleep(min(0.001 * 2**attempt, 0.2))
    except VolsegError:  # from parse_json or change: already one line
        raise
    except ValueError as err:
        raise storage_error(
            err, url, f"Could not update {where}", VolsegError,
            "check that the storage is writable (a folder you may write, not a file) and retry.",
        ) from err
    raise VolsegError(
        f"Could not update {where}: it kept changing under {_CAS_ATTEMPTS} concurrent writers.",
        "retry; if it persists, fewer processes should update this volume's attributes at once.",
    )


def _compare_and_swap(
    store: ts.KvStore,
    url: VolumeURL,
    key: str,
    change: Callable[[dict[str, Any] | None], dict[str, Any] | None],
) -> tuple[bool, dict[str, Any] | None]:
    """One attempt of :func:`update_json`: ``(True, written)`` when done, ``(False, None)`` when another
    writer changed the key between the read and the conditional write."""
    current = wait(store.read(key), url)
    document = parse_json(current.value, f"{url.url.rstrip('/')}/{key}") if current.state == "value" else None
    updated = change(document)
    if updated is None:
        return True, None
    encoded = json.dumps(updated, indent=2, sort_keys=False).encode()
    stamp = wait(store.write(key, encoded, if_equal=current.stamp.generation), url)
    return (True, updated) if stamp.generation else (False, None)
