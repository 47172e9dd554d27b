r"""Resumable, sharded benchmark runs: a results store and ``torch.distributed`` sharding.

A benchmark is a list of *items* (an image, an ``(model, method, image)`` triple, ...) and a
function computing one JSON-serialisable record per item.  This module runs that loop so that

* records are written (committed) to a :class:`ResultsStore` as soon as each item finishes, so a
  killed or crashed worker loses at most the item it was computing;
* ``--resume`` skips the items whose records already exist (and, once everything is stored, the
  tables are rebuilt from the store without computing anything);
* under ``torchrun`` every process computes a disjoint, balanced :func:`shard` of the items and
  writes to the same store (SQLite in WAL mode with a busy timeout: safe with concurrent writers
  on one machine).  When the processes do not share the store file (several machines, each with
  its own local ``--out``), :func:`run_sharded` sends every rank's records to rank 0 at the end,
  so rank 0's store holds the whole run.

Typical script::

    parser = argparse.ArgumentParser()
    add_common_arguments(parser, default_out="./out/my_benchmark")
    args = parser.parse_args()
    with distributed(args.device) as (rank, world_size):
        store = open_store(args, "my_benchmark", config={"setting": 1})
        run_sharded(items, compute_one, store, key=lambda item: f"{item}", desc="my benchmark")
        if rank == 0:
            table = make_table(store.records())

Run it on ``K`` processes with ``torchrun --nproc_per_node=K script.py ...`` (CPU: gloo; CUDA:
NCCL, one GPU per process, ``LOCAL_RANK``).  The results are the same as those of one process:
each item is computed the same way whatever process computes it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import socket
import sqlite3
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from .cli_args import (
    MAX_IMAGE_SIDE,
    MAX_SEED,
    MAX_THREADS,
    device_arg,
    image_side_arg,
    non_negative_int_arg,
    positive_int_arg,
    seed_arg,
    threads_arg,
    threads_or_default_arg,
)

__all__ = ["ResultsStore", "distributed", "shard", "run_sharded", "add_common_arguments",
           "open_store", "store_path", "dist_info", "barrier", "local_device", "positive_int_arg",
           "device_arg", "non_negative_int_arg", "seed_arg", "MAX_SEED", "threads_arg",
           "threads_or_default_arg", "MAX_THREADS", "image_side_arg", "MAX_IMAGE_SIDE",
           "format_table", "ConfigMismatchError", "ResultsStoreError"]

_BUSY_TIMEOUT_S = 120.0


class ConfigMismatchError(ValueError):
    """The store holds the experiment with another configuration."""


class ResultsStoreError(ValueError):
    """The results store file cannot be used: a directory, read-only, corrupt, truncated, or
    not a results store (the message names the path and what to do)."""


_SCHEMA = {"experiments": ["experiment", "config", "created"],
           "records": ["experiment", "key", "record", "created", "pid", "rank", "host"]}


def _store_error(path: str, error: BaseException) -> ResultsStoreError:
    """A ResultsStoreError naming ``path`` and what to do, from SQLite's error."""
    text = str(error)
    if "readonly" in text or "read-only" in text:
        why = ("is read-only: make it writable, and its folder too (SQLite writes -wal and "
               "-shm files beside it), or pass another --store / --out")
    elif "unable to open" in text:
        why = "cannot be opened: its folder must exist and be writable; or pass another --store"
    elif "locked" in text or "busy" in text:
        why = "stayed locked by another process; wait for it to finish, or pass another --store"
    else:
        why = ("is corrupt, truncated or not a results store: move it away (or delete it) and "
               "run again without --resume, or pass another --store / --out")
    return ResultsStoreError(f"the results store {path} {why} (SQLite: {text})")


def _canonical(config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise TypeError(f"config must be JSON-serialisable: {error}") from None


def _show(value: Any) -> str:
    """A JSON value as JSON (``true`` and ``1`` differ), shortened."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _same_leaf(old: Any, new: Any) -> bool:
    """Equality of JSON scalars by JSON value: 2 == 2.0, true != 1, NaN == NaN."""
    if isinstance(old, bool) or isinstance(new, bool) or old is None or new is None:
        return old is new
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return old == new or (old != old and new != new)  # NaN: the same JSON token
    return type(old) is type(new) and old == new


def _differences(old: Any, new: Any, prefix: str = "") -> List[str]:
    """Differences between two JSON values (dotted paths); empty iff they are the same value."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{path}: (absent) -> {_show(new[k])}")
            elif k not in new:
                out.append(f"{path}: {_show(old[k])} -> (absent)")
            else:
                out.extend(_differences(old[k], new[k], path))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new))
                for d in _differences(a, b, f"{prefix}[{i}]")]
    # Both dicts, or lists of one length, were compared above: anything else differs.
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)) \
            or not _same_leaf(old, new):
        return [f"{prefix or '(config)'}: {_show(old)} -> {_show(new)}"]
    return []


class ResultsStore:
    """Records of one experiment in an SQLite file, one row per ``(experiment, key)``.

    Parameters
    ----------
    path : str or path-like
        The SQLite file (created with its folder if missing).  Several experiments can share a
        file.  Use a local disk: SQLite's WAL mode needs shared memory, which network file
        systems do not provide (on several machines give each one its own file; see
        :func:`run_sharded`).
    experiment : str
        Name of the experiment (e.g. ``"pointing_game/embedded"``).
    config : dict, optional
        JSON-serialisable settings the records depend on.  Stored with the experiment on first
        use; reopening the experiment with a different config raises
        :class:`ConfigMismatchError` (a :class:`ValueError`) naming the differences, so results
        computed with other settings are never mixed.  Configs are compared by JSON value
        (``2`` and ``2.0`` are the same, ``true`` and ``1`` are not).  ``None`` accepts
        whatever is stored.
    reset : bool
        Delete the experiment's records and stored config first (a fresh run).
    writable : bool
        Records will be written (default): checked when opened, not after computing an item.
        ``False`` only reads (``--from-store``, a read-only file); :meth:`put` is refused.

    Raises
    ------
    ResultsStoreError
        A directory, a corrupt, truncated or foreign file, or (``writable``) a read-only one.

    Notes
    -----
    Every :meth:`put` is its own committed transaction (``INSERT OR REPLACE``), in WAL mode with
    a busy timeout of two minutes, so any number of processes can write concurrently and a
    process killed at any moment leaves every earlier record intact.  Each row also keeps the
    time it was written, the writer's process id, rank and host name
    (``records(meta=True)``).
    """

    def __init__(self, path: Any, experiment: str, config: Optional[Mapping[str, Any]] = None,
                 *, reset: bool = False, writable: bool = True) -> None:
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty str, got {experiment!r}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
        if reset and not writable:
            raise ValueError("reset=True deletes records: it needs writable=True")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path (str or os.PathLike), got "
                            f"{type(path).__name__}")
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.experiment = experiment
        self.writable = bool(writable)
        self._make_folder()
        self._pid = -1
        self._conn: Optional[sqlite3.Connection] = None
        conn = self._connection()
        self._retry(lambda: conn.executescript(
            "CREATE TABLE IF NOT EXISTS experiments ("
            " experiment TEXT PRIMARY KEY, config TEXT NOT NULL, created REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS records ("
            " experiment TEXT NOT NULL, key TEXT NOT NULL, record TEXT NOT NULL,"
            " created REAL NOT NULL, pid INTEGER, rank INTEGER, host TEXT,"
            " PRIMARY KEY (experiment, key));"))
        self._check_file(conn)
        self.config = self._register(dict(config) if config is not None else None, reset)

    def _make_folder(self) -> None:
        if os.path.isdir(self.path):
            raise ResultsStoreError(
                f"the results store {self.path} is a directory; pass a file path, e.g. "
                f"{os.path.join(self.path, 'results.sqlite')} (--store), or its folder as --out")
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise ResultsStoreError(f"cannot create the folder {folder} of the results store "
                                    f"{self.path}: {error}") from None

    def _check_file(self, conn: sqlite3.Connection) -> None:
        """Refuse another program's tables, and a damaged file, now rather than mid-run."""
        tables = self._retry(lambda: {t: [row[1] for row in conn.execute(
            f"PRAGMA table_info({t})")] for t in _SCHEMA})
        for table, columns in _SCHEMA.items():
            found = tables[table]
            if found != columns:
                raise ResultsStoreError(
                    f"the results store {self.path} has a table {table!r} with columns "
                    f"{found}, not {columns}: it is another program's database; pass another "
                    "--store / --out")
        # quick_check reads every page (O(size), well under a second for benchmark stores).
        problems = self._retry(lambda: conn.execute("PRAGMA quick_check").fetchall())
        if [row[0] for row in problems] != ["ok"]:
            raise _store_error(self.path, RuntimeError(
                "; ".join(str(row[0]) for row in problems[:3])))

    # -- connection

    def _connection(self) -> sqlite3.Connection:
        # One connection per process: reopen after a fork (a connection must not cross one).
        if self._conn is None or self._pid != os.getpid():
            def connect() -> sqlite3.Connection:
                conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S,
                                       isolation_level=None, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
                if self.writable:  # WAL is a property of the file: a reader keeps its mode
                    conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across crashes
                return conn

            self._conn, self._pid = self._retry(connect), os.getpid()
        return self._conn

    def _retry(self, fn: Callable[[], Any], attempts: int = 50) -> Any:
        """Run ``fn``, retrying while another process holds a lock the busy handler skips.

        Any other SQLite error (read-only, corrupt, not a database) becomes a
        :class:`ResultsStoreError` naming the file and what to do.
        """
        for attempt in range(attempts):
            try:
                return fn()
            except sqlite3.DatabaseError as error:  # OperationalError included
                locked = "locked" in str(error) or "busy" in str(error)
                if not locked or attempt == attempts - 1:
                    raise _store_error(self.path, error) from error
                time.sleep(0.05 * (attempt + 1))
        return None

    def _register(self, config: Optional[Dict[str, Any]], reset: bool) -> Optional[Dict]:
        conn = self._connection()
        text = _canonical(config) if config is not None else None

        def transaction() -> Optional[str]:
            conn.execute("BEGIN IMMEDIATE" if self.writable else "BEGIN")
            try:
                if self.writable:  # a write that changes nothing: fails now if read-only
                    conn.execute("DELETE FROM records WHERE 0")
                if reset:
                    conn.execute("DELETE FROM records WHERE experiment = ?", (self.experiment,))
                    conn.execute("DELETE FROM experiments WHERE experiment = ?",
                                 (self.experiment,))
                row = conn.execute("SELECT config FROM experiments WHERE experiment = ?",
                                   (self.experiment,)).fetchone()
                if row is None and text is not None:
                    conn.execute("INSERT INTO experiments VALUES (?, ?, ?)",
                                 (self.experiment, text, time.time()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return None if row is None else row[0]

        stored = self._retry(transaction)
        if stored is None:
            return config
        stored_config = self._load(stored, "the stored config")
        # Compared by JSON value, so that every mismatch has a named difference.
        differences = [] if text is None else _differences(stored_config, json.loads(text))
        if differences:
            diff = "; ".join(differences[:8])
            raise ConfigMismatchError(
                f"the store {self.path} holds experiment {self.experiment!r} computed with "
                f"another configuration ({diff}); start a fresh run (without --resume, which "
                f"replaces those results), or use another --out / --store")
        return stored_config

    def close(self) -> None:
        """Close this process's connection (reopened on the next use)."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> Dict[str, Any]:  # picklable (e.g. to a worker process)
        state = self.__dict__.copy()
        state["_conn"], state["_pid"] = None, -1
        return state

    # -- records

    def done(self) -> Set[str]:
        """The keys already stored for this experiment."""
        rows = self._retry(lambda: self._connection().execute(
            "SELECT key FROM records WHERE experiment = ?", (self.experiment,)).fetchall())
        return {r[0] for r in rows}

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        """Store (or replace) the record of ``key``, committed before returning."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty str, got {key!r}")
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        if not self.writable:
            raise ValueError(f"the results store {self.path} was opened with writable=False "
                             "(e.g. --from-store): it takes no records")
        try:
            text = json.dumps(dict(record), sort_keys=True)
        except (TypeError, ValueError) as error:
            raise TypeError(f"record of {key!r} is not JSON-serialisable: {error}") from None
        rank = int(os.environ.get("RANK", "0"))
        values = (self.experiment, key, text, time.time(), os.getpid(), rank,
                  socket.gethostname())
        self._retry(lambda: self._connection().execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)", values))

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        """The record of ``key`` (with its ``"key"``), or ``None``."""
        row = self._retry(lambda: self._connection().execute(
            "SELECT record FROM records WHERE experiment = ? AND key = ?",
            (self.experiment, key)).fetchone())
        if row is None:
            return None
        record = self._load(row[0], f"the record of {key!r}")
        record["key"] = key
        return record

    def records(self, meta: bool = False) -> List[Dict[str, Any]]:
        """Every record, in key order, each with its ``"key"``.

        With ``meta=True`` each also has ``"_time"`` (when it was written), ``"_pid"``,
        ``"_rank"`` and ``"_host"`` (who wrote it).
        """
        rows = self._retry(lambda: self._connection().execute(
            "SELECT key, record, created, pid, rank, host FROM records WHERE experiment = ? "
            "ORDER BY key", (self.experiment,)).fetchall())
        out = []
        for key, text, created, pid, rank, host in rows:
            record = self._load(text, f"the record of {key!r}")
            record["key"] = key
            if meta:
                record.update(_time=created, _pid=pid, _rank=rank, _host=host)
            out.append(record)
        return out

    def _load(self, text: str, what: str) -> Any:
        """JSON stored in the file, or a ResultsStoreError naming the file and the row."""
        try:
            return json.loads(text)
        except (TypeError, ValueError) as error:
            raise ResultsStoreError(
                f"{what} in the results store {self.path} (experiment {self.experiment!r}) is "
                f"not valid JSON ({error}): the file was altered; run again without --resume "
                "or pass another --store") from None

    def __len__(self) -> int:
        row = self._retry(lambda: self._connection().execute(
            "SELECT COUNT(*) FROM records WHERE experiment = ?", (self.experiment,)).fetchone())
        return int(row[0])

    def __repr__(self) -> str:
        return f"ResultsStore({self.path!r}, experiment={self.experiment!r})"


# ---------------------------------------------------------------------------------------------
# torch.distributed
# ---------------------------------------------------------------------------------------------


def dist_info() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process (a no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def local_device(device: str = "cpu") -> torch.device:
    """The device of this process: ``"cuda"`` means ``cuda:LOCAL_RANK`` under torchrun."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


@contextlib.contextmanager
def distributed(device: str = "cpu", timeout: Optional[datetime.timedelta] = None
                ) -> Iterator[Tuple[int, int]]:
    """Join the process group when launched by ``torchrun``; yield ``(rank, world_size)``.

    With ``WORLD_SIZE > 1`` in the environment (``torchrun``, or ``MASTER_ADDR`` /
    ``MASTER_PORT`` / ``RANK`` / ``WORLD_SIZE`` set by hand) the default process group is
    initialised from the environment — ``gloo`` for a CPU ``device``, ``nccl`` for CUDA (each
    process then uses ``cuda:LOCAL_RANK``) — and destroyed on exit.  Otherwise, or when a group
    already exists (which is then left alone), nothing is initialised and ``(0, 1)`` (or the
    existing group's rank and size) is yielded.

    ``timeout`` bounds every collective, in particular the final barrier of
    :func:`run_sharded`, where the ranks that finish first wait for the others: it defaults to
    six hours (PyTorch's 10 to 30 minutes are too short for the imbalance of long runs).
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield dist_info()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    dev = local_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=timeout or datetime.timedelta(hours=6))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def shard(items: Sequence[Any], rank: int, world_size: int) -> List[Any]:
    """This rank's share of ``items``: every ``world_size``-th item from ``rank``.

    Deterministic (the order of ``items``), balanced (sizes differ by at most one, and costly
    and cheap items interleave when ``items`` are grouped by kind), and disjoint with union
    ``items`` over the ranks ``0 .. world_size - 1``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return list(items)[rank::world_size]


def _progress_bar(total: int, initial: int, rank: int, world_size: int, desc: str,
                  progress: Optional[bool]):
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    label = f"{desc} [rank {rank}/{world_size}]" if world_size > 1 else desc
    return tqdm(total=total, initial=initial, position=rank, desc=label or None,
                leave=True, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)


def run_sharded(items: Sequence[Any], fn: Callable[[Any], Mapping[str, Any]],
                store: ResultsStore, key: Callable[[Any], str] = str,
                progress: Optional[bool] = None, desc: str = "") -> None:
    """Compute ``fn(item)`` for this rank's shard of ``items``, storing each record at once.

    Parameters
    ----------
    items : sequence
        Every item of the run, in the same order on every rank.
    fn : callable
        ``item -> record`` (a JSON-serialisable dict).
    store : ResultsStore
        Where records go; items whose key it already holds are skipped (resume).
    key : callable
        ``item -> str``, unique over ``items`` (default ``str``).
    progress : bool, optional
        A tqdm bar per rank (``position=rank``); ``False`` hides it.  Default: shown.
    desc : str
        The bar's label.

    Notes
    -----
    With a process group, all ranks wait for each other at the end, then every rank sends the
    stored records of its shard to rank 0, which stores those it lacks: when the ranks share
    the store file this adds nothing, and when each machine has its own file rank 0's file
    ends up complete.  An exception in ``fn`` propagates (``torchrun`` then stops the other
    processes); the records already stored stay, so rerun with ``--resume``.
    """
    if not callable(fn) or not callable(key):
        raise TypeError("fn and key must be callable")
    if not isinstance(store, ResultsStore):
        raise TypeError(f"store must be a ResultsStore, got {type(store).__name__}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"items must be a sequence of work items, got {type(items).__name__}")
    rank, world_size = dist_info()
    items = list(items)
    keys = [key(item) for item in items]
    if len(set(keys)) != len(keys):
        seen: Set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"item keys must be unique; {dup!r} appears more than once")
    mine = shard(list(zip(keys, items)), rank, world_size)
    done = store.done()
    todo = [(k, item) for k, item in mine if k not in done]
    bar = _progress_bar(len(mine), len(mine) - len(todo), rank, world_size, desc, progress)
    try:
        for k, item in todo:
            record = fn(item)
            store.put(k, record)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if world_size > 1:
        _collect_on_rank0(store, [k for k, _ in mine], rank)


def _collect_on_rank0(store: ResultsStore, my_keys: List[str], rank: int) -> None:
    """After a barrier, copy every rank's records of its shard into rank 0's store."""
    import torch.distributed as dist

    dist.barrier()
    wanted = set(my_keys)
    # Do the ranks write to one file? Then there is nothing to send.
    where = (socket.gethostname(), store.path)
    places: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(places, where)
    if all(p == places[0] for p in places):
        return
    mine = [r for r in store.records() if r["key"] in wanted]
    gathered: Optional[List[Any]] = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0 and gathered is not None:
        have = store.done()
        for records in gathered[1:]:
            for record in records or []:
                if record["key"] not in have:
                    record = dict(record)
                    store.put(record.pop("key"), record)
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, default_out: Optional[str] = None
                         ) -> None:
    """Add ``--device --seed --out --store --resume --from-store --limit`` to ``parser``.

    ``--store`` defaults to ``OUT/results.sqlite`` (resolved by :func:`open_store`); ``--limit``
    defaults to ``None`` (the script decides).  ``default_out`` defaults to
    ``./out/<script name>``.
    """
    if default_out is None:
        name = os.path.splitext(os.path.basename(parser.prog or "benchmark"))[0]
        default_out = os.path.join(".", "out", name)
    group = parser.add_argument_group("common options")
    group.add_argument("--device", type=device_arg,
                       default="cuda" if torch.cuda.is_available() else "cpu",
                       help="device: cpu, cuda (under torchrun: cuda:LOCAL_RANK), cuda:N "
                            "(default: %(default)s)")
    group.add_argument("--seed", type=seed_arg, default=0,
                       help="seed of the random parts (masks, jitter) (default: %(default)s)")
    group.add_argument("--out", default=default_out, metavar="DIR",
                       help="folder for the tables and the results store "
                            "(default: %(default)s)")
    group.add_argument("--store", default=None, metavar="PATH",
                       help="results store (SQLite file; default: OUT/results.sqlite). Keep it "
                            "on a local disk; on several machines give each its own")
    group.add_argument("--resume", action="store_true",
                       help="keep the stored records and compute only the missing ones "
                            "(refused if the stored settings differ); without it a run starts "
                            "afresh")
    group.add_argument("--from-store", action="store_true",
                       help="compute nothing: rebuild the tables from the stored records")
    group.add_argument("--limit", type=positive_int_arg, default=None, metavar="N",
                       help="use only the first N images")


def store_path(args: argparse.Namespace) -> str:
    """``args.store``, or ``OUT/results.sqlite``."""
    return args.store or os.path.join(args.out, "results.sqlite")


def open_store(args: argparse.Namespace, experiment: str,
               config: Optional[Mapping[str, Any]] = None) -> ResultsStore:
    """Open the run's store on every rank, with the semantics of the common arguments.

    Without ``--resume`` / ``--from-store`` rank 0 clears the experiment's records first (a
    fresh run) while the other ranks wait; with ``--resume`` the stored records are kept and a
    different stored ``config`` raises :class:`ConfigMismatchError`; with ``--from-store`` the
    stored config is used as is (``config`` is ignored; check ``store.config``).
    """
    path = store_path(args)
    from_store = bool(getattr(args, "from_store", False))
    resume = bool(getattr(args, "resume", False))
    rank, _ = dist_info()
    if from_store:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--from-store: no results store at {path}")
        return ResultsStore(path, experiment, None, writable=False)
    error: Optional[BaseException] = None
    store = None
    if rank == 0:
        try:
            store = ResultsStore(path, experiment, config, reset=not resume)
        except BaseException as e:  # let the other ranks leave instead of hanging
            error = e
    _broadcast_error(error)
    if rank != 0:
        store = ResultsStore(path, experiment, config)
    assert store is not None
    return store


def _broadcast_error(error: Optional[BaseException]) -> None:
    """Raise ``error`` of rank 0 on every rank (after a collective, so nobody hangs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        message = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            kind, text = message[0]
            for known in (ConfigMismatchError, ResultsStoreError):
                if kind == known.__name__:
                    raise known(text)
            raise RuntimeError(f"rank 0 failed to open the store: {kind}: {text}")
    if error is not None:
        raise error


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                 formats: Optional[Mapping[str, str]] = None) -> str:
    """A plain-text table (left-aligned text, right-aligned numbers; NaN shown as ``-``)."""
    formats = dict(formats or {})

    def cell(row: Mapping[str, Any], col: str) -> str:
        value = row.get(col, "")
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return format(value, formats.get(col, ".3f"))
        return str(value)

    cells = [[cell(r, c) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) and bool(rows)
               for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)
