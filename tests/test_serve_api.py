"""cmatrix serve's parts without a server or MPI: OpenAI request checking and response shapes,
the chat transcript that keeps an answer's own tokens, the API key check, and the one progress bar."""

from __future__ import annotations

import base64
import io
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from cmatrix.engine import progress  # noqa: E402
from cmatrix.errors import InputError  # noqa: E402
from cmatrix.llm.chat import Transcript  # noqa: E402
from cmatrix.llm.generate import GenerationResult  # noqa: E402
from cmatrix.llm.tokenizer import Tokenizer  # noqa: E402
from cmatrix.serve import is_loopback, listen, openai_api  # noqa: E402
from cmatrix.serve.openai_api import ApiError  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "jobs"))
    from tiny_llama import write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, 320)
    return SimpleNamespace(tokenizer=Tokenizer.from_dir(folder),
                           config=SimpleNamespace(max_positions=64, vocab_size=320))


def _refused(body, kind="chat", model=None, positions=64) -> ApiError:
    with pytest.raises(ApiError) as info:
        openai_api.parse(body, kind, model, positions)
    return info.value


def test_chat_request_is_rendered_and_tokenised(model):
    body = {"model": "anything", "messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5, "temperature": 0, "seed": 3, "stop": "x", "stream": True,
            "stream_options": {"include_usage": True}}
    c = openai_api.parse(body, "chat", model, 64)
    assert c.text == model.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert c.ids == model.tokenizer.encode(c.text, add_special_tokens=False)
    assert c.options == {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": 3,
                         "stop_strings": ["x"]}
    assert c.stream and c.include_usage and c.ident.startswith("chatcmpl-")


def test_max_tokens_defaults_to_and_is_capped_by_the_room_left(model):
    c = openai_api.parse({"messages": [{"role": "user", "content": "hello"}]}, "chat", model, 64)
    assert c.options["max_new_tokens"] == 64 - len(c.ids)
    body = {"prompt": "hello", "max_tokens": None, "n": None, "stream": None}
    c = openai_api.parse(body, "text", model, 64)
    assert c.ids == model.tokenizer.encode("hello")
    assert c.options["max_new_tokens"] == 16 and not c.stream  # OpenAI's default for completions
    c = openai_api.parse({"prompt": ["hello"], "max_tokens": 1000}, "text", model, 64)
    assert c.options["max_new_tokens"] == 64 - len(c.ids)
    assert openai_api.parse({"prompt": [5, 6, 7]}, "text", model, 64).ids == [5, 6, 7]


def test_bad_requests_get_a_400_naming_the_field(model):
    cases = [
        ([], None), ({"messages": []}, "messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": "high"}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "seed"),
        ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed"),
        ({"messages": [{"role": "user", "content": "x"}], "best_of": 2}, "best_of"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"messages": [{"role": "user", "content": "x"}], "wat": 1}, "wat"),
    ]
    for body, param in cases:
        error = _refused(body, model=model)
        assert error.status == 400 and error.param == param, (body, error.message)
        assert error.body()["error"]["type"] == "invalid_request_error"
    assert _refused({"prompt": ""}, "text", model).param == "prompt"
    assert _refused({"prompt": [1.5]}, "text", model).param == "prompt"
    assert "[0, 320)" in _refused({"prompt": [5, 320]}, "text", model).message


def test_a_prompt_that_fills_the_context_is_refused_with_its_length(model):
    error = _refused({"messages": [{"role": "user", "content": "word " * 40}]}, model=model, positions=32)
    assert error.status == 400 and error.code == "context_length_exceeded"
    assert "tokens" in error.message and "32" in error.message


def test_a_model_without_chat_template_refuses_chat_but_completes_text(model):
    plain = SimpleNamespace(tokenizer=Tokenizer(model.tokenizer._tok), config=model.config)
    assert "chat template" in _refused({"messages": [{"role": "user", "content": "x"}]}, model=plain).message
    assert openai_api.parse({"prompt": "x"}, "text", plain, 64).ids


def test_responses_and_chunks_have_the_api_shape(model):
    c = openai_api.parse({"messages": [{"role": "user", "content": "x"}]}, "chat", model, 64)
    result = GenerationResult(text="ab", token_ids=[1, 2], prompt_tokens=9, stop_reason="stop_token",
                              cached_tokens=4)
    body = openai_api.response(c, "m", "ab", result)
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "ab"},
                                "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
                             "prompt_tokens_details": {"cached_tokens": 4}}
    first = openai_api.chunk(c, "m", "a", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    last = openai_api.chunk(c, "m", None, finish="length")
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert openai_api.chunk(c, "m", usage_of=result)["choices"] == []
    t = openai_api.parse({"prompt": "x"}, "text", model, 64)
    assert openai_api.response(t, "m", "ab", result)["choices"][0]["text"] == "ab"
    assert openai_api.chunk(t, "m", "a")["object"] == "text_completion"


def test_the_transcript_continues_with_the_answers_own_tokens(model):
    tok = model.tokenizer
    transcript = Transcript(tok)
    first = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    ids = transcript.ids_for(first)
    assert ids == tok.encode(first, add_special_tokens=False)
    word = next(w for i in sorted(tok._tok.get_vocab().values())
                if (w := tok.decode([i])).isalpha() and len(w) > 2
                and tok.encode(w, add_special_tokens=False) == [i])
    answer = tok.encode(word[0], add_special_tokens=False) + tok.encode(word[1:], add_special_tokens=False)
    result = GenerationResult(text=tok.decode(answer), token_ids=answer, prompt_tokens=len(ids),
                              stop_reason="stop_token")
    transcript.record(first, ids, result)
    second = tok.apply_chat_template([{"role": "user", "content": "hello"},
                                      {"role": "assistant", "content": result.text},
                                      {"role": "user", "content": "more"}])
    continued = transcript.ids_for(second)
    # the answer's own tokens, though its text tokenises as one token when encoded afresh
    assert continued[:len(ids) + len(answer)] == ids + answer
    fresh = tok.encode(second, add_special_tokens=False)
    assert continued != fresh
    assert tok.decode(continued, skip_special_tokens=False) == tok.decode(fresh, skip_special_tokens=False)
    # another conversation: tokenised from the start
    other = tok.apply_chat_template([{"role": "user", "content": "bye"}])
    assert transcript.ids_for(other) == tok.encode(other, add_special_tokens=False)
    # an answer cut at a stop string: its tokens are not its text, so the transcript is dropped
    transcript.record(first, ids, GenerationResult(text=word[0], token_ids=answer, prompt_tokens=len(ids),
                                                   stop_reason="stop_string"))
    assert transcript.ids == [] and transcript.ids_for(second) == tok.encode(second, add_special_tokens=False)


def test_listening_beyond_loopback_needs_a_key_and_a_busy_port_is_named():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(InputError, match="API key"):
        listen("0.0.0.0", 0, None)
    sock = listen("127.0.0.1", 0, None)
    try:
        with pytest.raises(InputError, match="cannot listen on 127.0.0.1:.*another server"):
            listen("127.0.0.1", sock.getsockname()[1], None)
    finally:
        sock.close()
    with pytest.raises(InputError, match="--port"):
        listen("127.0.0.1", 70000, None)


def test_the_api_key_is_checked_as_bearer_or_basic_password():
    pytest.importorskip("starlette")
    from cmatrix.serve.app import ApiKey

    gate = ApiKey(None, "s3cret")

    def headers(value):
        return [(b"authorization", value.encode())]

    assert gate.allowed(headers("Bearer s3cret"))
    assert gate.allowed(headers("Basic " + base64.b64encode(b"anyone:s3cret").decode()))
    assert not gate.allowed(headers("Bearer s3cre"))
    assert not gate.allowed(headers("Basic " + base64.b64encode(b"s3cret:").decode()))
    assert not gate.allowed(headers("Basic !!!"))
    assert not gate.allowed(headers("s3cret"))
    assert not gate.allowed([])


def test_only_the_outermost_progress_bar_shows(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setenv("CMATRIX_PROGRESS", "1")
    with progress.bar(100, "load") as outer:
        assert not isinstance(outer, progress.NoBar)
        assert isinstance(progress.bar(100, "send one tensor"), progress.NoBar)
        outer.update(100)
    assert not isinstance(progress.bar(100, "next"), progress.NoBar)
    monkeypatch.setenv("CMATRIX_PROGRESS", "")
    monkeypatch.setenv("CMATRIX_PROGRESS_MB", "0")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, even under pytest -s
    monkeypatch.setenv("CMATRIX_TTY", "1")  # cmatrix launch's stderr is a terminal
    assert progress.wanted(10)
    monkeypatch.setenv("CMATRIX_TTY", "0")
    assert not progress.wanted(10)


def test_a_server_without_key_answers_only_loopback_names_and_json(model):
    pytest.importorskip("starlette")
    import queue

    from starlette.testclient import TestClient

    from cmatrix.serve.app import build

    served = SimpleNamespace(tokenizer=model.tokenizer, config=model.config, cluster=SimpleNamespace(size=1))
    worker = SimpleNamespace(model=served, jobs=queue.Queue(), busy=False, dashboard={"ranks": []})
    client = TestClient(build(worker, "m"), base_url="http://127.0.0.1:8000")
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/health", headers={"Host": "[::1]:8000"}).status_code == 200
    assert client.get("/health", headers={"Host": "127.0.0.1"}).status_code == 200
    # a page elsewhere whose name was pointed at 127.0.0.1 (DNS rebinding) gets nothing
    assert client.get("/health", headers={"Host": "evil.example:8000"}).status_code == 400
    assert client.get("/cmatrix/cluster", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/health", headers={"Host": "127.0.0.1.evil.example"}).json()["error"]["code"] \
        == "invalid_host"
    # a cross-site form or text/plain POST is refused before it is read
    r = client.post("/v1/chat/completions", content=b'{"messages": []}',
                    headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "x", "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert worker.jobs.qsize() == 0  # nothing refused was queued
    # with a key, the key is what protects it: other names are answered when it is given
    keyed = TestClient(build(worker, "m", api_key="k"), base_url="http://192.168.1.9:8000")
    assert keyed.get("/health").status_code == 401
    assert keyed.get("/health", headers={"Authorization": "Bearer k"}).status_code == 200


def test_serve_without_its_extra_names_the_package(monkeypatch, capsys):
    from cmatrix import serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: import fails
    assert serve.run(None, SimpleNamespace()) == 2
    assert "uvicorn is not installed: pip install 'cmatrix[serve]'" in capsys.readouterr().err
