"""README's API example runs as written, on two ranks."""

import re

import pytest
from conftest import ROOT, mpirun

pytestmark = pytest.mark.mpi


def test_readme_api_block_runs(tmp_path):
    script = tmp_path / "readme_api.py"
    checks = """
import numpy as _np
_np.testing.assert_allclose(y, x @ w, rtol=1e-4)
_np.testing.assert_allclose(y2, y, rtol=1e-6)
_np.testing.assert_allclose(s, 2 * w, rtol=1e-6)
assert not _np.any(d)
print("README-OK")
"""
    script.write_text(_block('name="l0.up"') + checks)
    r = mpirun(2, script, timeout=180)
    assert r.returncode == 0, r
    assert "README-OK" in r.stdout, r


def test_readme_cache_block_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if 'cache="save"' in b)
    script = tmp_path / "readme_cache.py"
    checks = """
import numpy as _np
_np.testing.assert_allclose(y, x @ w, rtol=1e-4)
_np.testing.assert_array_equal(back, y)
assert path.endswith("y.bin")
assert list(cl.cached()) == []
print("README-CACHE-OK")
"""
    script.write_text(block + checks)
    env = {"CMATRIX_CACHE_DIR": str(tmp_path / "cache"), "CMATRIX_SHM_DIR": str(tmp_path / "shm")}
    r = mpirun(2, script, env=env, timeout=180)
    assert r.returncode == 0, r
    assert "README-CACHE-OK" in r.stdout, r
    assert not list((tmp_path / "cache").rglob("*.cmshard")), "free(disk=True) left files"


def _block(containing: str) -> str:
    text = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if containing in b)


def _run_block(tmp_path, containing: str, checks: str, marker: str, plain: bool = False) -> None:
    """README's block containing ``containing``, then ``checks`` (which print ``marker``), on 2 ranks."""
    script = tmp_path / "readme_block.py"
    script.write_text(_block(containing) + checks)
    r = mpirun(2, script, timeout=180, plain=plain)
    assert r.returncode == 0, r
    assert marker in r.stdout, r


def test_readme_node_ops_block_runs(tmp_path):
    checks = """
import numpy as _np
_e = _np.exp(h - h.max(axis=1, keepdims=True))
_np.testing.assert_allclose(p, _e / _e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
_np.testing.assert_allclose(a, h / (1 + _np.exp(-h)), rtol=1e-5)
_np.testing.assert_allclose(n, h / _np.sqrt((h ** 2).mean(axis=1, keepdims=True) + 1e-6), rtol=1e-5)
_u = _np.sqrt(2 / _np.pi) * (h + 0.044715 * h ** 3)
_np.testing.assert_allclose(g, 0.5 * h * (1 + _np.tanh(_u)), rtol=1e-5, atol=1e-6)
_ang = _np.arange(5)[:, None] / 10000.0 ** (_np.arange(0, 64, 2) / 64)
_c, _s = _np.cos(_ang), _np.sin(_ang)
_x1, _x2 = h[:, :32], h[:, 32:64]   # head 0: rotate halves
_np.testing.assert_allclose(r[:, :64], _np.hstack([_x1 * _c - _x2 * _s, _x2 * _c + _x1 * _s]),
                            rtol=1e-4, atol=1e-5)
for _h in range(4):                 # query head h reads key/value head h // 2, causal bottom-right
    _sc = r[:, 64 * _h:64 * _h + 64] @ k[:, 64 * (_h // 2):64 * (_h // 2) + 64].T / 8.0
    _sc = _np.where(_np.arange(9)[None, :] <= _np.arange(5)[:, None] + 4, _sc, -_np.inf)
    _p = _np.exp(_sc - _sc.max(axis=1, keepdims=True)); _p /= _p.sum(axis=1, keepdims=True)
    _np.testing.assert_allclose(o[:, 64 * _h:64 * _h + 64], _p @ k[:, 64 * (_h // 2):64 * (_h // 2) + 64],
                                rtol=1e-4, atol=1e-5)
_np.testing.assert_array_equal(kk[:, 64:128], k[:, :64])
_c = h - h.mean(axis=1, keepdims=True)
_np.testing.assert_allclose(ln, _c / _np.sqrt((_c ** 2).mean(axis=1, keepdims=True) + 1e-5),
                            rtol=1e-4, atol=1e-5)
print("README-NODE-OPS-OK")
"""
    _run_block(tmp_path, "cl.rope(", checks, "README-NODE-OPS-OK")


def test_readme_seed_api_block_runs(tmp_path):
    pytest.importorskip("torch")
    checks = """
import torch as _t
_t.testing.assert_close(y, x.T @ w, rtol=1e-4, atol=1e-4)
_t.testing.assert_close(y2, y)
_t.testing.assert_close(s, 2 * w)
print("README-SEED-OK")
"""
    _run_block(tmp_path, "cluster_matrix(", checks, "README-SEED-OK", plain=True)


def test_readme_nn_block_runs(tmp_path):
    pytest.importorskip("torch")
    checks = """
assert swapped == ["0", "2"], swapped
torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
print("README-NN-OK")
"""
    _run_block(tmp_path, "shard_linears(", checks, "README-NN-OK")


def test_readme_llm_block_runs(tmp_path):
    for module in ("torch", "transformers", "tokenizers"):
        pytest.importorskip(module)
    import sys

    sys.path.insert(0, str(ROOT / "jobs"))
    from tiny_llama import build

    path = build(tmp_path / "tiny-llama", num_hidden_layers=2)
    block = _block("cm.llm.load(").replace('"models/tiny-llama"', repr(str(path)))
    assert str(path) in block
    checks = """
assert sum(p["heads"] for p in model.layout()) == model.config.num_heads
assert 0 < len(result.token_ids) <= 32 and "tokens/s" in result.summary()
assert logits.shape == (model.config.vocab_size,) and model.position == 3
print("README-LLM-OK")
"""
    script = tmp_path / "readme_block.py"
    script.write_text(block + checks)
    r = mpirun(2, script, timeout=180)
    assert r.returncode == 0, r
    assert "README-LLM-OK" in r.stdout, r
