"""Shared fixtures and helpers of the in-process cmatrix.llm tests (tiny random checkpoints
written by jobs/tiny_llama.py, a one-rank cluster in the pytest process).

The test modules star-import it: fixtures, helpers and the names they use."""
# ruff: noqa: F401

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")

import cmatrix as cm  # noqa: E402
from cmatrix.llm import layout as lay  # noqa: E402
from cmatrix.llm.checkpoint import Checkpoint  # noqa: E402
from cmatrix.llm.config import DecoderConfig  # noqa: E402
from cmatrix.llm.generate import GenerationResult, prompt_ids  # noqa: E402
from cmatrix.llm.tokenizer import Tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
from tiny_llama import build  # noqa: E402

# The byte-level tokenizer needs 256 byte tokens + 3 specials + merges, so the vocabulary
# is a little larger than the rest of the model.
VOCAB = 320
TINY = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, scale=8.0)
IDS = [5, 17, 200, 3, 99, 42, 7, 311]
TOL = 1e-4


# ---- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cl():
    return cm.init()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random llama checkpoint with tokenizer and chat template."""
    return build(tmp_path_factory.mktemp("tiny"), **TINY)


@pytest.fixture(scope="module")
def model(cl, tiny):
    m = cm.llm.load(cl, tiny)
    yield m
    m.close()


@pytest.fixture(scope="module")
def short(cl, tiny, tmp_path_factory):
    """The tiny model with max_position_embeddings 8."""
    path = tmp_path_factory.mktemp("short")
    for f in tiny.iterdir():
        shutil.copy(f, path / f.name)
    edit_config(path, max_position_embeddings=8)
    m = cm.llm.load(cl, path)
    yield m
    m.close()


@pytest.fixture(scope="module")
def ref_logits(tiny):
    """transformers' logits of every position of IDS."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor([IDS])).logits[0].numpy()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CMATRIX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CMATRIX_SHM_DIR", str(tmp_path / "shm"))
    return tmp_path / "cache"


def edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


def copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def tensors(path: Path) -> dict[str, np.ndarray]:
    return safetensors_numpy.load_file(str(path / "model.safetensors"))


def refused(cl, fn, match, error=cm.InputError):
    """fn() raises ``error`` matching ``match`` and sends no command and no data."""
    before = cl.stats()
    with pytest.raises(error, match=match) as info:
        fn()
    assert cl.stats() == before, "a refused call sent a command or data"
    return info.value
