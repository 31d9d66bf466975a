"""Matrix files: .bin, .npy, .pt, .h5 and .safetensors loaders, writers and `cmatrix convert`.

Plain pytest, no MPI. Tests that need torch, h5py or the safetensors package skip without them.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmatrix.core import dtypes
from cmatrix.core.arrays import HostArray
from cmatrix.errors import InputError
from cmatrix.io import binfmt, store
from cmatrix.io.atomic import atomic_path
from cmatrix.io.store import from_user

ROOT = Path(__file__).resolve().parent.parent
rng = np.random.default_rng(11)

NEEDS = {".pt": "torch", ".h5": "h5py"}
FORMAT_DTYPES = [
    (".bin", "float32"), (".bin", "float16"), (".bin", "bfloat16"),
    (".npy", "float32"), (".npy", "float16"),
    (".pt", "float32"), (".pt", "float16"), (".pt", "bfloat16"),
    (".h5", "float32"), (".h5", "float16"), (".h5", "bfloat16"),
    (".safetensors", "float32"), (".safetensors", "float16"), (".safetensors", "bfloat16"),
]


def sample(dtype: str, shape=(5, 7)) -> np.ndarray:
    """Storage of ``dtype`` with awkward values: inf, -0.0, subnormals, a NaN with a payload."""
    x = rng.standard_normal(shape).astype(np.float32) * 3
    flat = x.reshape(-1)
    flat[:4] = [np.inf, -0.0, 1e-40, -np.inf]
    data = dtypes.from_float32(x, dtype)
    if dtype == "bfloat16":
        data.reshape(-1)[4] = 0x7FA1  # NaN with a payload: must survive bit-exactly
    return data


def assert_same(host: HostArray, data: np.ndarray, dtype: str) -> None:
    assert host.dtype == dtype
    assert host.data.dtype == dtypes.STORAGE[dtype]
    assert host.data.shape == data.shape
    assert host.data.tobytes() == data.tobytes()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmatrix", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(("suffix", "dtype"), FORMAT_DTYPES)
def test_round_trip_is_bit_exact(tmp_path, suffix, dtype):
    if suffix in NEEDS:
        pytest.importorskip(NEEDS[suffix])
    data = sample(dtype)
    path = store.save(tmp_path / f"m{suffix}", HostArray(data, dtype, "numpy"))
    assert path.is_file()
    host = store.load(path)
    assert_same(host, data, dtype)
    assert host.kind == ("torch" if suffix == ".pt" else "numpy")
    assert [p.name for p in tmp_path.iterdir()] == [f"m{suffix}"], "a temporary file was left behind"


def test_from_user_takes_paths(tmp_path):
    data = sample("float16")
    store.save(tmp_path / "w.bin", HostArray(data, "float16", "numpy"))
    host = from_user(str(tmp_path / "w.bin"), "w")
    assert_same(host, data, "float16")
    with pytest.raises(InputError, match="w: file not found"):
        from_user(tmp_path / "missing.bin", "w")


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="x: file not found"):
        store.load(tmp_path / "nope.npy", "x")
    (tmp_path / "w.txt").write_text("1 2 3")
    with pytest.raises(InputError, match=r"cannot load '\.txt'.*\.safetensors"):
        store.load(tmp_path / "w.txt")


def test_spec_splits_on_last_hash_only_for_files_or_known_suffixes(tmp_path):
    assert store.split_spec("weights.h5#/layer0/w") == (Path("weights.h5"), "/layer0/w")
    assert store.split_spec("m.safetensors#a.b#c") == (Path("m.safetensors"), "a.b#c")
    assert store.split_spec("w.pt#") == (Path("w.pt"), None)
    assert store.split_spec("notes#1") == (Path("notes#1"), None)
    odd = tmp_path / "run#3"
    odd.mkdir()
    data = sample("float32")
    np.save(odd / "w.npy", data)
    assert_same(store.load(odd / "w.npy"), data, "float32")  # '#' in a directory name


# ---------------------------------------------------------------- .npy


def test_npy_refuses_bfloat16_with_advice(tmp_path):
    with pytest.raises(InputError, match="--dtype float32"):
        store.save(tmp_path / "w.npy", HostArray(sample("bfloat16"), "bfloat16", "numpy"))
    assert not (tmp_path / "w.npy").exists()


def test_float64_npy_refused_with_convert_hint_and_convertible(tmp_path):
    x = rng.standard_normal((3, 4))
    np.save(tmp_path / "w64.npy", x)
    with pytest.raises(InputError, match=r"float64.*cmatrix convert .*w64\.npy DST --dtype float32"):
        store.load(tmp_path / "w64.npy", "w")
    store.convert(tmp_path / "w64.npy", tmp_path / "w32.npy", dtype="float32")
    assert_same(store.load(tmp_path / "w32.npy"), x.astype(np.float32), "float32")


def test_object_npy_is_never_unpickled(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot read"):
        store.load(tmp_path / "obj.npy")


# ---------------------------------------------------------------- .bin


def test_bin_shapes(tmp_path):
    cases = {(6,): (1, 6), (3, 4): (3, 4), (1, 3, 4): (3, 4), (2, 3, 4): (2, 3, 4),
             (2, 1, 3, 4): (2, 1, 3, 4), (1, 1, 1, 5): (1, 5), (0, 4): (0, 4)}
    for given, read_back in cases.items():
        data = rng.standard_normal(given).astype(np.float32)
        binfmt.write_bin(tmp_path / "s.bin", data, "float32")
        got, dtype = binfmt.read_bin(tmp_path / "s.bin")
        assert (got.shape, dtype) == (read_back, "float32"), given
        assert got.tobytes() == data.tobytes()
    header = binfmt.read_bin_header(tmp_path / "s.bin")
    assert header == ("float32", (0, 4), 20)


def test_write_bin_refuses_bad_input(tmp_path):
    with pytest.raises(InputError, match="1 to 4 dims"):
        binfmt.write_bin(tmp_path / "a.bin", np.zeros((1, 1, 1, 1, 2), np.float32), "float32")
    with pytest.raises(InputError, match="1 to 4 dims"):
        binfmt.write_bin(tmp_path / "a.bin", np.zeros((), np.float32), "float32")
    with pytest.raises(InputError, match="supported"):
        binfmt.write_bin(tmp_path / "a.bin", np.zeros(3), "float64")
    with pytest.raises(InputError, match="storage is float64"):
        binfmt.write_bin(tmp_path / "a.bin", np.zeros(3), "float32")
    assert list(tmp_path.iterdir()) == []


def test_legacy_v1_bin_is_readable(tmp_path):
    data = rng.standard_normal((3, 5)).astype(np.float32)
    (tmp_path / "old.bin").write_bytes(np.array([2, 3, 5], np.int32).tobytes() + data.tobytes())
    got, dtype = binfmt.read_bin(tmp_path / "old.bin")
    assert dtype == "float32" and got.shape == (3, 5)
    assert got.tobytes() == data.tobytes()
    cube = rng.standard_normal((2, 1, 3)).astype(np.float32)
    (tmp_path / "cube.bin").write_bytes(np.array([3, 2, 1, 3], np.int32).tobytes() + cube.tobytes())
    assert_same(store.load(tmp_path / "cube.bin"), cube, "float32")


@pytest.mark.parametrize(("tag", "dtype"), [(-1, "float32"), (-2, "float16"), (-3, "bfloat16")])
def test_hand_written_v2_bin_is_read(tmp_path, tag, dtype):
    data = sample(dtype, (4, 6))
    (tmp_path / "m.bin").write_bytes(np.array([tag, 1, 1, 4, 6], np.int32).tobytes() + data.tobytes())
    assert_same(store.load(tmp_path / "m.bin"), data, dtype)


def test_truncated_and_oversized_bin_are_refused(tmp_path):
    data = rng.standard_normal((4, 6)).astype(np.float32)
    good = np.array([-1, 1, 1, 4, 6], np.int32).tobytes() + data.tobytes()  # 20 + 96 = 116 bytes
    (tmp_path / "short.bin").write_bytes(good[:-2])
    with pytest.raises(InputError, match=r"short\.bin.*expected 116 bytes, got 114 bytes"):
        store.load(tmp_path / "short.bin", "w")
    (tmp_path / "long.bin").write_bytes(good + b"\0" * 4)
    with pytest.raises(InputError, match=r"long\.bin.*expected 116 bytes, got 120 bytes"):
        binfmt.read_bin(tmp_path / "long.bin")
    (tmp_path / "stub.bin").write_bytes(good[:12])
    with pytest.raises(InputError, match="got 12 bytes"):
        binfmt.read_bin(tmp_path / "stub.bin")
    (tmp_path / "tiny.bin").write_bytes(b"\1\0")
    with pytest.raises(InputError, match="shorter than any header"):
        binfmt.read_bin(tmp_path / "tiny.bin")


def test_bad_bin_headers_are_refused(tmp_path):
    (tmp_path / "tag.bin").write_bytes(np.array([-7, 1, 1, 1, 1], np.int32).tobytes() + b"\0" * 4)
    with pytest.raises(InputError, match="unknown .bin dtype tag -7"):
        binfmt.read_bin(tmp_path / "tag.bin")
    (tmp_path / "neg.bin").write_bytes(np.array([-1, 1, 1, -2, 3], np.int32).tobytes())
    with pytest.raises(InputError, match="negative dimension"):
        binfmt.read_bin(tmp_path / "neg.bin")
    (tmp_path / "ndim.bin").write_bytes(np.array([99, 1, 1], np.int32).tobytes())
    with pytest.raises(InputError, match="ndim 99"):
        binfmt.read_bin(tmp_path / "ndim.bin")


# ---------------------------------------------------------------- atomic writes


def test_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    old = sample("float32")
    binfmt.write_bin(tmp_path / "w.bin", old, "float32")

    def die(nbytes):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        binfmt.write_bin(tmp_path / "w.bin", sample("float32", (50, 50)), "float32", on_chunk=die)
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]
    assert_same(store.load(tmp_path / "w.bin"), old, "float32")


# ---------------------------------------------------------------- .safetensors


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_safetensors_from_the_library(tmp_path, dtype):
    st_numpy = pytest.importorskip("safetensors.numpy")
    data = sample(dtype)
    st_numpy.save_file({"model.embed.weight": data}, str(tmp_path / "m.safetensors"))
    assert_same(store.load(tmp_path / "m.safetensors"), data, dtype)
    assert_same(store.load(f"{tmp_path}/m.safetensors#model.embed.weight"), data, dtype)


def test_bf16_safetensors_from_the_library(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    t = torch.randn(6, 3).to(torch.bfloat16)
    st_torch.save_file({"w": t}, str(tmp_path / "b.safetensors"))
    bits = t.view(torch.int16).numpy().view(np.uint16)
    assert_same(store.load(tmp_path / "b.safetensors"), bits, "bfloat16")


def test_safetensors_with_several_tensors_needs_a_key(tmp_path):
    path = tmp_path / "m.safetensors"
    a, b = sample("float32"), sample("float16", (2, 2))
    store.save(f"{path}#a", HostArray(a, "float32", "numpy"))
    store.save(f"{path}#layer.b", HostArray(b, "float16", "numpy"))  # keeps "a"
    with pytest.raises(InputError, match=r"holds 2 arrays.*Available: a, layer\.b"):
        store.load(path)
    with pytest.raises(InputError, match=r"no array named 'c'.*a, layer\.b"):
        store.load(f"{path}#c")
    assert_same(store.load(f"{path}#a"), a, "float32")
    assert_same(store.load(f"{path}#layer.b"), b, "float16")


def test_safetensors_we_write_are_read_by_the_library(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    a, b = sample("float32"), sample("float16", (2, 2))
    store.save(f"{tmp_path}/m.safetensors#a", HostArray(a, "float32", "numpy"))
    store.save(f"{tmp_path}/m.safetensors#layer.b", HostArray(b, "float16", "numpy"))
    theirs = st_numpy.load_file(str(tmp_path / "m.safetensors"))
    assert sorted(theirs) == ["a", "layer.b"]
    assert theirs["a"].tobytes() == a.tobytes() and theirs["layer.b"].tobytes() == b.tobytes()


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize(("blob", "match"), [
    (b"\x05\0", "shorter than the 8-byte header length"),
    ((10**9).to_bytes(8, "little") + b"{}", "does not fit"),
    ((4).to_bytes(8, "little") + b"{oops", "not JSON"),
    (_safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8),
     "truncated"),
    (_safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "needs 16 bytes"),
    (_safetensors_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b""), "bad shape"),
    (_safetensors_bytes({"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
     "cannot read"),
])
def test_corrupt_safetensors_are_refused(tmp_path, blob, match):
    (tmp_path / "bad.safetensors").write_bytes(blob)
    with pytest.raises(InputError, match=match):
        store.load(tmp_path / "bad.safetensors", "w")


# ---------------------------------------------------------------- .pt


def test_pt_state_dict_needs_a_key(tmp_path):
    torch = pytest.importorskip("torch")
    w, b = torch.randn(4, 3), torch.randn(3).half()
    torch.save({"layer.weight": w, "layer.bias": b, "step": 7, "sub": {"w": w.bfloat16()}}, tmp_path / "s.pt")
    host = store.load(f"{tmp_path}/s.pt#layer.weight")
    assert host.kind == "torch" and host.dtype == "float32"
    assert torch.equal(torch.from_numpy(host.data), w)
    bits = w.bfloat16().view(torch.int16).numpy()
    assert store.load(f"{tmp_path}/s.pt#sub.w").data.tobytes() == bits.tobytes()
    with pytest.raises(InputError, match=r"holds 3 arrays.*layer\.weight, layer\.bias, sub\.w"):
        store.load(tmp_path / "s.pt")
    bias = sample("float16", (5,))
    store.save(f"{tmp_path}/s.pt#layer.bias", HostArray(bias, "float16", "numpy"))  # replaces one entry
    assert_same(store.load(f"{tmp_path}/s.pt#layer.bias"), bias, "float16")
    assert torch.equal(torch.from_numpy(store.load(f"{tmp_path}/s.pt#layer.weight").data), w)
    torch.save([w], tmp_path / "list.pt")
    with pytest.raises(InputError, match="holds a list, not a tensor"):
        store.load(tmp_path / "list.pt")


class _Payload:
    """Unpickling this would create ``marker``: a stand-in for malicious code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pt_with_pickled_objects_is_refused_and_runs_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2, 2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="never runs pickled code"):
        store.load(f"{tmp_path}/evil.pt#w")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live: unsafe loading runs it
    assert marker.exists()


def test_convert_bin_matrix_to_pt(tmp_path):
    torch = pytest.importorskip("torch")
    from cmatrix import convert_bin_matrix_to_pt

    x = torch.randn(5, 4)
    binfmt.write_bin(tmp_path / "f.bin", x.numpy(), "float32")
    assert torch.equal(convert_bin_matrix_to_pt(tmp_path / "f.bin"), x)
    bits = dtypes.float32_to_bf16(x.numpy())
    binfmt.write_bin(tmp_path / "b.bin", bits, "bfloat16")
    t = convert_bin_matrix_to_pt(tmp_path / "b.bin", tmp_path / "b.pt")
    assert t.dtype == torch.bfloat16 and torch.equal(t, x.bfloat16())
    saved = torch.load(tmp_path / "b.pt", weights_only=True)
    assert saved.dtype == torch.bfloat16 and torch.equal(saved, t)


# ---------------------------------------------------------------- .h5


def test_h5_datasets_by_key_and_saving_keeps_others(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "w.h5"
    a, b = sample("float32"), sample("bfloat16", (2, 3))
    store.save(f"{path}#/layer0/w", HostArray(a, "float32", "numpy"))
    store.save(f"{path}#b", HostArray(b, "bfloat16", "numpy"))
    with pytest.raises(InputError, match=r"holds 2 arrays.*Available: /b, /layer0/w"):
        store.load(path)
    assert_same(store.load(f"{path}#/layer0/w"), a, "float32")
    assert_same(store.load(f"{path}#layer0/w"), a, "float32")
    assert_same(store.load(f"{path}#/b"), b, "bfloat16")
    with h5py.File(path, "r") as f:
        assert f["b"].dtype == np.uint16 and f["b"].attrs["cmatrix_dtype"] == "bfloat16"
    c = sample("float16", (4, 4))
    store.save(f"{path}#b", HostArray(c, "float16", "numpy"))  # replaces b, keeps layer0/w
    assert_same(store.load(f"{path}#b"), c, "float16")
    assert_same(store.load(f"{path}#/layer0/w"), a, "float32")
    with pytest.raises(InputError, match="is a group"):
        store.save(f"{path}#layer0", HostArray(c, "float16", "numpy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]


# ---------------------------------------------------------------- optional packages


@pytest.mark.parametrize(("module", "suffix", "extra"), [("torch", ".pt", "cmatrix[torch]"),
                                                          ("h5py", ".h5", "cmatrix[io]")])
def test_missing_optional_package_says_what_to_install(tmp_path, monkeypatch, module, suffix, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    (tmp_path / f"w{suffix}").write_bytes(b"x")
    with pytest.raises(InputError, match=re.escape(f"pip install '{extra}'")) as info:
        store.load(tmp_path / f"w{suffix}", "w")
    assert str(info.value).startswith("w: ")
    with pytest.raises(InputError, match=re.escape(f"pip install '{extra}'")):
        store.save(tmp_path / f"v{suffix}", HostArray(sample("float32"), "float32", "numpy"))


# ---------------------------------------------------------------- cmatrix convert


def test_cli_convert_chain_without_optional_packages(tmp_path):
    data = sample("float16", (6, 4))
    binfmt.write_bin(tmp_path / "a.bin", data, "float16")
    chain = ["a.bin", "b.npy", "c.safetensors#w", "d.bin"]
    for src, dst in zip(chain, chain[1:], strict=False):
        res = run_cli("convert", str(tmp_path / src), str(tmp_path / dst))
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"wrote {tmp_path / dst.split('#')[0]} (float16, 6x4, 0.0 MiB)")
    assert_same(store.load(tmp_path / "d.bin"), data, "float16")
    res = run_cli("convert", str(tmp_path / "d.bin"), str(tmp_path / "e.bin"), "--dtype", "float32")
    assert res.returncode == 0 and "(float32, 6x4," in res.stdout
    assert_same(store.load(tmp_path / "e.bin"), data.astype(np.float32), "float32")


def test_cli_convert_round_trip_through_every_format(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("h5py")
    data = dtypes.float32_to_bf16(rng.standard_normal((64, 32)).astype(np.float32))
    binfmt.write_bin(tmp_path / "a.bin", data, "bfloat16")
    steps = [("a.bin", "b.pt", []), ("b.pt", "c.npy", ["--dtype", "float32"]),
             ("c.npy", "d.h5#/m", ["--dtype", "bfloat16"]), ("d.h5#/m", "e.bin", [])]
    for src, dst, extra in steps:
        res = run_cli("convert", f"{tmp_path}/{src}", f"{tmp_path}/{dst}", *extra)
        assert res.returncode == 0, res.stderr
        assert "64x32" in res.stdout
    assert_same(store.load(tmp_path / "e.bin"), data, "bfloat16")  # bf16 -> f32 -> bf16 is exact


def test_cli_convert_bad_source(tmp_path):
    res = run_cli("convert", str(tmp_path / "nope.bin"), str(tmp_path / "out.npy"))
    assert res.returncode == 2
    assert res.stderr.startswith("cmatrix convert: src: file not found")
    (tmp_path / "bad.bin").write_bytes(b"\xff" * 7)
    res = run_cli("convert", str(tmp_path / "bad.bin"), str(tmp_path / "out.npy"))
    assert res.returncode == 2 and "cmatrix convert:" in res.stderr
    assert not (tmp_path / "out.npy").exists()


def test_cli_convert_to_a_place_it_cannot_write(tmp_path):
    binfmt.write_bin(tmp_path / "a.bin", sample("float32", (2, 3)), "float32")
    (tmp_path / "a-file").write_text("x")
    res = run_cli("convert", str(tmp_path / "a.bin"), str(tmp_path / "a-file" / "b.npy"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("cmatrix convert: cannot write") and "Traceback" not in res.stderr


def test_damaged_npy_headers_are_refused_before_allocating(tmp_path):
    good = tmp_path / "g.npy"
    np.save(good, np.ones((4, 4), np.float32))
    raw = good.read_bytes()
    huge = raw.replace(b"(4, 4)", b"(1048576, 1048576)")  # a header claiming 4 TiB
    (tmp_path / "huge.npy").write_bytes(huge)
    with pytest.raises(InputError, match="promises .* bytes of data"):
        store.load(tmp_path / "huge.npy")
    (tmp_path / "junk.npy").write_bytes(raw[:10] + b"{'descr': '<f4', 'shape': (4,\x00" + raw[50:])
    with pytest.raises(InputError, match="plain .npy array"):
        store.load(tmp_path / "junk.npy")


def test_safetensors_header_bombs_are_corrupt_files(tmp_path):
    for header in ("[" * 100000 + "]" * 100000, '{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], '
                   '"data_offsets": [0, 4]}}'):
        path = tmp_path / "bomb.safetensors"
        body = header.encode()
        path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 4)
        with pytest.raises(InputError, match="corrupt safetensors file"):
            store.load(path)


@pytest.mark.parametrize("index", ['{"weight_map": []}', '{"weight_map": "x"}', "[1]", "[" * 100000])
def test_a_damaged_safetensors_index_is_refused(tmp_path, index):
    from cmatrix.llm.checkpoint import Checkpoint

    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(InputError, match="not a safetensors index"):
        Checkpoint(tmp_path)
