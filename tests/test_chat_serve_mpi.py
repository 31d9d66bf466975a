"""`cmatrix chat` and `cmatrix serve` on real mpiexec jobs, started through `cmatrix launch`:
turns that prefill only their new tokens, Ctrl-C that stops an answer and keeps the session,
and the OpenAI-compatible server driven by the official openai client (streaming and not)
and by raw HTTP for the errors, the API key, queueing and cancellation."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, job_env, run_cmd

pytestmark = pytest.mark.mpi

for _module in ("torch", "transformers", "tokenizers", "jinja2"):
    pytest.importorskip(_module)

PREFILL = re.compile(r"\[prefill: (\d+) tokens(?: \(\+(\d+) cached\))?")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "jobs"))
    from tiny_llama import build

    return build(tmp_path_factory.mktemp("chat") / "tiny", vocab_size=320, hidden_size=64,
                 intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 scale=8.0, max_position_embeddings=1 << 16)


def launch_argv(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "cmatrix", "launch", "-n", str(n), *args]


def test_chat_turns_prefill_only_their_new_tokens(tiny):
    lines = "Hello there\nTell me more\n/system Be brief\nHello there\n/bogus\n/reset\nHello there\n"
    proc = subprocess.run(launch_argv(2, "chat", "--model", str(tiny), "--max-new-tokens", "8"),
                          input=lines, capture_output=True, text=True, env=job_env(), cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr
    turns = [(int(a), int(b or 0)) for a, b in PREFILL.findall(proc.stdout)]
    assert len(turns) == 4, proc.stdout + proc.stderr
    (new1, cached1), (new2, cached2), (new3, cached3), (new4, cached4) = turns
    assert cached1 == 0
    # the second turn runs only its own text: the first turn's prompt and answer are cached
    # (all but the answer's last token, which was sampled and never run)
    assert cached2 == new1 + 8 - 1, proc.stdout
    assert new2 < new1 + 8, proc.stdout
    # a new system message starts a new conversation: the system text is new, so more runs
    assert new3 > 0
    assert "(new conversation, system: Be brief)" in proc.stdout
    assert "unknown command /bogus" in proc.stdout
    # after /reset the conversation of the third turn starts again with the same message: its
    # whole prompt is cached but the last token (run again for its logits)
    assert "(new conversation)" in proc.stdout
    assert (new4, cached4) == (1, new3 + cached3 - 1), proc.stdout
    assert "Traceback" not in proc.stderr


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_session(tiny, tmp_path):
    env = job_env({"CMATRIX_JOB_DIR": str(tmp_path)})
    # --ignore-eos: the random model would end this answer after 313 tokens (about 0.15 s)
    proc = subprocess.Popen(launch_argv(2, "chat", "--model", str(tiny), "--max-new-tokens", str(1 << 15),
                                        "--ignore-eos"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=ROOT, start_new_session=True)
    try:
        proc.stdin.write(b"Tell me a long story\n")
        proc.stdin.flush()
        assert proc.stdout.read(4), "no answer was streamed"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        time.sleep(1.0)
        out, err = proc.communicate(b"/quit\n", timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = out.decode(errors="replace"), err.decode()
    assert proc.returncode == 0, err
    assert "stop: interrupted] (stopped)" in out, out
    assert "Traceback" not in err and "Abort" not in err, err


def test_chat_refuses_a_model_without_a_chat_template_before_loading(tiny, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    r = run_cmd(launch_argv(2, "chat", "--model", str(plain)), env=job_env(), timeout=120)
    assert r.returncode == 2, r
    assert "no chat template" in r.stderr and "--no-chat" in r.stderr, r
    assert "layers on 2 rank(s)" not in r.stderr, r  # nothing was loaded


def start_server(n: int, model, *args: str, env: dict | None = None):
    """`cmatrix launch -n N serve` in the background (see jobs/serve_process.py)."""
    sys.path.insert(0, str(ROOT / "jobs"))
    from serve_process import ServeProcess

    try:
        return ServeProcess(n, model, *args, env=job_env(env))
    except RuntimeError as exc:
        pytest.fail(str(exc))


KEY = "test-key-1234"


@pytest.fixture(scope="module")
def server(tiny):
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    s = start_server(2, tiny, "--name", "tiny-chat", env={"CMATRIX_API_KEY": KEY})
    yield s
    status = s.stop()
    assert status == 0, s.log
    assert "cmatrix serve: stopping" in s.log and "Traceback" not in s.log, s.log


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_chat_streaming_and_not_agree(client):
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    whole = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert whole.model == "tiny-chat" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same answer, streamed
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    # the same prompt again: all but its last token come from the ranks' caches
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_a_conversation_that_goes_on_reuses_the_cache(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == first.usage.prompt_tokens + 6 - 1
    assert second.usage.prompt_tokens - cached < first.usage.prompt_tokens


def test_text_completions_with_seed_and_stop(client):
    def ask(seed, **kw):
        return client.completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=1.0,
                                         seed=seed, **kw)

    # a seed whose sample runs the whole 10 tokens (a random model may sample its end token)
    seed = next(seed for seed in range(7, 40) if ask(seed).usage.completion_tokens == 10)
    a, b, c = ask(seed), ask(seed), ask(seed + 100)
    assert a.choices[0].text == b.choices[0].text  # the same seed, the same sample
    assert a.choices[0].text != c.choices[0].text
    assert a.object == "text_completion" and a.choices[0].finish_reason == "length"
    stop = a.choices[0].text[3:5]
    cut = ask(seed, stop=[stop])
    assert cut.choices[0].text == a.choices[0].text[:a.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in ask(seed, stream=True) if ch.choices)
    assert streamed == a.choices[0].text


def test_models_health_and_cluster(server, client):
    import httpx

    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/health", headers=auth).json()["status"] == "ok"
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    board = httpx.get(server.url + "/cmatrix/cluster", headers=auth).json()
    assert board["model"] == "tiny-chat" and len(board["ranks"]) == 2
    for rank in board["ranks"]:
        assert rank["host"] and rank["backend"] == "numpy" and rank["share"] == 0.5
        assert 0 < rank["memory_used"] < rank["memory"]
        assert rank["compute_ms_per_token"] > 0 and rank["bytes_sent_per_token"] > 0
    # the slowest rank's compute time over the mean; shares given, so no re-plans
    assert board["imbalance"] >= 1.0 and board["rebalances"] == 0 and board["last_rebalance"] is None
    page = httpx.get(server.url + "/", headers=auth)
    assert page.status_code == 200 and "tiny-chat" in page.text and "<table" in page.text


def test_errors_over_raw_http(server):
    import httpx

    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("GET", "/"),
                         ("POST", "/v1/chat/completions"), ("GET", "/cmatrix/cluster")):
        r = httpx.request(method, server.url + path)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/").headers["www-authenticate"].startswith("Basic")
    assert httpx.get(server.url + "/health", auth=("me", KEY)).status_code == 200
    assert httpx.get(server.url + "/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    chat = server.url + "/v1/chat/completions"
    r = httpx.post(chat, headers={**auth, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    assert httpx.post(chat, headers=auth, content=b"{}").status_code == 415
    r = httpx.post(chat, headers=auth, json={"messages": [{"role": "user", "content": "x"}], "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(chat, headers=auth, json={"messages": [{"role": "user", "content": "a" * 70000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(server.url + "/v2/nothing", headers=auth).status_code == 404
    assert httpx.get(chat, headers=auth).status_code == 405


def test_requests_queue_and_a_client_that_leaves_cancels_its_generation(server, client):
    import httpx

    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "Talk forever"}], "max_tokens": 30000, "stream": True,
            "temperature": 0}  # greedy: this prompt's answer runs long, no end token comes
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=auth, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # the connection is closed: the next requests (two at once: one waits for the other) are
    # answered, long before 30000 tokens could have been generated
    results: list = []

    def ask() -> None:
        results.append(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=4, temperature=0))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and all(r.usage.completion_tokens == 4 for r in results)
    assert re.search(r"\(chat\): .*stop: cancelled", server.log), server.log
    assert httpx.get(server.url + "/health", headers=auth).json()["busy"] is False


def test_serve_refuses_other_addresses_without_a_key_before_loading(tiny):
    pytest.importorskip("uvicorn")
    env = job_env()
    env.pop("CMATRIX_API_KEY", None)
    r = run_cmd(launch_argv(1, "serve", "--model", str(tiny), "--host", "0.0.0.0"), env=env, timeout=120)
    assert r.returncode == 2, r
    assert "--host 0.0.0.0 lets other computers in" in r.stderr and "API key" in r.stderr, r
    assert "layers on" not in r.stderr, r


def test_launch_runs_doctor_and_generate_with_an_open_mpi_style_hostfile(tiny, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    r = run_cmd(launch_argv(2, "--hostfile", str(hosts), "doctor"), env=job_env(), timeout=120)
    assert r.returncode == 0, r
    assert r.stdout.count("numpy") >= 2, r
    hosts.write_text("localhost:2\n")
    r = run_cmd(launch_argv(2, "--hostfile", str(hosts), "generate", "--model", str(tiny), "--prompt", "hi",
                            "--max-new-tokens", "3"), env=job_env({"CMATRIX_PROGRESS": "1",
                                                                   "CMATRIX_PROGRESS_MB": "0"}), timeout=120)
    assert r.returncode == 0, r
    assert "decode: 3 tokens" in r.stderr, r
    # one bar for the whole load, none per tensor
    assert "loading tiny" in r.stderr and "send llm" not in r.stderr, r


def test_readme_openai_example_runs_against_the_server(server):
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "OpenAI(base_url" in b)
    assert "http://127.0.0.1:8000/v1" in block
    script = block.replace("http://127.0.0.1:8000", server.url).replace("unused-on-loopback", KEY)
    r = run_cmd([sys.executable, "-c", script], env=job_env(), timeout=120)
    assert r.returncode == 0 and r.stdout.strip(), r
