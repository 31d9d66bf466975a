"""Every reader against mutated files: a valid load or a CMatrixError, never anything else,
within a time bound.

Each case starts from a valid file of its format, made here, and applies up to a few
random byte flips, insertions, deletions and a truncation. Hypothesis draws a bounded
number of examples per reader (``CMATRIX_FUZZ_EXAMPLES``, default 40), so the suite stays
quick in ``make test``; run with a larger number to search harder. The tally of outcomes
per reader is printed at the end (``pytest -s``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cmatrix.errors import CMatrixError  # noqa: E402
from cmatrix.io import binfmt, shardfiles, store  # noqa: E402
from cmatrix.llm.config import DecoderConfig  # noqa: E402

EXAMPLES = int(os.environ.get("CMATRIX_FUZZ_EXAMPLES", "40"))
TALLY: dict[str, Counter] = {}
FUZZ = settings(max_examples=EXAMPLES, deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, int]]:
    """Up to 6 edits of a file of ``size`` bytes, and maybe a truncation."""
    edits = draw(st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]),
                                    st.integers(0, max(size - 1, 0)), st.integers(0, 255)),
                          max_size=6))
    if draw(st.booleans()):
        edits.append(("truncate", draw(st.integers(0, size)), 0))
    return edits


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        where = min(where, len(out))
        if kind == "flip" and where < len(out):
            out[where] = value
        elif kind == "insert":
            out[where:where] = bytes([value])
        elif kind == "delete" and where < len(out):
            del out[where]
        elif kind == "truncate":
            del out[where:]
    return bytes(out)


def outcome(reader: str, call) -> None:
    """Run ``call``; a load or a CMatrixError is counted, anything else fails the test."""
    tally = TALLY.setdefault(reader, Counter())
    try:
        call()
    except CMatrixError:
        tally["clean error"] += 1
        return
    except BaseException as exc:
        tally["other"] += 1
        raise AssertionError(f"{reader}: {type(exc).__name__}: {exc}") from exc
    tally["valid load"] += 1


def _valid_files(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    files = {".bin": binfmt.write_bin(folder / "a.bin", x, "float32"),
             ".npy": folder / "a.npy", ".safetensors": folder / "a.safetensors"}
    np.save(files[".npy"], x)
    store.save(files[".safetensors"], store.from_user(x, "x"))
    try:
        import torch  # noqa: F401

        files[".pt"] = store.save(folder / "a.pt", store.from_user(x, "x"))
    except ImportError:
        pass
    try:
        import h5py  # noqa: F401

        files[".h5"] = store.save(folder / "a.h5#/m", store.from_user(x, "x"))
    except ImportError:
        pass
    return files


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("valid")
    return {suffix: Path(path).read_bytes() for suffix, path in _valid_files(folder).items()}


@pytest.mark.parametrize("suffix", [".bin", ".npy", ".safetensors", ".pt", ".h5"])
def test_matrix_files(originals, tmp_path, suffix):
    if suffix not in originals:
        pytest.skip(f"no package here writes {suffix}")
    data = originals[suffix]

    @FUZZ
    @given(mutations(len(data)))
    def run(edits):
        path = tmp_path / f"m{suffix}"
        path.write_bytes(mutate(data, edits))
        outcome(suffix, lambda: store.load(path))

    run()


def test_cache_shard_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CMATRIX_CACHE_DIR", str(tmp_path))
    block = np.arange(12, dtype=np.float32).reshape(3, 4)
    meta = {"name": "f.w", "rank": 0, "host": "h", "shape": [3, 8], "dtype": "float32", "axis": 1,
            "counts": [4, 4], "quant": None, "quant_axis": 0, "block_shape": [3, 4],
            "nbytes": block.nbytes, "checksum": shardfiles.checksum(block)}
    path = shardfiles.write_shard(meta, block)
    data = path.read_bytes()

    def load() -> None:
        try:
            found, start = shardfiles.read_header(path)
            shardfiles.read_shard(path, found, start)
        except shardfiles.StaleShard as exc:  # what a rank reports; the driver raises CacheError
            raise CMatrixError(str(exc)) from exc

    @FUZZ
    @given(mutations(len(data)))
    def run(edits):
        path.write_bytes(mutate(data, edits))
        outcome("cache shard", load)

    run()


def test_cache_manifests(tmp_path, monkeypatch):
    from cmatrix.ops.cache import _manifest_problem

    monkeypatch.setenv("CMATRIX_CACHE_DIR", str(tmp_path))
    manifest = {"name": "f.w", "shape": [3, 8], "dtype": "float32", "axis": 1, "quant": None,
                "quant_axis": 0, "kind": "numpy", "counts": [4, 4], "checksums": ["sha256:a", "sha256:b"],
                "hosts": ["h", "h"]}
    path = shardfiles.write_manifest(manifest)
    data = path.read_bytes()

    def load() -> None:
        found = shardfiles.read_manifest("f.w")
        problem = _manifest_problem(found)
        if problem:
            raise CMatrixError(problem)

    @FUZZ
    @given(mutations(len(data)))
    def run(edits):
        path.write_bytes(mutate(data, edits))
        outcome("cache manifest", load)

    run()


def test_config_json(tmp_path):
    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
    data = json.dumps(config).encode()

    @FUZZ
    @given(mutations(len(data)))
    def run(edits):
        (tmp_path / "config.json").write_bytes(mutate(data, edits))
        outcome("config.json", lambda: DecoderConfig.from_dir(tmp_path))

    run()


def test_safetensors_index(tmp_path):
    from cmatrix.llm.checkpoint import Checkpoint

    store.save(tmp_path / "a.safetensors#w", store.from_user(np.ones((2, 2), np.float32), "w"))
    data = json.dumps({"metadata": {}, "weight_map": {"w": "a.safetensors"}}).encode()

    @FUZZ
    @given(mutations(len(data)))
    def run(edits):
        (tmp_path / "model.safetensors.index.json").write_bytes(mutate(data, edits))
        outcome("safetensors index", lambda: Checkpoint(tmp_path).get("w"))

    run()


def test_tokenizer_files(tmp_path):
    pytest.importorskip("tokenizers")
    from test_llm_tokenizer import _byte_level, _write_model

    from cmatrix.llm.tokenizer import Tokenizer

    root = _write_model(tmp_path / "m", _byte_level(), template="{{ messages[0]['content'] }}")

    def fuzz(name: str) -> None:
        data = (root / name).read_bytes()

        @FUZZ
        @given(mutations(len(data)))
        def run(edits):
            (root / name).write_bytes(mutate(data, edits))
            outcome(name, lambda: Tokenizer.from_dir(root).apply_chat_template([{"role": "user",
                                                                                  "content": "hi"}]))

        run()
        (root / name).write_bytes(data)

    for name in ("tokenizer_config.json", "tokenizer.json"):
        fuzz(name)


def test_zz_print_the_tally():
    """The counts per reader (shown with pytest -s; the closing notes quote them)."""
    for reader, tally in sorted(TALLY.items()):
        print(f"fuzz {reader}: {sum(tally.values())} cases, {tally['clean error']} clean errors, "
              f"{tally['valid load']} valid loads, {tally['other']} other")
    assert all(t["other"] == 0 for t in TALLY.values())


def test_json_nested_without_end_is_a_clean_error(tmp_path, monkeypatch):
    """Python's json parser recurses: a file of 100 000 '[' must not escape as RecursionError."""
    bomb = "[" * 100000 + "]" * 100000
    (tmp_path / "config.json").write_text(bomb)
    with pytest.raises(CMatrixError):
        DecoderConfig.from_dir(tmp_path)
    monkeypatch.setenv("CMATRIX_CACHE_DIR", str(tmp_path))
    shardfiles.manifest_path("b.w").parent.mkdir(parents=True)
    shardfiles.manifest_path("b.w").write_text(bomb)
    with pytest.raises(CMatrixError):
        shardfiles.read_manifest("b.w")
    pytest.importorskip("tokenizers")
    from cmatrix.llm.tokenizer import _read_json

    (tmp_path / "tokenizer_config.json").write_text(bomb)
    with pytest.raises(CMatrixError):
        _read_json(tmp_path / "tokenizer_config.json")
