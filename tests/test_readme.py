"""README's API example runs as written, on two ranks."""

import re

import pytest
from conftest import ROOT, mpirun

pytestmark = pytest.mark.mpi


def test_readme_api_block_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "readme_api.py"
    checks = """
import numpy as _np
_np.testing.assert_allclose(y, x @ w, rtol=1e-4)
_np.testing.assert_allclose(y2, y, rtol=1e-6)
_np.testing.assert_allclose(s, 2 * w, rtol=1e-6)
assert not _np.any(d)
print("README-OK")
"""
    script.write_text(blocks[0] + checks)
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
