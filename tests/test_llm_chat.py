"""ChatSession on a one-rank cluster in the pytest process: its turns are what generate()
gives for the same conversation, later turns run only their new tokens yet answer as a
fresh run of the whole conversation does, and a conversation that outgrows the context
says how to go on."""
# ruff: noqa: F403, F405

from llm_helpers import *

from cmatrix.llm.chat import ChatSession


def test_chat_turns_match_generate_and_reuse_the_cache(cl, tiny):
    model = cm.llm.load(cl, tiny)
    try:
        chat = ChatSession(model, system="Be brief.", max_new_tokens=6)
        first = chat.ask("Hello there")
        fresh = model.generate(messages=chat.history()[:2], max_new_tokens=6)
        assert first.token_ids == fresh.token_ids and first.cached_tokens == 0
        second = chat.ask("Tell me more")
        assert second.cached_tokens > first.prompt_tokens  # the whole first turn came from the cache
        assert second.prefill_tokens < first.prompt_tokens
        # the same conversation run from nothing gives the same answer (greedy, same prompt ids)
        model.forward([1], start=0)  # the ranks' caches now hold something else
        again = model.generate(token_ids=chat.transcript.ids[:second.prompt_tokens], max_new_tokens=6)
        assert again.token_ids == second.token_ids
        assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
        chat.reset()
        assert chat.messages == [] and chat.history() == [{"role": "system", "content": "Be brief."}]
    finally:
        model.close()


def test_a_conversation_longer_than_the_context_says_reset(cl, tiny, tmp_path):
    path = tmp_path / "short"
    shutil.copytree(tiny, path)
    edit_config(path, max_position_embeddings=40)
    model = cm.llm.load(cl, path)
    try:
        chat = ChatSession(model, max_new_tokens=4)
        chat.ask("Hi")
        before = list(chat.messages)
        with pytest.raises(cm.InputError, match="/reset starts a new one"):
            chat.ask("word " * 30)
        assert chat.messages == before  # the refused turn is not part of the conversation
        chat.reset()
        assert chat.ask("Hi").token_ids
    finally:
        model.close()


def test_chat_needs_a_template_and_sane_options(cl, tiny, tmp_path):
    path = tmp_path / "plain"
    shutil.copytree(tiny, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model = cm.llm.load(cl, path)
    try:
        with pytest.raises(cm.InputError, match="no chat template"):
            ChatSession(model)
    finally:
        model.close()
    model = cm.llm.load(cl, tiny)
    try:
        with pytest.raises(cm.InputError, match="temperature"):
            ChatSession(model, temperature=-1)
        with pytest.raises(cm.InputError, match="empty"):
            ChatSession(model).ask("  ")
    finally:
        model.close()
