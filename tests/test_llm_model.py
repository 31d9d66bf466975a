"""cmatrix.llm on a one-rank cluster in this process: checkpoint reading, forward, the
weight cache and generate() on tiny random checkpoints. The multi-rank runs against
transformers are tests/test_llm_mpi.py."""
# ruff: noqa: F403, F405

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import argparse  # noqa: E402
import io  # noqa: E402

from llm_helpers import *  # noqa: E402 - fixtures and helpers shared by the llm tests

# ---- checkpoint -----------------------------------------------------------------------


def test_a_sharded_checkpoint_with_index_gives_the_same_logits(cl, tiny, model, tmp_path):
    want = model.forward(IDS, start=0, all_logits=True)
    weights = tensors(tiny)
    names = sorted(weights)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    # with an index
    indexed = copy_config(tiny, tmp_path / "indexed")
    for file, part in files.items():
        safetensors_numpy.save_file({n: weights[n] for n in part}, str(indexed / file))
    weight_map = {n: file for file, part in files.items() for n in part}
    index = {"metadata": {}, "weight_map": weight_map}
    (indexed / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = Checkpoint(indexed)
    assert {n: p.name for n, p in ckpt.files.items()} == weight_map
    # without: every *.safetensors file is read
    plain = copy_config(tiny, tmp_path / "plain")
    for file in files:
        shutil.copy(indexed / file, plain / file)
    assert {n: p.name for n, p in Checkpoint(plain).files.items()} == weight_map
    for path in (indexed, plain):
        m = cm.llm.load(cl, path)
        try:
            np.testing.assert_array_equal(m.forward(IDS, start=0, all_logits=True), want)
        finally:
            m.close()


def test_transformers_sharded_save_is_read(cl, tiny, model, tmp_path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    m = cm.llm.load(cl, tmp_path)
    try:
        np.testing.assert_array_equal(m.forward(IDS, start=0), model.forward(IDS, start=0))
    finally:
        m.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_are_read_as_float32(cl, tiny, tmp_path, dtype):
    half, wide = copy_config(tiny, tmp_path / "half"), copy_config(tiny, tmp_path / "wide")
    weights = safetensors_torch.load_file(str(tiny / "model.safetensors"))
    low = {n: t.to(getattr(torch, dtype)) for n, t in weights.items()}
    safetensors_torch.save_file(low, str(half / "model.safetensors"))
    safetensors_torch.save_file({n: t.float() for n, t in low.items()}, str(wide / "model.safetensors"))
    ckpt = Checkpoint(half)
    name = "model.layers.0.mlp.up_proj.weight"
    got = ckpt.get(name, (96, 64))
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, low[name].float().numpy())
    logits = []
    for path in (half, wide):
        m = cm.llm.load(cl, path)
        try:
            logits.append(m.forward(IDS, start=0, all_logits=True))
        finally:
            m.close()
    np.testing.assert_array_equal(logits[0], logits[1])


def test_an_index_naming_a_file_outside_the_folder_is_refused(cl, tiny, tmp_path):
    path = copy_config(tiny, tmp_path / "m")
    shutil.copy(tiny / "model.safetensors", tmp_path / "outside.safetensors")
    weight_map = {n: "../outside.safetensors" for n in tensors(tiny)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(cl, lambda: cm.llm.load(cl, path), r"outside the model folder: '\.\./outside\.safetensors'")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "/etc/passwd"}}))
    refused(cl, lambda: cm.llm.load(cl, path), r"outside the model folder")
    (path / "model.safetensors.index.json").write_text(json.dumps({"no_weight_map": {}}))
    refused(cl, lambda: cm.llm.load(cl, path), r"not a safetensors index")


def test_missing_tensor_wrong_shape_or_dtype_is_refused_before_data_moves(cl, tiny, tmp_path):
    weights = tensors(tiny)
    gone = "model.layers.1.mlp.down_proj.weight"
    missing = copy_config(tiny, tmp_path / "missing")
    kept = {n: t for n, t in weights.items() if n != gone}
    safetensors_numpy.save_file(kept, str(missing / "model.safetensors"))
    refused(cl, lambda: cm.llm.load(cl, missing), re.escape(f"no tensor {gone!r}"))

    shape = copy_config(tiny, tmp_path / "shape")
    shutil.copy(tiny / "model.safetensors", shape / "model.safetensors")
    edit_config(shape, intermediate_size=128)
    refused(cl, lambda: cm.llm.load(cl, shape),
            re.escape("model.layers.0.mlp.gate_proj.weight has shape (96, 64), the config implies (128, 64)"))

    wide = copy_config(tiny, tmp_path / "f64")
    doubled = {**weights, gone: weights[gone].astype(np.float64)}
    safetensors_numpy.save_file(doubled, str(wide / "model.safetensors"))
    refused(cl, lambda: cm.llm.load(cl, wide), re.escape(f"{gone} is F64; expected F32, F16 or BF16"))

    # the index lists a tensor its file does not hold
    lying = copy_config(tiny, tmp_path / "lying")
    shutil.copy(missing / "model.safetensors", lying / "model.safetensors")
    (lying / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model.safetensors" for n in weights}}))
    refused(cl, lambda: cm.llm.load(cl, lying),
            re.escape(f"the index says it holds {gone!r}, but it does not"))


def hub_snapshot(tiny: Path, root: Path, index: bool) -> Path:
    """The layout of a Hugging Face hub cache: the snapshot folder holds symlinks into blobs/."""
    blobs, snap = root / "blobs", root / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    files = {"config.json": tiny / "config.json",
             "model-00001-of-00001.safetensors": tiny / "model.safetensors"}
    if index:
        weight_map = {n: "model-00001-of-00001.safetensors" for n in tensors(tiny)}
        (root / "index.json").write_text(json.dumps({"weight_map": weight_map}))
        files["model.safetensors.index.json"] = root / "index.json"
    for i, (name, src) in enumerate(files.items()):
        shutil.copy(src, blobs / f"blob{i}")
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    return snap


def test_a_hub_snapshot_of_symlinks_without_index_is_read(tiny, tmp_path):
    ckpt = Checkpoint(hub_snapshot(tiny, tmp_path, index=False))
    assert set(ckpt.files) == set(tensors(tiny))
    np.testing.assert_array_equal(ckpt.get("model.norm.weight"), tensors(tiny)["model.norm.weight"])


def test_a_hub_snapshot_of_symlinks_with_index_is_read(tiny, tmp_path):
    assert set(Checkpoint(hub_snapshot(tiny, tmp_path, index=True)).files) == set(tensors(tiny))


def test_a_pytorch_bin_checkpoint_is_refused(cl, tiny, tmp_path):
    path = copy_config(tiny, tmp_path / "bin")
    torch.save(safetensors_torch.load_file(str(tiny / "model.safetensors")), path / "pytorch_model.bin")
    err = refused(cl, lambda: cm.llm.load(cl, path), r"no \*\.safetensors weights found")
    assert "pickle" in str(err) and ".bin" in str(err)


def test_local_weights_takes_a_mode_and_cannot_be_forced_with_a_cache(cl, tiny):
    refused(cl, lambda: cm.llm.load(cl, tiny, local_weights="yes"), r"local_weights: one of 'auto', 'on'")
    refused(cl, lambda: cm.llm.load(cl, tiny, local_weights="on", cache="save"), r"give one of them")


def test_the_driver_reads_its_own_blocks_locally(cl, tiny, model):
    """One rank: the driver is a rank with the copy, also with 'off' (which only keeps the
    other ranks from reading theirs; tests/test_llm_mpi.py compares the modes' logits)."""
    assert model.local_ranks == (True,) and model.local_problems == [None]
    off = cm.llm.load(cl, tiny, local_weights="off")
    try:
        assert off.local_ranks == (True,)
    finally:
        off.close()


# ---- the model on one rank --------------------------------------------------------------


def test_logits_match_transformers(model, ref_logits):
    got = model.forward(IDS, start=0, all_logits=True)
    assert got.shape == (len(IDS), VOCAB) and got.dtype == np.float32
    assert float(np.abs(ref_logits).max()) > 1.0  # far from uniform: the comparison means something
    np.testing.assert_allclose(got, ref_logits, rtol=0, atol=TOL)
    assert model.position == len(IDS)
    # the last token's logits by default; prefill + decode continues from the cache
    np.testing.assert_allclose(model.forward(IDS[:5], start=0), ref_logits[4], rtol=0, atol=TOL)
    for i, t in enumerate(IDS[5:]):
        np.testing.assert_allclose(model.forward([t]), ref_logits[5 + i], rtol=0, atol=TOL)
    # restart mid-sequence: positions from 2 on are rewritten
    np.testing.assert_allclose(model.forward(IDS[2:6], start=2, all_logits=True), ref_logits[2:6],
                               rtol=0, atol=TOL)
    assert model.position == 6


def test_explicit_head_dim_qwen2_biases_and_tied_embeddings_match_transformers(cl, tmp_path):
    path = build(tmp_path, model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=True, scale=8.0, tokenizer=False, seed=3)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 96, 9)]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    m = cm.llm.load(cl, path)
    try:
        assert m.config.head_dim == 32 and m.config.qkv_bias and m.config.tie_word_embeddings
        np.testing.assert_allclose(m.forward(ids, start=0, all_logits=True), want, rtol=0, atol=TOL)
    finally:
        m.close()


def test_quantised_weights_stay_close_and_keep_the_layout(cl, tiny, model, ref_logits):
    m = cm.llm.load(cl, tiny, quant="q8_0")
    try:
        assert m.layout() == model.layout()
        got = m.forward(IDS, start=0, all_logits=True)
        err, scale = float(np.abs(got - ref_logits).max()), float(np.abs(ref_logits).max())
        assert 0 < err < 0.05 * scale
    finally:
        m.close()


def test_a_folder_without_tokenizer_generates_from_ids_only(cl, tiny, tmp_path):
    path = copy_config(tiny, tmp_path)
    shutil.copy(tiny / "model.safetensors", path / "model.safetensors")
    m = cm.llm.load(cl, path)
    try:
        assert m.stop_ids() == {2}  # config.json's eos_token_id
        r = m.generate(token_ids=IDS, max_new_tokens=3, stop_token_ids=[])
        assert len(r.token_ids) == 3 and r.text == ""
        refused(cl, lambda: m.generate("hello", max_new_tokens=3), r"no tokenizer\.json")
        refused(cl, lambda: m.generate(token_ids=IDS, stream=print), r"no tokenizer\.json")
    finally:
        m.close()


def test_forward_refusals_leave_the_model_usable(cl, model, short):
    model.forward(IDS[:3], start=0)
    assert model.position == 3
    for fn, match in [
        (lambda: model.forward([1, VOCAB]), rf"token_ids: ids must lie in \[0, {VOCAB}\)"),
        (lambda: model.forward([-1, 2]), r"ids must lie in"),
        (lambda: model.forward([]), r"token_ids: empty"),
        (lambda: model.forward(np.zeros((0, 3), dtype=np.int64)), r"token_ids: empty"),
        (lambda: model.forward([1], start=4),
         r"start: an integer in \[0, 3\] \(the cached positions\), got 4"),
        (lambda: model.forward([1], start=-1), r"start: an integer in \[0, 3\]"),
        (lambda: model.forward([1], start=True), r"start: an integer"),
        (lambda: model.forward([1], start=1.0), r"start: an integer"),
        (lambda: short.forward(list(range(9)), start=0), r"9 positions exceed max_position_embeddings 8"),
    ]:
        refused(cl, fn, match)
    assert model.position == 3
    assert model.forward([4], start=3).shape == (VOCAB,)
    assert short.forward(list(range(8)), start=0).shape == (VOCAB,)  # exactly the limit is fine
    refused(cl, lambda: short.forward([1]), r"9 positions exceed max_position_embeddings 8")


def test_layout_numbers(model, tiny):
    assert model.layout() == [{"rank": 0, "layers": (0, model.config.num_layers), "kv_groups": 2, "heads": 4,
                               "mlp_rows": 96, "vocab_rows": VOCAB}]
    assert model.config == DecoderConfig.from_dir(tiny)
    assert model.stop_ids() == {2}
    assert model.tokenizer.vocab_size <= VOCAB


def test_bad_load_arguments_are_refused(cl, tiny):
    refused(cl, lambda: cm.llm.load(cl, tiny, cache="keep"), r"cache: one of 'save', 'load', 'auto' or None")
    refused(cl, lambda: cm.llm.load(cl, tiny, weights=[0.5, 0.5]), r"weights")
    refused(cl, lambda: cm.llm.load(cl, tiny / "nothing-here"), r"config\.json: not found")


def test_close_then_forward_fails_clearly(cl, tiny):
    m = cm.llm.load(cl, tiny)
    logits = m.forward(IDS[:3])
    m.close()
    m.close()  # twice is harmless
    refused(cl, lambda: m.forward(IDS[:3], start=0), r"closed")
    refused(cl, lambda: m.generate(token_ids=IDS[:3], max_new_tokens=2), r"closed")
    again = cm.llm.load(cl, tiny)  # the same folder loads again afterwards
    try:
        np.testing.assert_array_equal(again.forward(IDS[:3]), logits)
    finally:
        again.close()


# ---- the weight cache -----------------------------------------------------------------


def count_payloads(cl, monkeypatch) -> list[int]:
    """Bytes of array data the driver hands to each command (what travels on many ranks)."""
    sent: list[int] = []
    run = cl.driver.run

    def counting(header, payload=None):
        sent.append(int(getattr(payload, "nbytes", 0) or 0))
        return run(header, payload)

    monkeypatch.setattr(cl.driver, "run", counting)
    return sent


def test_cache_save_then_load_gives_identical_logits_and_sends_little(cl, tiny, cache_dir, monkeypatch):
    sent = count_payloads(cl, monkeypatch)
    before = cl.stats()["bytes_moved"]
    saved = cm.llm.load(cl, tiny, cache="save", name="tiny.llm")
    save_bytes, save_moved = sum(sent), cl.stats()["bytes_moved"] - before
    want = saved.forward(IDS, start=0, all_logits=True)
    saved.close()
    assert (cache_dir / "shards" / "tiny.llm.layers.0.qkv" / "rank0.cmshard").exists()
    assert (cache_dir / "shards" / "tiny.llm.lm_head" / "manifest.json").exists()
    before = cl.stats()["bytes_moved"]
    sent.clear()
    loaded = cm.llm.load(cl, tiny, cache="load", name="tiny.llm")
    load_bytes, load_moved = sum(sent), cl.stats()["bytes_moved"] - before
    try:
        # bytes_moved counts what crosses ranks (nothing on one rank); the payloads are what
        # the driver hands out, the same on any number of ranks
        assert load_moved <= 0.05 * save_moved
        assert 0 < load_bytes < 0.05 * save_bytes, (load_bytes, save_bytes)
        np.testing.assert_array_equal(loaded.forward(IDS, start=0, all_logits=True), want)
    finally:
        loaded.close()
    names = {e["name"] for e in cl.cached()}
    assert {"tiny.llm.layers.1.gate_up", "tiny.llm.lm_head"} <= names


def test_cache_load_without_a_save_names_the_missing_manifest(cl, tiny, cache_dir):
    with pytest.raises(cm.CacheError, match=r"manifest\.json does not exist"):
        cm.llm.load(cl, tiny, cache="load", name="never.saved")


def test_cache_with_a_changed_checkpoint(cl, tiny, cache_dir, tmp_path):
    """cache='load' trusts the saved matrices (it reads only embeddings, norms and biases from the
    folder); cache='auto' compares checksums and resends what changed."""
    changed = copy_config(tiny, tmp_path / "changed")
    weights = tensors(tiny)
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"] * 2
    safetensors_numpy.save_file(weights, str(changed / "model.safetensors"))
    m = cm.llm.load(cl, changed)
    want = m.forward(IDS, start=0, all_logits=True)
    m.close()
    cm.llm.load(cl, tiny, cache="save", name="chg").close()
    m = cm.llm.load(cl, tiny, cache="load", name="chg")
    old = m.forward(IDS, start=0, all_logits=True)
    m.close()
    assert not np.allclose(old, want, atol=1e-3)  # the change matters
    m = cm.llm.load(cl, changed, cache="load", name="chg")  # the saved q_proj, not the folder's
    stale = m.forward(IDS, start=0, all_logits=True)
    m.close()
    np.testing.assert_array_equal(stale, old)
    m = cm.llm.load(cl, changed, cache="auto", name="chg")
    try:
        np.testing.assert_array_equal(m.forward(IDS, start=0, all_logits=True), want)
    finally:
        m.close()
    m = cm.llm.load(cl, changed, cache="load", name="chg")  # auto saved the new one
    try:
        np.testing.assert_array_equal(m.forward(IDS, start=0, all_logits=True), want)
    finally:
        m.close()


def test_cache_load_refuses_matrices_of_another_shape(cl, tmp_path, cache_dir):
    small = dict(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, tokenizer=False)
    a = build(tmp_path / "a", intermediate_size=96, **small)
    b = build(tmp_path / "b", intermediate_size=128, **small)
    cm.llm.load(cl, a, cache="save", name="shape").close()
    m = None
    try:
        with pytest.raises(cm.CMatrixError, match=r"shape|intermediate"):
            m = cm.llm.load(cl, b, cache="load", name="shape")
            m.forward([1, 2, 3])
    finally:
        if m is not None:
            m.close()


# ---- generate -------------------------------------------------------------------------

PROMPT = "How does the cache work?"


def test_chat_template_is_used_by_default(model, tiny):
    tok = model.tokenizer
    assert tok.has_chat_template
    hf = transformers.AutoTokenizer.from_pretrained(tiny)
    messages = [{"role": "user", "content": PROMPT}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<s><|user|>\n") and rendered.endswith("<|assistant|>\n")
    want = hf.encode(rendered, add_special_tokens=False)
    assert want == tok.encode(rendered, add_special_tokens=False)
    chat = prompt_ids(model, PROMPT, None, None, None)
    assert chat == want and chat.count(1) == 1 and chat[0] == 1  # one BOS, from the template
    assert prompt_ids(model, None, None, messages, None) == want
    plain = prompt_ids(model, PROMPT, None, None, False)
    assert plain == tok.encode(PROMPT) == hf.encode(PROMPT) and plain[0] == 1 and plain.count(1) == 1
    with_system = prompt_ids(model, PROMPT, None, None, None, system="Be brief.")
    assert with_system == hf.encode(hf.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    r = model.generate(PROMPT, max_new_tokens=2, stop_token_ids=[])
    assert r.prompt_tokens == len(want)
    r = model.generate(PROMPT, chat=False, max_new_tokens=2, stop_token_ids=[])
    assert r.prompt_tokens == len(plain) < len(want)


def test_without_a_chat_template_text_is_encoded_plainly(tiny, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(tiny / f, tmp_path / f)
    raw = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del raw["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(raw))
    fake = SimpleNamespace(tokenizer=Tokenizer.from_dir(tmp_path))
    assert not fake.tokenizer.has_chat_template
    assert prompt_ids(fake, PROMPT, None, None, None) == fake.tokenizer.encode(PROMPT)
    with pytest.raises(cm.InputError, match="no chat template"):
        prompt_ids(fake, PROMPT, None, None, True)


@pytest.fixture(scope="module")
def greedy(model) -> GenerationResult:
    """40 greedy tokens after PROMPT with nothing stopping them early."""
    return model.generate(PROMPT, max_new_tokens=40, stop_token_ids=[])


def test_greedy_generation_follows_argmax_and_streams(model, greedy):
    assert greedy.stop_reason == "max_new_tokens" and len(greedy.token_ids) == 40
    ids = prompt_ids(model, PROMPT, None, None, None)
    seq = list(ids)
    logits = model.forward(seq, start=0)
    for _ in range(5):
        seq.append(int(np.argmax(logits)))
        logits = model.forward(seq[-1:])
    assert greedy.token_ids[:5] == seq[len(ids):]
    assert greedy.text == model.tokenizer.decode(greedy.token_ids)
    chunks: list[str] = []
    again = model.generate(PROMPT, max_new_tokens=40, stop_token_ids=[], stream=chunks.append)
    assert again.token_ids == greedy.token_ids and again.text == greedy.text
    assert "".join(chunks) == again.text and len(chunks) > 1 and all(chunks)
    assert greedy.decode_steps == 39 and greedy.prompt_tokens == len(ids)


def pick_stop(text: str) -> str:
    """A 3-character piece of the middle of ``text`` without replacement characters."""
    for i in range(len(text) // 3, len(text) - 3):
        s = text[i:i + 3]
        if "\ufffd" not in s and text.find(s) > 0:
            return s
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_strings_cut_the_text_before_them(model, greedy):
    stop = pick_stop(greedy.text)
    want = greedy.text[:greedy.text.find(stop)]
    chunks: list[str] = []
    r = model.generate(PROMPT, max_new_tokens=40, stop_token_ids=[], stop_strings=["\x00never", stop],
                       stream=chunks.append)
    assert r.stop_reason == "stop_string"
    assert r.text == want and stop not in r.text
    assert "".join(chunks) == r.text
    assert r.token_ids == greedy.token_ids[:len(r.token_ids)] and len(r.token_ids) < 40
    assert stop in model.tokenizer.decode(r.token_ids)  # the last token completed the stop string


def test_a_held_back_stop_prefix_is_streamed_at_the_end(model, greedy):
    """The text's last character starts a stop string that never completes: it is held back while
    generating, and must still reach the stream when generation ends."""
    if not greedy.text:
        pytest.skip("the greedy text is empty")
    stop = greedy.text[-1] + "\x00never"
    chunks: list[str] = []
    r = model.generate(PROMPT, max_new_tokens=40, stop_token_ids=[], stop_strings=[stop],
                       stream=chunks.append)
    assert r.stop_reason == "max_new_tokens" and r.text == greedy.text
    assert "".join(chunks) == greedy.text


def test_stop_token_ids(model, greedy):
    first = greedy.token_ids[0]
    r = model.generate(PROMPT, max_new_tokens=40, stop_token_ids=[first])
    assert (r.token_ids, r.text, r.stop_reason, r.decode_steps) == ([], "", "stop_token", 0)
    third = greedy.token_ids[2]
    if third not in greedy.token_ids[:2]:
        r = model.generate(PROMPT, max_new_tokens=40, stop_token_ids=[third])
        assert r.token_ids == greedy.token_ids[:2] and r.stop_reason == "stop_token"
    # the default stop ids are the tokenizer's end-of-sequence ids
    assert model.stop_ids() == {2}


def test_max_new_tokens_zero(model):
    r = model.generate(token_ids=IDS, max_new_tokens=0)
    assert (r.token_ids, r.text, r.stop_reason, r.prompt_tokens) == ([], "", "max_new_tokens", len(IDS))
    r = model.generate(token_ids=IDS, max_new_tokens=1, stop_token_ids=[])
    assert len(r.token_ids) == 1 and r.decode_steps == 0 and r.stop_reason == "max_new_tokens"


def test_seeded_sampling_is_reproducible(model):
    opts = dict(token_ids=IDS, max_new_tokens=12, stop_token_ids=[], temperature=1.0, top_k=20)
    a = model.generate(seed=3, **opts).token_ids
    assert a == model.generate(seed=3, **opts).token_ids
    assert len(a) == 12
    greedy = model.generate(token_ids=IDS, max_new_tokens=12, stop_token_ids=[]).token_ids
    samples = [model.generate(seed=s, **opts).token_ids for s in range(6)]
    assert any(s != greedy for s in samples)
    assert len({tuple(s) for s in samples}) > 1  # the seed matters
    # top_k=1 is greedy whatever the temperature and seed
    assert model.generate(seed=9, **{**opts, "top_k": 1}).token_ids == greedy


def test_max_positions_stops_generation(short):
    r = short.generate(token_ids=[5, 6, 7, 8, 9], max_new_tokens=20, stop_token_ids=[])
    # positions 5, 6 and 7 are fed back; the token after position 7 is the last one
    assert r.stop_reason == "max_positions" and len(r.token_ids) == 8 - 5 + 1
    assert short.position == 8
    r = short.generate(token_ids=list(range(8)), max_new_tokens=20, stop_token_ids=[])
    assert r.stop_reason == "max_positions" and len(r.token_ids) == 1
    refused(short.cluster, lambda: short.generate(token_ids=list(range(9))), r"the prompt has 9 tokens")


def test_bad_generate_options_are_refused(cl, model):
    for options, match in [
        (dict(token_ids=IDS, max_new_tokens=-1), r"max_new_tokens: a non-negative integer, got -1"),
        (dict(token_ids=IDS, max_new_tokens=2.0), r"max_new_tokens"),
        (dict(token_ids=IDS, max_new_tokens=True), r"max_new_tokens"),
        (dict(token_ids=IDS, stop_strings="stop"), r"stop_strings: a list of non-empty strings"),
        (dict(token_ids=IDS, stop_strings=[""]), r"stop_strings"),
        (dict(token_ids=IDS, stop_strings=[3]), r"stop_strings"),
        (dict(prompt="hi", token_ids=IDS), r"give exactly one of prompt"),
        (dict(), r"give exactly one of prompt"),
        (dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), r"give exactly one"),
        (dict(token_ids=[]), r"the prompt has no tokens"),
        (dict(token_ids=[VOCAB]), r"ids must lie in"),
        (dict(token_ids=IDS, temperature=-1.0), r"temperature must be >= 0"),
        (dict(token_ids=IDS, top_p=0.0), r"top_p"),
        (dict(token_ids=IDS, seed=-2), r"seed"),
    ]:
        refused(cl, lambda options=options: model.generate(**options), match)


@pytest.mark.parametrize("options", [dict(stop_strings=None), dict(stop_token_ids=5),
                                     dict(stop_token_ids=["a"])], ids=["strings-None", "ids-int", "ids-str"])
def test_malformed_stop_options_are_input_errors(cl, model, options):
    refused(cl, lambda: model.generate(token_ids=IDS, max_new_tokens=2, **options), r"stop_")


def test_summary_mentions_speed_and_traffic(model):
    r = model.generate(token_ids=IDS, max_new_tokens=5, stop_token_ids=[])
    text = r.summary()
    assert "tokens/s" in text and "KiB/token" in text and "stop: max_new_tokens" in text
    assert f"prefill: {len(IDS)} tokens" in text and "decode: 5 tokens" in text
    assert r.decode_steps == 4 and r.prefill_seconds > 0 and r.decode_seconds > 0
    assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0
    assert r.bytes_per_token == 0 and r.prefill_bytes == 0  # one rank: nothing crosses ranks
    empty = GenerationResult(text="", token_ids=[], prompt_tokens=0, stop_reason="max_new_tokens")
    assert "0.00 tokens/s" in empty.summary()  # no division by zero


# ---- found in review ------------------------------------------------------------------


def test_a_dropped_model_is_freed_on_the_ranks(cl, tiny):
    import gc

    m = cm.llm.load(cl, tiny)
    ident = m._id
    assert ident in cl.driver.runtime.models
    del m
    gc.collect()
    cl.replicate(np.ones((1, 1), dtype=np.float32))  # the next command carries the free
    assert ident not in cl.driver.runtime.models


def test_the_generate_command_refuses_bad_options_before_loading(cl, tiny, tmp_path):
    from cmatrix.llm.run import add_arguments, run

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    no_tokenizer = copy_config(tiny, tmp_path / "no-tokenizer")
    shutil.copy(tiny / "model.safetensors", no_tokenizer)
    for extra in (["--top-p", "0"], ["--stop", ""], ["--max-new-tokens", "-1"]):
        before = cl.stats()
        assert run(cl, ap.parse_args(["--model", str(tiny), *extra]), out=io.StringIO()) == 2
        assert cl.stats() == before, extra
    before = cl.stats()
    assert run(cl, ap.parse_args(["--model", str(no_tokenizer)]), out=io.StringIO()) == 2
    assert cl.stats() == before


def test_a_failing_chat_template_is_an_input_error(tiny, tmp_path):
    folder = tmp_path / "bad-template"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] + 1 }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(cm.InputError, match="chat template failed: TypeError"):
        Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "hi"}])


def test_system_needs_a_chat_prompt(cl, model):
    refused(cl, lambda: model.generate("hi", system="be brief", chat=False), r"system: needs a text prompt")
    refused(cl, lambda: model.generate(token_ids=[1, 2], system="be brief"), r"exactly one|system")


def test_float_token_ids_are_refused(cl, model):
    refused(cl, lambda: model.forward([1.7, 2.0], start=0), r"token_ids: integer token ids")
    refused(cl, lambda: model.generate(token_ids=[1.7]), r"token_ids: a list of integer")


def test_an_untied_checkpoint_without_lm_head_is_refused(cl, tiny, tmp_path):
    folder = copy_config(tiny, tmp_path / "no-head")
    weights = {k: v for k, v in tensors(tiny).items() if k != "lm_head.weight"}
    safetensors_numpy.save_file(weights, str(folder / "model.safetensors"))
    refused(cl, lambda: cm.llm.load(cl, folder), r"no lm_head.weight")


def test_an_index_naming_a_missing_file_is_refused(cl, tiny, tmp_path):
    folder = copy_config(tiny, tmp_path / "missing-shard")
    shutil.copy(tiny / "model.safetensors", folder)
    weight_map = {k: "model.safetensors" for k in tensors(tiny)}
    weight_map["model.norm.weight"] = "model-2.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(cl, lambda: cm.llm.load(cl, folder), r"names 'model-2.safetensors', which is not there")


def test_a_prompt_longer_than_the_context_is_refused(cl, short):
    refused(cl, lambda: short.generate(token_ids=list(range(1, 10))), r"9 tokens; the model takes at most 8")


def test_cli_lists_are_parsed_or_refused():
    from cmatrix.llm.run import parse_list

    assert parse_list("0.6,0.4", float) == [0.6, 0.4]
    assert parse_list("[0.6, 0.4]", float) == [0.6, 0.4]
    assert parse_list("torch", str) == "torch"
    assert parse_list("torch, ggml", str) == ["torch", "ggml"]
    assert parse_list(None, float) is None
    with pytest.raises(cm.InputError, match="cannot read '0.5,x' as a comma-separated list"):
        parse_list("0.5,x", float)


def test_bad_weight_type_or_wire_is_refused_before_data_moves(cl, tiny):
    refused(cl, lambda: cm.llm.load(cl, tiny, dtype="float16", quant="q8_0"), "not both")
    refused(cl, lambda: cm.llm.load(cl, tiny, dtype="float8"), "dtype: one of")
    refused(cl, lambda: cm.llm.load(cl, tiny, wire="int8"), "wire: one of")


def test_an_unknown_decoder_path_fails_the_load_on_the_rank(cl, tiny, monkeypatch):
    monkeypatch.setenv("CMATRIX_DECODER", "fastest")
    with pytest.raises(cm.RankError, match="CMATRIX_DECODER: auto, numpy or torch"):
        cm.llm.load(cl, tiny)
    monkeypatch.setenv("CMATRIX_DECODER", "numpy")
    m = cm.llm.load(cl, tiny)  # the cluster is still usable, and the path is the one asked for
    try:
        assert m.decoders == ["numpy+numpy"]
    finally:
        m.close()


def test_pipeline_stages_on_one_rank_fall_back_to_tensor_parallel(cl, tiny, ref_logits):
    model = cm.llm.load(cl, tiny, parallel="pp")
    try:
        assert model.stages is None and "one rank holds the whole model" in model.layout_note
        got = model.forward(IDS, start=0, all_logits=True)
        assert np.abs(got - ref_logits).max() < 1e-4
    finally:
        model.close()
    refused(cl, lambda: cm.llm.load(cl, tiny, parallel="pipeline"), "parallel: one of 'tp', 'pp', 'auto'")
