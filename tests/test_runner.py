"""The benchmark runner: the SQLite results store, sharding, resumable runs, torch.distributed.

Multi-process checks use plain processes (concurrent writers) and two gloo processes started
by ``torch.multiprocessing`` (the collection of records on rank 0); the CLI tests in
``tests/test_pointing_game_cli.py`` run the same code under ``torchrun``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import socket
import sqlite3

import pytest
import torch

from torchray_like.benchmark.runner import (
    MAX_SEED,
    ConfigMismatchError,
    ResultsStore,
    ResultsStoreError,
    add_common_arguments,
    distributed,
    format_table,
    open_store,
    run_sharded,
    shard,
)

# ------------------------------------------------------------------------------ the store


def test_store_put_done_records(tmp_path):
    store = ResultsStore(tmp_path / "sub" / "r.sqlite", "exp", {"a": 1})
    assert store.done() == set() and store.records() == [] and len(store) == 0
    store.put("b", {"x": 2, "nan": float("nan")})
    store.put("a", {"x": 1, "list": [1, 2]})
    assert store.done() == {"a", "b"}
    records = store.records()
    assert [r["key"] for r in records] == ["a", "b"]
    assert records[0] == {"key": "a", "x": 1, "list": [1, 2]}
    assert math.isnan(records[1]["nan"])
    store.put("a", {"x": 3})  # one row per key: replaced
    assert len(store) == 2 and store.get("a") == {"key": "a", "x": 3}
    assert store.get("missing") is None
    meta = store.records(meta=True)[0]
    assert meta["_pid"] == os.getpid() and meta["_host"] == socket.gethostname()
    assert meta["_rank"] == 0 and meta["_time"] > 0


def test_store_is_durable_and_shared_between_experiments(tmp_path):
    path = tmp_path / "r.sqlite"
    ResultsStore(path, "one", {"a": 1}).put("k", {"v": 1})
    other = ResultsStore(path, "two", {"b": 2})
    other.put("k", {"v": 2})
    # A new connection (another process would do the same) sees committed rows.
    again = ResultsStore(path, "one", {"a": 1})
    assert again.records() == [{"key": "k", "v": 1}]
    assert ResultsStore(path, "two").records() == [{"key": "k", "v": 2}]
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "wal"


def test_store_config_mismatch_and_reset(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultsStore(path, "exp", {"masks": 500, "layers": {"vgg": "features.14"}})
    store.put("k", {"v": 1})
    with pytest.raises(ConfigMismatchError, match=r"masks: 500 -> 1000") as info:
        ResultsStore(path, "exp", {"masks": 1000, "layers": {"vgg": "features.14"}})
    assert isinstance(info.value, ValueError)
    # config=None accepts the stored one; key order does not matter.
    assert ResultsStore(path, "exp").config == {"masks": 500, "layers": {"vgg": "features.14"}}
    assert len(ResultsStore(path, "exp", {"layers": {"vgg": "features.14"}, "masks": 500})) == 1
    fresh = ResultsStore(path, "exp", {"masks": 1000}, reset=True)
    assert len(fresh) == 0 and fresh.config == {"masks": 1000}


def test_store_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="experiment"):
        ResultsStore(tmp_path / "r.sqlite", "")
    with pytest.raises(TypeError, match="JSON"):
        ResultsStore(tmp_path / "r.sqlite", "e", {"f": object()})
    store = ResultsStore(tmp_path / "r.sqlite", "e")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        store.put("k", {"t": torch.zeros(1)})
    with pytest.raises(TypeError, match="dict"):
        store.put("k", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        store.put("", {})


def test_store_config_compared_by_json_value(tmp_path):
    """2 and 2.0 are one JSON number; true and 1 are not the same value (and are named)."""
    path = tmp_path / "r.sqlite"
    ResultsStore(path, "exp", {"sigma": 2.0, "nan": float("nan"), "none": None}).put("k", {})
    again = ResultsStore(path, "exp", {"sigma": 2, "nan": float("nan"), "none": None})
    assert len(again) == 1 and again.config["sigma"] == 2.0  # the stored config is kept
    ResultsStore(path, "flags", {"flag": True, "layers": ["a", 1, [0.5]], "x": 0})
    cases = [({"flag": 1, "layers": ["a", 1, [0.5]], "x": 0}, "flag: true -> 1"),
             ({"flag": True, "layers": ["a", True, [0.5]], "x": 0}, r"layers\[1\]: 1 -> true"),
             ({"flag": True, "layers": ["a", 1, [0.25]], "x": 0},
              r"layers\[2\]\[0\]: 0.5 -> 0.25"),
             ({"flag": True, "layers": ["a", 1], "x": 0},
              r'layers: \["a", 1, \[0.5\]\] -> \["a", 1\]'),
             ({"flag": True, "layers": ["a", 1, [0.5]], "x": None}, "x: 0 -> null"),
             ({"flag": True, "layers": ["a", 1, [0.5]], "x": "0"}, 'x: 0 -> "0"')]
    for config, difference in cases:
        with pytest.raises(ConfigMismatchError,
                           match=rf"another configuration \({difference}\)"):
            ResultsStore(path, "flags", config)


def test_store_that_is_a_directory_or_cannot_have_a_folder(tmp_path):
    with pytest.raises(ResultsStoreError, match=rf"the results store {tmp_path} is a directory; "
                                                r"pass a file path, e.g. .*results.sqlite"):
        ResultsStore(tmp_path, "exp")
    (tmp_path / "file").write_text("")
    with pytest.raises(ResultsStoreError, match=rf"cannot create the folder {tmp_path}/file"):
        ResultsStore(tmp_path / "file" / "r.sqlite", "exp")


def _damaged_stores(folder):
    """(name, path) of stores that SQLite cannot use, each made the way it happens."""
    good = folder / "good.sqlite"
    store = ResultsStore(good, "exp", {"a": 1})
    for i in range(300):
        store.put(f"k{i:04d}", {"v": i, "pad": "x" * 200})
    store.close()
    data = good.read_bytes()
    (folder / "truncated.sqlite").write_bytes(data[:len(data) // 2])  # a copy cut short
    garbled = bytearray(data)
    garbled[4096 * 3:4096 * 4] = bytes(range(256)) * 16  # one page overwritten
    (folder / "garbled.sqlite").write_bytes(bytes(garbled))
    (folder / "text.sqlite").write_text("key,value\n")  # not a database at all
    return ["truncated", "garbled", "text"]


def test_store_corrupt_truncated_or_not_a_database(tmp_path):
    for name in _damaged_stores(tmp_path):
        path = tmp_path / f"{name}.sqlite"
        with pytest.raises(ResultsStoreError,
                           match=rf"the results store {path} is corrupt, truncated or not a "
                                 r"results store: move it away") as info:
            ResultsStore(path, "exp", {"a": 1})  # refused at open, not after an item
        assert isinstance(info.value, ValueError), name
    other = sqlite3.connect(tmp_path / "other.sqlite")
    other.execute("CREATE TABLE records (a, b)")
    other.commit()
    with pytest.raises(ResultsStoreError, match=r"table 'records' with columns \['a', 'b'\].*"
                                                r"another program's database"):
        ResultsStore(tmp_path / "other.sqlite", "exp")


def test_store_with_an_altered_record(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultsStore(path, "exp")
    store.put("k", {"v": 1})
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE records SET record = '{\"v\": ' WHERE key = 'k'")
    for read in (store.records, lambda: store.get("k")):
        with pytest.raises(ResultsStoreError, match=rf"the record of 'k' in the results store "
                                                    rf"{path} \(experiment 'exp'\) is not valid"):
            read()


def _unprivileged(fn, *args):
    """``fn(*args)`` in a child process that cannot write read-only files; its outcome."""
    receive, send = multiprocessing.Pipe(duplex=False)

    def child():
        if os.geteuid() == 0:  # root writes read-only files: become nobody
            os.setgid(65534)
            os.setuid(65534)
        try:
            send.send(("ok", fn(*args)))
        except BaseException as error:  # report it to the parent
            send.send((type(error).__name__, str(error)))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    return receive.recv() if receive.poll() else ("died", process.exitcode)


def _resume_and_compute(path):
    args = argparse.Namespace(out=os.path.dirname(path), store=path, resume=True,
                              from_store=False)
    calls: list = []
    try:
        store = open_store(args, "exp", {"a": 1})
    except ResultsStoreError as error:
        return "refused when opened", calls, str(error)
    run_sharded(["x", "y"], lambda item: calls.append(item) or {"v": 1}, store, progress=False)
    return "computed", calls, ""


def _read_only_use(path):
    args = argparse.Namespace(out=os.path.dirname(path), store=path, resume=False,
                              from_store=True)
    store = open_store(args, "exp")
    try:
        store.put("z", {})
    except ValueError as error:
        return [r["key"] for r in store.records()], str(error)
    return "put accepted"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_store_read_only_is_refused_before_computing(tmp_path_factory):
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="readonly_store_")  # reachable by the unprivileged child
    try:
        os.chmod(folder, 0o777)
        path = os.path.join(folder, "r.sqlite")
        ResultsStore(path, "exp", {"a": 1}).put("k", {"v": 0})
        os.chmod(path, 0o444)
        kind, (stage, calls, message) = _unprivileged(_resume_and_compute, path)
        assert (kind, stage, calls) == ("ok", "refused when opened", [])  # nothing computed
        assert f"the results store {path} is read-only: make it writable" in message
        # --from-store only reads: it still works, and takes no records.
        kind, (keys, refusal) = _unprivileged(_read_only_use, path)
        assert kind == "ok" and keys == ["k"]
        assert "opened with writable=False (e.g. --from-store): it takes no records" in refusal
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder, ignore_errors=True)
    with pytest.raises(ValueError, match="reset=True deletes records: it needs writable=True"):
        ResultsStore(tmp_path_factory.mktemp("s") / "r.sqlite", "exp", reset=True,
                     writable=False)


def _writer(path: str, worker: int, n: int) -> None:
    store = ResultsStore(path, "exp", {"same": True})
    for i in range(n):
        store.put(f"{worker}/{i}", {"worker": worker, "i": i})


def test_store_concurrent_writers(tmp_path):
    path = str(tmp_path / "r.sqlite")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ResultsStore(path, "exp", {"same": True})
    assert len(store) == 240
    assert len({r["_pid"] for r in store.records(meta=True)}) == 4


def test_store_survives_fork(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite", "exp")
    store.put("parent", {})
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=store.put, args=("child", {"c": 1}))  # reopens its connection
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert store.done() == {"parent", "child"}


# ------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("n, world", [(0, 3), (1, 2), (7, 1), (10, 3), (17, 4)])
def test_shard_is_disjoint_balanced_and_complete(n, world):
    items = [f"item{i}" for i in range(n)]
    shards = [shard(items, r, world) for r in range(world)]
    assert sorted(sum(shards, [])) == sorted(items)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [shard(items, r, world) for r in range(world)]  # deterministic


def test_shard_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        shard([1], 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard([1], 0, 0)


# ----------------------------------------------------------------------- run_sharded


def test_run_sharded_stores_and_resumes(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite", "exp")
    calls = []
    kill = [True]

    def fn(item):
        calls.append(item)
        if item == 3 and kill[0]:
            raise KeyboardInterrupt  # killed on item 3
        return {"square": item * item}

    with pytest.raises(KeyboardInterrupt):
        run_sharded(range(6), fn, store, key=lambda i: f"i{i}", progress=False)
    assert store.done() == {"i0", "i1", "i2"}  # everything before the kill is kept
    calls.clear()
    kill[0] = False
    run_sharded(range(6), fn, store, key=lambda i: f"i{i}", progress=False)
    assert calls == [3, 4, 5]  # only the missing ones
    calls.clear()
    run_sharded(range(6), fn, store, key=lambda i: f"i{i}", progress=False)
    assert calls == []
    assert [r["square"] for r in store.records()] == [0, 1, 4, 9, 16, 25]


def test_run_sharded_checks_keys_and_records(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite", "exp")
    with pytest.raises(ValueError, match="unique.*'a'"):
        run_sharded(["a", "b", "a"], lambda i: {}, store, progress=False)
    with pytest.raises(TypeError, match="dict"):
        run_sharded(["a"], lambda i: 1, store, progress=False)


def test_run_sharded_progress_bar(tmp_path, capsys):
    store = ResultsStore(tmp_path / "r.sqlite", "exp")
    store.put("a", {})
    run_sharded(["a", "b"], lambda i: {}, store, desc="demo")
    err = capsys.readouterr().err
    assert "demo" in err and "2/2" in err


def test_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed("cpu") as (rank, world):
        assert (rank, world) == (0, 1)
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed() as (rank, world):
        assert (rank, world) == (0, 1)


def _gloo_worker(rank: int, port: int, folder: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed("cpu") as (r, world):
        assert (r, world) == (rank, 2) and torch.distributed.is_initialized()
        # One store file shared by the ranks, then one file per rank (as on several machines).
        for name in ("shared.sqlite", f"rank{rank}.sqlite"):
            store = ResultsStore(os.path.join(folder, name), "exp")
            run_sharded(range(7), lambda i: {"rank": r, "value": i * 10}, store,
                        key=lambda i: f"k{i}", progress=False)
            out.put((name, rank, sorted(store.done())))
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_sharded_two_gloo_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, str(tmp_path), out))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    done = {(name.split(".")[0] if name == "shared.sqlite" else "own", rank): keys
            for name, rank, keys in (out.get(timeout=5) for _ in range(4))}
    everything = [f"k{i}" for i in range(7)]
    # Rank 0's store ends up with every record, whether or not the ranks share a file.
    assert done["shared", 0] == done["shared", 1] == everything
    assert done["own", 0] == everything
    assert done["own", 1] == [f"k{i}" for i in range(1, 7, 2)]  # its strided shard
    for name in ("shared.sqlite", "rank0.sqlite"):
        records = ResultsStore(tmp_path / name, "exp").records()
        assert [r["value"] for r in records] == [i * 10 for i in range(7)]
        assert [r["rank"] for r in records] == [i % 2 for i in range(7)]  # who computed it


# ----------------------------------------------------------------------- command line


def _parse(argv, default_out=None):
    parser = argparse.ArgumentParser(prog="bench.py")
    add_common_arguments(parser, default_out=default_out)
    return parser.parse_args(argv)


def test_common_arguments_defaults_and_store(tmp_path):
    args = _parse([])
    assert args.out == os.path.join(".", "out", "bench")
    assert args.limit is None and args.seed == 0 and not args.resume and not args.from_store
    assert args.device in ("cpu", "cuda") and args.store is None
    args = _parse(["--out", str(tmp_path), "--limit", "3", "--seed", "5"])
    assert (args.limit, args.seed) == (3, 5)
    store = open_store(args, "exp", {"k": 1})
    assert store.path == str(tmp_path / "results.sqlite")
    store.put("x", {})
    # Without --resume a run starts afresh; with it the records stay and the config must match.
    assert len(open_store(args, "exp", {"k": 2})) == 0
    open_store(args, "exp", {"k": 2}).put("y", {})
    args.resume = True
    assert open_store(args, "exp", {"k": 2}).done() == {"y"}
    with pytest.raises(ConfigMismatchError):
        open_store(args, "exp", {"k": 3})
    args.from_store = True
    assert open_store(args, "exp", {"ignored": True}).config == {"k": 2}
    args.store = str(tmp_path / "other.sqlite")
    with pytest.raises(FileNotFoundError, match="no results store"):
        open_store(args, "exp")


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "positive integer"),
    (["--limit", "x"], "positive integer"),
    (["--device", "potato"], "not a device"),
    (["--seed", "1.5"], "expected a non-negative integer, got '1.5'"),
    (["--seed", "-1"], "expected a non-negative integer, got -1"),
    # NumPy's legacy seeding (Quantus) stops at 2**32 - 1: refused here, not as NumPy's error.
    (["--seed", str(2 ** 32)], "a seed must be at most 2**32 - 1 = 4294967295"),
])
def test_common_arguments_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_seed_arg_accepts_numpys_whole_range():
    assert _parse(["--seed", str(MAX_SEED)]).seed == MAX_SEED == 2 ** 32 - 1
    assert _parse(["--seed", "0"]).seed == 0


def test_format_table():
    text = format_table([{"m": "a", "v": 0.5, "n": 3}, {"m": "bbb", "v": float("nan"), "n": 12}],
                        ["m", "v", "n"], {"v": ".2f"})
    lines = text.splitlines()
    assert lines[0].split() == ["m", "v", "n"]
    assert lines[2].split() == ["a", "0.50", "3"] and lines[3].split() == ["bbb", "-", "12"]
