"""The weight cache and file sinks on a one-rank cluster in this process; the
multi-job, multi-rank behaviour is in test_cache_mpi.py."""

import json
import os

import numpy as np
import pytest
from test_single_rank import refused

import cmatrix as cm
from cmatrix.io import atomic as writes
from cmatrix.io import shardfiles as cache

rng = np.random.default_rng(11)


@pytest.fixture(scope="module")
def cl():
    return cm.init()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CMATRIX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CMATRIX_SHM_DIR", str(tmp_path / "shm"))
    return tmp_path / "cache"


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_bad_cache_arguments_are_refused_before_anything_moves(cl):
    w = f32(8, 8)
    refused(cl, lambda: cl.shard(w, cache="save"), "needs a name")
    refused(cl, lambda: cl.shard(w, name="a/b", cache="save"), "name")
    refused(cl, lambda: cl.shard(w, name="..x", cache="save"), "name")
    refused(cl, lambda: cl.shard(w, name="ok", cache="keep"), "cache: expected")
    refused(cl, lambda: cl.shard(None, name="ok", cache="save"), "needs the weight")
    refused(cl, lambda: cl.shard(None, name="ok", cache="auto"), "needs the weight")
    refused(cl, lambda: cl.free("never-made"), "no cached matrix named")
    m = cl.shard(w)
    refused(cl, lambda: m.free(disk=True), "not sharded with cache")
    m.free()


def test_load_without_a_save_names_the_missing_manifest(cl, cache_dir):
    before = cl.stats()
    with pytest.raises(cm.CacheError, match="manifest.json does not exist"):
        cl.shard(None, name="absent", cache="load")
    assert cl.stats() == before


def test_save_writes_header_and_manifest_then_load_reuses(cl, cache_dir):
    w, x = f32(40, 24), f32(3, 40)
    W = cl.shard(w, name="one.w", cache="save")
    meta, start = cache.read_header(cache.shard_path("one.w", 0))
    assert meta["shape"] == [40, 24] and meta["dtype"] == "float32" and meta["counts"] == [24]
    assert meta["checksum"] == cache.checksum(w) and start % 64 == 0
    manifest = json.loads(cache.manifest_path("one.w").read_text())
    assert manifest["checksums"] == [meta["checksum"]]
    W.free()  # memory only: the files stay
    assert cache.shard_path("one.w", 0).exists()
    W2 = cl.shard(None, name="one.w", cache="load")
    np.testing.assert_allclose(cl.matmul(x, W2), x @ w, rtol=1e-5)
    listing = cl.cached()
    rows = [(e["name"], e["memory_bytes"] > 0, e["disk_bytes"] > 0) for e in listing]
    assert rows == [("one.w", True, True)]
    assert "one.w" in str(listing)
    cl.free("one.w", disk=True)
    assert W2.freed and not cache.shard_path("one.w", 0).exists()
    assert list(cl.cached()) == []


def test_auto_resends_a_changed_weight_and_saves_it(cl):
    w = f32(16, 32)
    cl.shard(w, name="auto.w", cache="auto").free()
    w2 = w + 1
    W = cl.shard(w2, name="auto.w", cache="auto")
    np.testing.assert_array_equal(cl.gather(W), w2)
    W.free(disk=True)


def test_quantised_and_bfloat16_shards_round_trip_through_the_cache(cl):
    torch = pytest.importorskip("torch")
    wb = torch.randn(32, 20).to(torch.bfloat16)
    W = cl.shard(wb, name="bf.w", cache="save")
    W.free()
    back = cl.gather(cl.shard(None, name="bf.w", cache="load"))
    assert back.dtype == torch.bfloat16 and torch.equal(back, wb)
    wq = f32(64, 8)
    Q = cl.shard(wq, name="q.w", quant="q4_0", cache="save")
    expect = cl.gather(Q)
    Q.free()
    again = cl.shard(None, name="q.w", cache="load")
    assert again.quant == "q4_0"
    np.testing.assert_array_equal(cl.gather(again), expect)
    cl.free("bf.w", disk=True)
    cl.free("q.w", disk=True)


def test_shard_file_checks(tmp_path):
    meta = {"name": "m", "rank": 0, "nbytes": 16, "block_shape": [2, 2], "dtype": "float32",
            "shape": [2, 2], "axis": 1, "counts": [2], "quant": None, "quant_axis": 0}
    data = np.arange(4, dtype=np.float32).reshape(2, 2)
    meta["checksum"] = cache.checksum(data)
    path = cache.write_shard(meta, data)
    found, start = cache.read_header(path)
    np.testing.assert_array_equal(cache.read_shard(path, found, start), data)
    assert cache.difference(found, {**found, "counts": [1, 1]}).startswith("plan differs")
    assert cache.difference(found, {**found, "dtype": "float16"}).startswith("dtype differs")
    assert cache.difference(found, {**found, "checksum": None}) is None
    path.write_bytes(b"not a shard at all")
    with pytest.raises(cache.StaleShard, match="bad magic"):
        cache.read_header(path)


def test_orphaned_temporary_files_are_swept(tmp_path):
    final = tmp_path / "x.bin"
    dead = final.with_name(f".{final.name}.{writes._HOST}.999999999.ab.tmp")
    dead.write_bytes(b"partial")
    other_host = final.with_name(f".{final.name}.elsewhere.999999999.ab.tmp")
    other_host.write_bytes(b"another host may still be writing this")
    live = writes.temp_name(final)
    live.write_bytes(b"being written")
    writes.sweep_orphans(tmp_path)
    assert not dead.exists() and live.exists() and other_host.exists()


def test_a_failed_write_leaves_neither_file(tmp_path):
    final = tmp_path / "y.bin"
    with pytest.raises(RuntimeError), writes.atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []


def test_shm_sink_writes_a_bin_file_others_can_read(cl, tmp_path):
    w, x = f32(12, 10), f32(4, 12)
    where = cl.matmul(x, cl.shard(w), out="shm:y")
    assert where == str(tmp_path / "shm" / "y.bin")
    from cmatrix.io.binfmt import read_bin

    data, dtype = read_bin(where)
    assert dtype == "float32"
    np.testing.assert_allclose(data, x @ w, rtol=1e-5)
    refused(cl, lambda: cl.matmul(x, w, out="shm:../etc"), "shm:NAME")


def test_h5_sink_round_trips_with_attributes(cl, tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "r.h5"
    a, b = f32(6, 5), f32(6, 5)
    A = cl.shard(a, name="A")
    assert cl.add(A, b, out=f"h5:{path}#/sum") == f"{path}#/sum"
    assert cl.sub(A, b, out=f"h5:{path}#/grp/diff") == f"{path}#/grp/diff"
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["sum"][...], a + b)  # the first dataset survived the second write
        np.testing.assert_array_equal(f["grp/diff"][...], a - b)
        attrs = dict(f["sum"].attrs)
    assert attrs["operation"] == "add" and attrs["a_name"] == "A" and list(attrs["a_shape"]) == [6, 5]
    assert attrs["dtype"] == "float32" and attrs["plan_axis"] == 1 and list(attrs["plan_counts"]) == [5]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    refused(cl, lambda: cl.add(A, b, out=f"h5:{path}"), "h5:PATH#/dataset")


def test_auto_rewrites_a_missing_file_even_when_the_shard_is_resident(cl):
    w = f32(16, 8)
    W = cl.shard(w, name="keep.w", cache="save")
    cache.shard_path("keep.w", 0).unlink()
    W2 = cl.shard(w, name="keep.w", cache="auto")
    assert cache.shard_path("keep.w", 0).exists() and not W.freed and not W2.freed
    cl.free("keep.w", disk=True)
    assert W.freed and W2.freed


def test_inconsistent_headers_are_corruption(tmp_path):
    data = np.ones((2, 2), np.float32)
    meta = {"name": "h", "rank": 0, "nbytes": 12, "block_shape": [2, 2], "dtype": "float32",
            "checksum": cache.checksum(data)}
    path = cache.write_shard(meta, data)
    with pytest.raises(cache.StaleShard, match="inconsistent"):
        cache.read_header(path)
    found = {**meta, "nbytes": 16, "shape": [2, 2], "axis": 1, "counts": [2], "quant": None}
    assert cache.difference(found, {**found, "block_shape": [4, 1]}).startswith("block_shape differs")
    assert cache.difference(found, {**found, "quant_axis": 1}) is None  # no quantisation: no axis


def test_progress_bars_only_when_asked_or_on_a_terminal(monkeypatch):
    from cmatrix.engine import progress

    monkeypatch.delenv("CMATRIX_PROGRESS", raising=False)
    assert not progress.wanted(1 << 40)  # pytest's stderr is not a terminal
    monkeypatch.setenv("CMATRIX_PROGRESS", "1")
    assert progress.wanted(1)
    monkeypatch.setenv("CMATRIX_PROGRESS", "0")
    assert isinstance(progress.bar(1 << 40, "x"), progress.NoBar)
    monkeypatch.delenv("CMATRIX_PROGRESS")
    monkeypatch.setenv("CMATRIX_PROGRESS_MB", "1G")  # a bad setting falls back, never raises
    assert progress.wanted(0) is False


@pytest.mark.parametrize("damage", [
    lambda m: m.update(checksums=[]),                  # shorter than the ranks: used to abort the job
    lambda m: m.update(checksums="sha256:0"),
    lambda m: m.update(shape=[4]),
    lambda m: m.update(dtype="float64"),
    lambda m: m.update(counts=[1, 2]),
    lambda m: m.pop("axis"),
    lambda m: m.clear(),
])
def test_a_damaged_manifest_is_a_cache_error_before_anything_moves(cl, cache_dir, damage):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    cl.shard(w, name="dm.w", cache="save").free()
    path = cache.manifest_path("dm.w")
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))
    before = cl.stats()
    with pytest.raises(cm.CacheError, match="manifest .* is damaged"):
        cl.shard(None, name="dm.w", cache="load")
    assert cl.stats() == before
    path.write_text("[1, 2]")
    with pytest.raises(cm.CacheError, match="not a JSON object"):
        cl.shard(None, name="dm.w", cache="load")
