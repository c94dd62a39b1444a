"""The errors a user can fix, and how every program reports them: one line, exit code 2, no traceback. Under
several processes, the first process to fail tells the others through torch.distributed's key-value store, and
every process ends with the same line, within a second, instead of waiting in a collective for its timeout.
"""

import os
import sys
import threading
import time
import traceback

ERROR_KEY = "wfas/error"
PRINTED_KEY = "wfas/error_printed"
# How long a failing process waits for the others to print its error before it exits (and its launcher ends them).
WAIT_FOR_OTHERS_SECONDS = 10
POLL_SECONDS = 0.5
STOP_WATCHING_SECONDS = 10  # a store call returns in milliseconds; one that hangs is left after this

# Set when this process announces its own error, or its main() has returned or raised: the watcher stops. It must
# have ended before the interpreter finalizes: a daemon thread still inside a store call then is ended by
# pthread_exit, whose unwinding through pybind11's noexcept GIL guard aborts the process ("terminate called
# without an active exception").
_stop = threading.Event()
_watchers = []


class UserError(Exception):
    """A problem the user can fix (a path, a file, a setting). Programs print it as one line and exit 2."""


class StorageError(UserError):
    """A listed file that cannot be read (missing, no permission, a stale NFS handle, EIO): the storage is at
    fault, not the image, so the run stops instead of training on what remains."""

    def __init__(self, path, error):
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(
            f"cannot read {path} ({reason}); the split lists it, so check that --data_root is right "
            "and that its file system is mounted and readable"
        )


def run_cli(main):
    """Run a program's main(); user errors become one line on stderr and exit code 2, with no traceback. Under
    several processes the line reaches all of them; a crash keeps its traceback on the process that met it."""
    try:
        main()
    except UserError as error:
        _announce(f"error: {error}")
        sys.exit(2)
    except Exception as error:
        earlier = _published_error()
        if earlier:  # a collective broke because another process failed first: its line is the cause
            print(earlier, file=sys.stderr, flush=True)
            sys.exit(2)
        traceback.print_exc()
        rank = os.environ.get("RANK", "0")
        summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
        where = f"the traceback in process {rank}'s output says where"
        line = f"error: process {rank} failed: {type(error).__name__}: {summary} ({where})"
        _announce(line)
        sys.exit(1)
    finally:
        _stop_watching()


def end_with_other_processes():
    """Under several processes: watch for another process's error, and end this one with its line."""
    store = _process_group_store()
    if store is None:
        return
    watcher = threading.Thread(target=_watch, args=(store,), name="end_with_other_processes", daemon=True)
    watcher.start()
    _watchers.append(watcher)


def _stop_watching():
    """Wait for the watcher to leave its store call: a daemon thread still inside one when the interpreter ends
    aborts the process. The wait does not scale with the poll: a store call on a busy machine outlasts a fast poll."""
    _stop.set()
    for watcher in _watchers:
        watcher.join(timeout=STOP_WATCHING_SECONDS)


def _watch(store):
    while not _stop.wait(POLL_SECONDS):
        try:
            if not store.check([ERROR_KEY]) or _stop.is_set():
                continue
            message = store.get(ERROR_KEY).decode()
            sys.stdout.flush()
            print(message, file=sys.stderr, flush=True)
            store.add(PRINTED_KEY, 1)
        except Exception:  # the store is gone with the launcher that held it: the run is ending anyway
            return
        os._exit(2)  # the main thread may be inside a collective that would wait for its timeout


def _process_group_store():
    distributed = sys.modules.get("torch.distributed")  # imported by the programs that run several processes
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return None
    if distributed.get_world_size() == 1:
        return None
    return distributed.distributed_c10d._get_default_store()


def _published_error():
    store = _process_group_store()
    if store is None:
        return None
    try:
        if store.check([ERROR_KEY]):
            return store.get(ERROR_KEY).decode()
    except Exception:
        return None
    return None


def _announce(message):
    """Print message, and under several processes publish it first (the first published wins: every process
    prints that one), then wait until the others have printed it, or WAIT_FOR_OTHERS_SECONDS. It prints before
    it waits: the launcher may end this process as soon as another one exits."""
    store = _process_group_store()
    if store is None:
        print(message, file=sys.stderr, flush=True)
        return
    world_size = sys.modules["torch.distributed"].get_world_size()
    _stop.set()
    try:
        message = store.compare_set(ERROR_KEY, "", message).decode()
    except Exception:  # no store to tell the others through: they end by their launcher or their timeout
        print(message, file=sys.stderr, flush=True)
        return
    print(message, file=sys.stderr, flush=True)
    try:
        printed = store.add(PRINTED_KEY, 1)
        deadline = time.time() + WAIT_FOR_OTHERS_SECONDS
        while printed < world_size and time.time() < deadline:
            time.sleep(0.1)
            printed = store.add(PRINTED_KEY, 0)
    except Exception:
        pass
