"""The seed README's code blocks as tests (tests/jobs/seed_readme.py) on 1, 2 and 4
ranks with mixed backends, plus a check that the job holds the README's text."""

import json
import re

import numpy as np
import pytest
from backend_cases import need
from conftest import JOBS, ROOT, mpirun

pytestmark = pytest.mark.mpi
SEED_README = ROOT.parent / "shared" / "seed" / "cluster_matrix_README.md"
# Blocks the job replaces whole (the cluster lists) and lines it may change (the
# seed's example IPs, placeholder paths).
REPLACED_BLOCKS = ("IP_list = [", "percentages = [", "CPU_GPU_select_list = [", "backend_select_list = [")
REPLACED_LINE = re.compile(r"192\.168\.|path/to/")
REPLACED_MARK = "# replaced:"  # how the job marks the lines that stand in for them


def _stripped(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_the_job_holds_every_python_block_of_the_seed_readme():
    if not SEED_README.is_file():
        pytest.skip(f"the seed README is not beside the repository ({SEED_README})")
    blocks = re.findall(r"```python\n(.*?)```", SEED_README.read_text(), re.S)
    assert len(blocks) >= 10
    job = "\n".join(line for line in _stripped((JOBS / "seed_readme.py").read_text())
                    if REPLACED_MARK not in line)
    checked = 0
    for block in blocks:
        if block.lstrip().startswith(REPLACED_BLOCKS):
            continue
        lines = [line for line in _stripped(block) if not REPLACED_LINE.search(line)]
        assert "\n".join(lines) in job, f"seed README block not in the job as written:\n{block}"
        checked += 1
    assert checked >= 6


def _data(tmp_path, rng):
    import torch

    hidden, inter, tokens = 64, 96, 5
    arrays = {
        "residual": (tokens, hidden), "embedding": (hidden,), "input_ln": (hidden,),
        "post_attn_ln": (hidden,), "mlp_gate": (hidden, inter), "q": (hidden, 32), "k": (hidden, 16),
        "v": (hidden, 16), "add_A": (24, 40), "add_B": (40, 24), "big_A_T": (hidden, tokens),
    }
    for name, shape in arrays.items():
        torch.save(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)), tmp_path / f"{name}.pt")
    return tmp_path


@pytest.mark.parametrize("backends, percentages", [
    (["llama"], [1.0]),
    (["opencl", "torch"], [0.6, 0.4]),
    (["llama", "torch", "opencl", "llama"], [0.35, 0.35, 0.15, 0.15]),  # the seed's own lists
])
def test_seed_readme_blocks_match_torch(tmp_path, backends, percentages):
    need("torch", *backends)
    (tmp_path / "data").mkdir()
    data = _data(tmp_path / "data", np.random.default_rng(len(backends)))
    env = {"CMATRIX_CACHE_DIR": str(tmp_path / "cache"), "CMATRIX_SHM_DIR": str(tmp_path / "shm")}
    config = json.dumps({"backends": backends, "percentages": percentages})
    r = mpirun(len(backends), JOBS / "seed_readme.py", str(data), config, env=env, plain=True, timeout=240)
    assert r.returncode == 0, r
    assert re.search(rf"seed-readme: \d+ checks, 0 failures on {len(backends)} ranks", r.stdout), r
