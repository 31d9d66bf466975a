"""cmatrix.llm on real mpiexec jobs against transformers: random tiny Llama, Qwen2 and Mistral
checkpoints; 1-4 ranks, uneven shares with a zero, mixed backends, quantised weights; the
`generate` command end to end; failures on any rank while loading or decoding."""

import json
import os
import shutil
import sys

import pytest
from backend_cases import need
from conftest import JOBS, ROOT, mpirun, run_cmd

pytestmark = pytest.mark.mpi


def _need(*backend_names):
    """The reference (transformers on torch) and the backends the job runs on."""
    for m in ("transformers", "tokenizers"):
        pytest.importorskip(m)
    need("torch", *backend_names)


@pytest.mark.parametrize("n, weights, names, decoder", [
    (1, [1.0], None, "auto"),
    (2, [0.7, 0.3], None, "auto"),
    # the driver holds no heads, rows or vocabulary
    (3, [0.0, 0.5, 0.5], ["numpy", "torch", "numpy"], "auto"),
    (4, [0.4, 0.3, 0.2, 0.1], ["torch", "numpy", "ggml", "opencl"], "auto"),
    (2, [0.5, 0.5], ["torch", "ggml"], "torch"),  # the torch path (GPU ranks' own) on the CPU
    (2, [0.6, 0.4], ["ggml", "ggml"], "numpy"),  # the numpy reference path on ggml ranks
])
def test_decoder_matches_transformers(n, weights, names, decoder, tmp_path):
    """Every rank-side decoder path (CMATRIX_DECODER) against transformers."""
    _need(*(names or ()))
    r = mpirun(n, JOBS / "llm_job.py", str(tmp_path), json.dumps(weights), json.dumps(names), timeout=300,
               env={"CMATRIX_DECODER": decoder})
    assert r.returncode == 0, r
    assert f"llm: 12 checks, 0 failures on {n} ranks" in r.stdout, r


@pytest.mark.parametrize("n, weights, names, decoder", [
    (3, [0.4, 0.3, 0.3], ["numpy", "torch", "ggml"], "auto"),
    (2, [0.5, 0.5], ["torch", "ggml"], "torch"),
    (2, [0.6, 0.4], ["ggml", "numpy"], "numpy"),
])
def test_pipeline_stages_match_transformers(n, weights, names, decoder, tmp_path):
    """parallel='pp' on one host: a stage per rank, the hidden state passed rank to rank; every
    decoder path against transformers (the prefill, the K/V cache, 32 greedy tokens)."""
    _need(*names)
    r = mpirun(n, JOBS / "llm_job.py", str(tmp_path), json.dumps(weights), json.dumps(names), timeout=300,
               env={"CMATRIX_DECODER": decoder, "LLM_JOB_PARALLEL": "pp"})
    assert r.returncode == 0, r
    assert f"llm: 15 checks, 0 failures on {n} ranks" in r.stdout, r


@pytest.mark.parametrize("quant, names, checks, decoder", [
    # the numpy path: the blocks dequantised tile by tile, the reference's rounding: within 1e-4
    ("q8_0", ["numpy", "torch"], 4, "numpy"),
    ("q4_0", ["torch", "numpy"], 4, "numpy"),
    ("q8_0", ["opencl", "numpy"], 4, "numpy"),  # OpenCL's own kernels over its blocks
    # ggml's kernels (on ggml ranks, and over numpy and CPU torch ranks' own blocks) also
    # round the activations: the documented bound
    ("q8_0", ["ggml", "torch"], 1, "auto"),
    ("q4_0", ["ggml", "ggml"], 1, "auto"),
    ("q4_0", ["numpy", "torch"], 1, "auto"),
    # a GPU torch rank's blocks (kept on its device, dequantised there a tile at a time), here on
    # the CPU: through the torch decoder exactly, and borrowed by ggml graphs
    ("q4_0", ["torch", "torch"], 4, "torch+device-blocks"),
    ("q8_0", ["torch", "numpy"], 1, "auto+device-blocks"),
])
def test_quantised_decoder(quant, names, checks, decoder, tmp_path):
    _need(*names)
    decoder, _, blocks = decoder.partition("+")
    env = {"CMATRIX_DECODER": decoder, **({"CMATRIX_TORCH_BLOCKS": "device"} if blocks else {})}
    r = mpirun(2, JOBS / "llm_job.py", str(tmp_path), "[0.5, 0.5]", json.dumps(names), quant, timeout=300,
               env=env)
    assert r.returncode == 0, r
    assert f"llm: {checks} checks, 0 failures on 2 ranks" in r.stdout, r


@pytest.mark.parametrize("n, names, decoder", [
    (1, ["ggml"], "auto"),
    (2, ["ggml", "torch"], "auto"),
    (2, ["torch", "numpy"], "auto"),  # ggml graphs over a CPU torch rank's own 16-bit weights
    (2, ["numpy", "torch"], "torch"),
])
def test_graph_decoder_cache_growth_16_bit_weights_and_profile(n, names, decoder, tmp_path):
    """ggml ranks' whole-block graphs past the cache's first capacity, float16/bfloat16 weights
    kept 16-bit on the ranks, every rank's decode profile, and 16-bit partial sums between
    ranks, also beyond float16's range (tests/jobs/llm_graph_job.py)."""
    _need(*names)
    r = mpirun(n, JOBS / "llm_graph_job.py", str(tmp_path), json.dumps(names), timeout=300,
               env={"CMATRIX_DECODER": decoder})
    assert r.returncode == 0, r
    checks = 7 + (3 if n > 1 else 0) + (names[0] in ("numpy", "torch"))  # wire checks; borrowing
    checks += 2 * (names[0] == "torch" and decoder == "auto")  # 16-bit kept on CPU torch, borrowed
    assert f"graph: {checks} checks, 0 failures on {n} ranks" in r.stdout, r


def test_generate_command_streams_what_transformers_generates(tmp_path):
    """`python -m cmatrix generate` on 2 ranks: the streamed text is transformers' greedy
    continuation of the same prompt, the speed line reports tokens/s and bytes/token, and
    --profile adds each rank's decode time by phase."""
    _need()
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "jobs"))
    from tiny_llama import build

    path = build(tmp_path / "tiny", vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, scale=4.0)
    prompt = "Old computers, together"
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(prompt).ids
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    want = Tokenizer.from_file(str(path / "tokenizer.json")).decode([t for t in out if t != 2])
    from conftest import job_env

    from cmatrix.engine import launch

    cmd = launch.command(2, [sys.executable, "-m", "cmatrix", "generate", "--model", str(path),
                             "--prompt", prompt, "--no-chat", "--max-new-tokens", "12",
                             "--weights", "0.6,0.4", "--backends", "ggml,numpy", "--profile"], None)
    r = run_cmd(cmd, job_env(), timeout=180)
    assert r.returncode == 0, r
    assert r.stdout.rstrip("\n") == want, r
    assert "prefill:" in r.stderr and "tokens/s" in r.stderr and "KiB/token" in r.stderr, r
    table = r.stderr[r.stderr.index("decode profile"):].splitlines()
    assert all(p in table[1] for p in ("matmul", "attention", "collectives", "other")), r
    rows = [line.split() for line in table[2:4]]
    assert [row[0] for row in rows] == ["0", "1"], r
    assert "ggml graphs" in table[2] and "ggml on numpy" in table[3], r
    assert all(int(row[-7]) >= 1 and float(row[-6]) > 0 for row in rows), r  # steps, ms/token


def test_generate_command_runs_a_gguf_file_as_transformers_does(tmp_path):
    """`cmatrix generate --model tiny.gguf` on 2 ranks (OpenCL's and CPU torch's own q4_0 blocks,
    the exact path): the file's tokenizer reads the prompt and the text is transformers' greedy
    continuation, transformers reading the same file."""
    _need("torch", "opencl")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "jobs"))
    from gguf_export import export
    from tiny_llama import build

    path = build(tmp_path / "tiny", vocab_size=320, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, scale=4.0)
    file = export(path, tmp_path / "tiny-q4_0.gguf", "q4_0")
    prompt = "Old computers, together"
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    ids = tok.encode(prompt)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    want = tok.decode([t for t in out if t != 2])
    from conftest import job_env

    from cmatrix.engine import launch

    cmd = launch.command(2, [sys.executable, "-m", "cmatrix", "generate", "--model", str(file),
                             "--prompt", prompt, "--no-chat", "--max-new-tokens", "12",
                             "--weights", "0.5,0.5", "--backends", "opencl,torch"], None)
    r = run_cmd(cmd, {**job_env(), "CMATRIX_DECODER": "numpy"}, timeout=180)
    assert r.returncode == 0, r
    assert r.stdout.rstrip("\n") == want, r
    assert f"prefill: {len(ids)} tokens" in r.stderr, r
    assert "rank 0: numpy+opencl (q4_0), rank 1: numpy+torch (q4_0)" in r.stderr, r  # blocks as in the file
    assert f"ranks 0, 1 read their weights from their own copy of {file}" in r.stderr, r


@pytest.mark.parametrize("situation", ["same", "gguf", "differs"])
def test_ranks_read_their_blocks_from_their_own_copy(situation, tmp_path):
    """local_weights: every rank with the driver's copy at the same path reads its own blocks
    (a folder, or a GGUF file); a rank whose copy differs (rank 1 sees another model there,
    bind-mounted in a mount namespace of its own, as on another host) is sent its blocks."""
    _need()
    sys.path.insert(0, str(ROOT / "jobs"))
    from conftest import job_env
    from tiny_llama import build

    from cmatrix.engine import launch

    settings = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, scale=4.0)
    path = build(tmp_path / "model", **settings)
    if situation == "gguf":
        pytest.importorskip("gguf")
        from gguf_export import export

        path = export(path, tmp_path / "model-q8_0.gguf", "q8_0")
    job = [sys.executable, str(JOBS / "llm_local_job.py"), str(path), "same" if situation != "differs"
           else "differs"]
    cmd = launch.command(2, job)
    if situation == "differs":
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.skip("needs root and unshare(1) to give one rank a mount namespace of its own")
        other = build(tmp_path / "other", seed=1, **settings)
        cmd = launch.command(1, job) + [":", "-n", "1", "unshare", "-m", "sh", "-c",
                                        'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(other),
                                        str(path), *job]
    r = run_cmd(cmd, job_env(), timeout=240)
    assert r.returncode == 0, r
    checks = 9 if situation != "differs" else 3
    assert f"local: {checks} checks, 0 failures on 2 ranks" in r.stdout, r


def test_generate_command_refuses_a_missing_model(tmp_path):
    from conftest import job_env

    from cmatrix.engine import launch

    cmd = launch.command(2, [sys.executable, "-m", "cmatrix", "generate", "--model", str(tmp_path / "none")],
                         None)
    r = run_cmd(cmd, job_env(), timeout=120)
    assert r.returncode == 2, r
    assert "config.json: not found" in r.stderr, r


@pytest.mark.parametrize("faults", [
    "llm_load:load:2,llm_step:prepare:1,llm_step:attention:1,llm_step:mlp:2,llm_step:logits:0",
])
def test_a_failing_rank_reaches_the_driver_and_the_decoder_recovers(faults, tmp_path):
    _need("ggml")
    r = mpirun(3, JOBS / "llm_fault.py", str(tmp_path), env={"CMATRIX_FAULT": faults}, timeout=180)
    assert r.returncode == 0, r
    assert r.stdout.count("CAUGHT") == 5 and "RECOVERED" in r.stdout, r


def test_a_failure_among_the_ranks_that_hold_work_skips_the_one_that_holds_none(tmp_path):
    """Rank 1 has no share, so the steps run on a communicator of ranks 0 and 2: a failure there
    still reaches the driver, and rank 1, never in those steps, is none the wiser."""
    _need("ggml")
    env = {"CMATRIX_FAULT": "llm_step:attention:2,llm_step:logits:0", "LLM_FAULT_WEIGHTS": "0.5,0,0.5"}
    r = mpirun(3, JOBS / "llm_fault.py", str(tmp_path), env=env, timeout=180)
    assert r.returncode == 0, r
    assert r.stdout.count("CAUGHT") == 2 and "RECOVERED" in r.stdout, r


def test_a_failing_stage_reaches_the_driver_and_the_pipeline_recovers(tmp_path):
    """In pipeline stages the failure flags travel with the hidden state and the logits'
    gather names the failed ranks: a failure in the first stage, in the middle one (after the
    first ran) and on the driver's stage each reach the driver with its rank and phase."""
    _need("ggml")
    env = {"CMATRIX_FAULT": "llm_step:attention:1,llm_step:mlp:2,llm_step:logits:0",
           "LLM_FAULT_PARALLEL": "pp"}
    r = mpirun(3, JOBS / "llm_fault.py", str(tmp_path), env=env, timeout=180)
    assert r.returncode == 0, r
    assert r.stdout.count("CAUGHT") == 3 and "RECOVERED" in r.stdout, r


def test_a_crashed_rank_ends_the_job_without_a_hang(tmp_path):
    _need("ggml")
    r = mpirun(2, JOBS / "llm_fault.py", str(tmp_path), env={"CMATRIX_FAULT": "llm_step:mlp:1:exit"},
               timeout=120)
    assert r.returncode != 0, r
    # the crash ended the job, not an error of the job itself
    assert "RECOVERED" not in r.stdout and "Traceback" not in r.stderr + r.stdout, r


def test_a_restarted_job_loads_the_decoder_from_the_nodes_disks(tmp_path):
    _need()
    sys.path.insert(0, str(ROOT / "jobs"))
    from tiny_llama import build

    path = build(tmp_path / "tiny", vocab_size=300, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tokenizer=False)
    env = {"CMATRIX_CACHE_DIR": str(tmp_path / "cache")}
    out = str(tmp_path / "logits.npy")
    for mode in ("save", "load"):
        r = mpirun(3, JOBS / "llm_cache_job.py", str(path), mode, out, env=env, timeout=180)
        assert r.returncode == 0, r
        assert f"llm-cache: {mode} ok on 3 ranks" in r.stdout, r
    assert len(list((tmp_path / "cache").rglob("rank2.cmshard"))) == 2 * 4 + 1  # 4 per layer + LM head


def test_generate_command_refuses_bad_cluster_options(tmp_path):
    from conftest import job_env

    from cmatrix.engine import launch

    cmd = launch.command(2, [sys.executable, "-m", "cmatrix", "generate", "--model", str(tmp_path),
                             "--weights", "0.5"], None)
    r = run_cmd(cmd, job_env(), timeout=120)
    assert r.returncode == 2, r
    assert "cmatrix generate:" in r.stderr and "weights" in r.stderr, r


def test_ctrl_c_stops_generation_in_one_line_with_the_partial_summary(tmp_path):
    """Ctrl-C reaches every rank; the driver stops between decode steps, prints one line and
    the summary of what it generated, and the job exits 130 with no traceback."""
    _need()
    import os
    import signal
    import subprocess

    from conftest import job_env

    from cmatrix.engine import launch

    sys.path.insert(0, str(ROOT / "jobs"))
    from tiny_llama import build

    path = build(tmp_path / "tiny", vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=1 << 20)
    argv = [sys.executable, "-m", "cmatrix", "generate", "--model", str(path), "--prompt", "hello",
            "--no-chat", "--max-new-tokens", str(1 << 19)]
    proc = subprocess.Popen(launch.command(2, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=job_env(), start_new_session=True)
    try:
        assert proc.stdout.read(1), "no text was streamed"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "cmatrix: stopped by the user after" in err and "stop: interrupted" in err, err
    assert "Traceback" not in err and "Abort" not in err, err


def _memory_cgroup(tmp_name: str, limit_bytes: int = 250 << 20):
    """A new memory cgroup (v1 or v2) below this process's, or None where that cannot be made."""
    import os
    from pathlib import Path

    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, limit = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
        elif controllers == "" and "memory" in Path("/sys/fs/cgroup/cgroup.controllers").read_text():
            base, limit = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
        else:
            continue
        group = base / f"{tmp_name}-{os.getpid()}"
        try:
            group.mkdir()
            (group / limit).write_text(str(limit_bytes))
        except OSError:
            if group.exists():
                group.rmdir()
            return None
        return group
    return None


def test_a_share_that_does_not_fit_a_ranks_memory_is_refused_before_loading(tmp_path):
    """Rank 1 is held to 250 MB by a memory cgroup; a 342 MB float32 model split equally does
    not fit it. The load is refused before any data moves, naming rank 1 and suggesting
    shares; those shares load and generate."""
    _need()
    group = _memory_cgroup("cmatrix-test")
    if group is None:
        pytest.skip("needs root and a memory cgroup this test can create (cgroup v1 or v2)")
    try:
        sys.path.insert(0, str(ROOT / "jobs"))
        from tiny_llama import build

        path = build(tmp_path / "model", vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                     num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, tokenizer=False)
        r = mpirun(2, JOBS / "llm_memory_job.py", str(path), plain=True, timeout=300,
                   env={"CMATRIX_TEST_CGROUP": str(group)})
    finally:
        group.rmdir()
    assert r.returncode == 0, r
    refusal = next(line for line in r.stdout.splitlines() if line.startswith("REFUSED:"))
    assert "rank 1 (numpy)" in refusal and "free" in refusal and "rank 0 (" not in refusal, r
    loaded = next(line for line in r.stdout.splitlines() if line.startswith("LOADED"))
    assert loaded.endswith("generated 4"), r


def test_a_q4_0_model_larger_than_the_ranks_memory_limits_loads_and_generates(tmp_path):
    """A 644 MB float32 model on two ranks held to 300 MB and 200 MB by memory cgroups: as
    q4_0 every rank keeps its blocks (the driver reads and sends one tensor at a time), so
    it loads and generates."""
    _need()
    groups = [_memory_cgroup("cmatrix-test-r0", 300 << 20), _memory_cgroup("cmatrix-test-r1", 200 << 20)]
    if None in groups:
        for g in groups:
            if g is not None:
                g.rmdir()
        pytest.skip("needs root and memory cgroups this test can create (cgroup v1 or v2)")
    try:
        sys.path.insert(0, str(ROOT / "jobs"))
        from tiny_llama import build

        path = build(tmp_path / "model", vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                     num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8, tokenizer=False)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        assert size > 500 << 20  # more than the two limits together
        r = mpirun(2, JOBS / "llm_small_memory_job.py", str(path), plain=True, timeout=300,
                   env={"CMATRIX_TEST_CGROUPS": ",".join(map(str, groups))})
    finally:
        for g in groups:
            g.rmdir()
    assert r.returncode == 0, r
    assert "LOADED q4_0, generated 4" in r.stdout, r
