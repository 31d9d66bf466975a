"""GGUF files as models, on a one-rank cluster in this process: tiny random checkpoints written
as GGUF by jobs/gguf_export.py (F32, F16, BF16, Q8_0, Q4_0 by the gguf package's own
quantiser; Q4_K/Q6_K as random blocks), read by cmatrix and, as the reference, by
transformers' own GGUF loader. The multi-rank run is in tests/test_llm_mpi.py."""
# ruff: noqa: F403, F405

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
gguf = pytest.importorskip("gguf")

from llm_helpers import *  # noqa: E402, I001 - the llm tests' fixtures; puts jobs/ on the path

from gguf_export import TYPES, export  # noqa: E402
from test_llm_tokenizer import _sentencepiece_like  # noqa: E402

from cmatrix.core import quant as q  # noqa: E402
from cmatrix.llm.gguf_file import GgufCheckpoint  # noqa: E402
from cmatrix.llm.gguf_vocab import tokenizer_from_gguf  # noqa: E402
from cmatrix.llm.model import read_tokenizer  # noqa: E402

TEXTS = ["Hello world, this is cmatrix!", "two  spaces\n\nnew lines 12345 ünïcode 😀",
         "Old computers, together"]


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {kind: export(tiny, out / f"tiny-{kind}.gguf", kind) for kind in TYPES}


def reference(file: Path, ids=IDS, roundtrip: str | None = None) -> np.ndarray:
    """transformers' logits for ``file`` (its own GGUF reader); ``roundtrip``: the weight matrices
    first rounded through that block type, as cmatrix stores converted blocks."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                            dtype=torch.float32).eval()
    if roundtrip:
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if p.ndim == 2 and "embed" not in name:
                    p.copy_(torch.from_numpy(q.roundtrip(p.numpy(), roundtrip)))
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


def exact_logits(cl, file: Path, monkeypatch, **options) -> tuple[np.ndarray, object]:
    """cmatrix's logits for ``file`` on the exact numpy path (no activation rounding)."""
    monkeypatch.setenv("CMATRIX_DECODER", "numpy")
    m = cm.llm.load(cl, file, **options)
    try:
        return m.forward(IDS, start=0, all_logits=True), m
    finally:
        m.close()


@pytest.mark.parametrize("kind, dtype, quant", [
    ("f32", "float32", None), ("f16", "float16", None), ("bf16", "bfloat16", None),
    ("q8_0", "float32", "q8_0"), ("q4_0", "float32", "q4_0")])
def test_each_stored_type_is_kept_and_gives_transformers_logits(cl, files, kind, dtype, quant, monkeypatch):
    got, m = exact_logits(cl, files[kind], monkeypatch)
    assert (m.dtype, m.quant, m.conversion_note) == (dtype, quant, None)
    # a numpy rank widens 16-bit weights (no half BLAS) and says so; it keeps blocks as they are
    widened = f"float32 (widened from {dtype})"
    assert m.stored_types() == [widened if kind in ("f16", "bf16") else quant or dtype]
    want = reference(files[kind])
    np.testing.assert_allclose(got, want, atol=TOL * max(1.0, np.abs(want).max()))


def test_llama_cpp_rows_are_put_back_in_hugging_face_order(cl, files, tiny, ref_logits, monkeypatch):
    """The F32 file holds Llama's q/k rows as llama.cpp reorders them; cmatrix's logits are the
    original folder's (transformers on the safetensors)."""
    got, _ = exact_logits(cl, files["f32"], monkeypatch)
    np.testing.assert_allclose(got, ref_logits, atol=TOL * np.abs(ref_logits).max())
    ckpt = GgufCheckpoint(files["f32"])
    assert not np.array_equal(ckpt._values(ckpt._tensor("model.layers.0.self_attn.q_proj.weight")),
                              tensors(tiny)["model.layers.0.self_attn.q_proj.weight"])


def test_q8_0_and_q4_0_blocks_arrive_unchanged(cl, files):
    """A kept block type is held on the rank as the file's own bytes (here the LM head and a
    layer's down_proj, which llama.cpp does not reorder)."""
    for kind in ("q8_0", "q4_0"):
        reader = gguf.GGUFReader(str(files[kind]))
        stored = {t.name: np.asarray(t.data) for t in reader.tensors}
        m = cm.llm.load(cl, files[kind])
        try:
            held = [cl.driver.runtime.blocks[i] for i in m._local_blocks]  # qkv, o, gate_up, down per layer
            assert np.array_equal(held[-1].handle.blocks, stored["output.weight"])
            assert np.array_equal(held[3].handle.blocks, stored["blk.0.ffn_down.weight"])
        finally:
            m.close()


def _random_k_blocks(name: str, value: np.ndarray):
    """Random but valid Q6_K (down, output) or Q4_K (the rest) blocks in place of ``value``:
    the mix of a llama.cpp Q4_K_M file; small block scales keep the weights near the model's."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    rows, cols = value.shape
    six = name.endswith(("ffn_down.weight", "output.weight"))
    size, qtype = (210, gguf.GGMLQuantizationType.Q6_K) if six else (144, gguf.GGMLQuantizationType.Q4_K)
    if cols % 256:
        pytest.skip("K-quant rows need multiples of 256 values")
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    if six:  # ql, qh, 16 int8 scales, then d
        blocks[..., 208:210] = np.full(blocks.shape[:2], 2e-4, "<f2")[..., None].view(np.uint8)
    else:  # d, dmin, 12 bytes of 6-bit scales and mins, codes
        blocks[..., 0:2] = np.full(blocks.shape[:2], 1e-3, "<f2")[..., None].view(np.uint8)
        blocks[..., 2:4] = np.full(blocks.shape[:2], 5e-4, "<f2")[..., None].view(np.uint8)
    return blocks.reshape(rows, -1), qtype


@pytest.fixture(scope="module")
def k_quant_file(tmp_path_factory):
    path = build(tmp_path_factory.mktemp("wide"), vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return export(path, path / "mixed-k.gguf", encode=_random_k_blocks)


def test_k_quants_are_converted_with_a_note_and_match_their_rounding(cl, k_quant_file, monkeypatch):
    ckpt = GgufCheckpoint(k_quant_file)
    assert set(ckpt.matrix_types()) == {"Q4_K", "Q6_K"}
    got, m = exact_logits(cl, k_quant_file, monkeypatch)
    assert m.quant == "q4_0" and "Q6_K" in m.conversion_note and "q4_0" in m.conversion_note
    want = reference(k_quant_file, roundtrip="q4_0")
    np.testing.assert_allclose(got, want, atol=TOL * max(1.0, np.abs(want).max()))
    got, m = exact_logits(cl, k_quant_file, monkeypatch, quant="q8_0")  # the caller's choice wins
    assert m.quant == "q8_0" and m.conversion_note is None
    want = reference(k_quant_file, roundtrip="q8_0")
    np.testing.assert_allclose(got, want, atol=TOL * max(1.0, np.abs(want).max()))


def test_llama3_rope_frequencies_stored_in_the_file(cl, tmp_path, monkeypatch):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4}
    path = build(tmp_path / "llama3", **{**TINY, "rope_scaling": scaling})
    file = export(path, tmp_path / "llama3.gguf")
    ckpt = GgufCheckpoint(file)
    assert ckpt.config.rope_freq_factors is not None and ckpt.config.rope_scaling is None
    want = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = want(torch.tensor([IDS])).logits[0].numpy()
    got, _ = exact_logits(cl, file, monkeypatch)
    np.testing.assert_allclose(got, want, atol=TOL * np.abs(want).max())


@pytest.mark.parametrize("model_type, extra", [("llama", {"attention_bias": True}), ("qwen2", {}),
                                               ("mistral", {})])
def test_biases_and_architectures_give_the_folders_logits(cl, tmp_path, monkeypatch, model_type, extra):
    """Llama q/k biases reordered by llama.cpp as their rows, Qwen2's q/k/v biases as they are,
    Mistral written as a llama file: each GGUF gives the logits of its Hugging Face folder."""
    path = build(tmp_path / model_type, **{**TINY, "model_type": model_type, **extra})
    want = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = want(torch.tensor([IDS])).logits[0].numpy()
    got, m = exact_logits(cl, export(path, tmp_path / f"{model_type}.gguf"), monkeypatch)
    assert m.config.qkv_bias == (model_type != "mistral")
    np.testing.assert_allclose(got, want, atol=TOL * np.abs(want).max())


@pytest.mark.parametrize("vocab", ["byte_level", "sentencepiece"])
def test_the_tokenizer_comes_from_the_file(tiny, tmp_path, vocab):
    """The GGUF vocabulary (merges, or SentencePiece scores) rebuilt by cmatrix encodes and
    decodes as the original tokenizer.json and as transformers' reading of the same file."""
    folder = tmp_path / vocab
    shutil.copytree(tiny, folder)
    if vocab == "sentencepiece":
        _sentencepiece_like().save(str(folder / "tokenizer.json"))
    file = export(folder, tmp_path / f"{vocab}.gguf")
    mine, original = read_tokenizer(file), Tokenizer.from_dir(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    for text in TEXTS + (["  leading spaces", "<s>hi</s> there"] if vocab == "byte_level" else []):
        ids = original.encode(text)
        assert mine.encode(text) == ids == theirs.encode(text), text
        assert mine.decode(ids) == original.decode(ids), text
    if vocab == "sentencepiece":
        # llama.cpp puts a space before the text (and after each special token) even when the text
        # starts with one; Hugging Face's Metaspace("first") does not: the file follows llama.cpp
        pieces = [mine._tok.id_to_token(i) for i in mine.encode(" a</s>b", add_special_tokens=False)]
        assert pieces == ["▁", "▁", "a", "</s>", "▁", "b"], pieces
    assert mine.bos_id == original.bos_id and mine.eos_ids >= {original.token_to_id("</s>")}
    assert mine.chat_template == original.chat_template and mine.has_chat_template


class _Metadata:
    """Just the metadata of a GGUF file, as :func:`tokenizer_from_gguf` reads it."""

    def __init__(self, path, values):
        self.path, self._values = path, values

    def value(self, key, default=None):
        return self._values.get(key, default)


@pytest.mark.parametrize("pre, bos", [("llama-bpe", True), ("qwen2", False), ("gpt-2", False)])
def test_bos_follows_llama_cpps_default_for_the_pre_tokenizer(files, pre, bos):
    """Without tokenizer.ggml.add_bos_token, llama.cpp adds BOS for Llama 3's byte-level
    vocabulary only (and for every SentencePiece one)."""
    reader = GgufCheckpoint(files["f32"])
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
    meta = {k: reader.value(k) for k in keys}
    tok = tokenizer_from_gguf(_Metadata(files["f32"], {**meta, "tokenizer.ggml.pre": pre}))
    ids = tok.encode("Old computers")
    assert (ids[0] == tok.bos_id) == bos and tok.decode(ids) == "Old computers"


def test_vocabularies_it_cannot_rebuild_are_refused_by_name(files):
    reader = GgufCheckpoint(files["f32"])
    meta = {k: reader.value(k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")}
    for extra, message in (({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm"},
                            "pre-tokenizer 'deepseek-llm' is not known here"),
                           ({"tokenizer.ggml.model": "bert"}, "vocabulary kind 'bert' is not supported"),
                           ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": []},
                            "holds no vocabulary")):
        with pytest.raises(cm.InputError, match=message):
            tokenizer_from_gguf(_Metadata(files["f32"], {**meta, **extra}))


def test_vocabulary_tables_that_disagree_are_refused(files):
    reader = GgufCheckpoint(files["f32"])
    tokens = reader.value("tokenizer.ggml.tokens")
    for extra, message in (({"tokenizer.ggml.model": "llama", "tokenizer.ggml.token_type": [1]},
                            f"{len(tokens)} tokens but 1 token types"),
                           ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0]},
                            f"{len(tokens)} tokens but 1 scores"),
                           ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                             "tokenizer.ggml.merges": ["nospace"]}, "merge 'nospace' is not two tokens")):
        with pytest.raises(cm.InputError, match=message):
            tokenizer_from_gguf(_Metadata(files["f32"], {"tokenizer.ggml.tokens": tokens, **extra}))


def test_rope_scaling_it_cannot_run_is_refused(cl, tiny, tmp_path):
    def yarn(w):
        w.add_string("llama.rope.scaling.type", "yarn")

    file = export(tiny, tmp_path / "yarn.gguf", more=yarn)
    refused(cl, lambda: cm.llm.load(cl, file), r"rope scaling 'yarn' is not supported")


def test_a_missing_gguf_file_is_named(cl, tmp_path):
    refused(cl, lambda: cm.llm.load(cl, tmp_path / "nowhere.gguf"), r"nowhere\.gguf: no such file")


def test_generate_reads_prompt_and_stops_with_the_files_tokenizer(cl, files, tiny):
    m = cm.llm.load(cl, files["q8_0"])
    try:
        result = m.generate("Old computers", max_new_tokens=5, chat=False)
        assert result.prompt_tokens == len(Tokenizer.from_dir(tiny).encode("Old computers"))
        assert m.stop_ids() == {Tokenizer.from_dir(tiny).token_to_id("</s>")}
    finally:
        m.close()


def test_bad_files_are_refused_before_anything_moves(cl, files, tiny, tmp_path):
    not_gguf = tmp_path / "model.safetensors"
    shutil.copy(tiny / "model.safetensors", not_gguf)
    refused(cl, lambda: cm.llm.load(cl, not_gguf), "a file, but not a GGUF file")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files["f32"].read_bytes()[:5000])
    refused(cl, lambda: cm.llm.load(cl, cut), "not a readable GGUF file")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    refused(cl, lambda: cm.llm.load(cl, tmp_path / "gpt2.gguf"), "architecture 'gpt2' is not supported")

    def ints(name, value):
        return value.astype(np.int32), gguf.GGMLQuantizationType.I32

    bad = export(tiny, tmp_path / "i32.gguf", encode=ints)
    refused(cl, lambda: cm.llm.load(cl, bad), "is I32; cmatrix reads F32, F16, BF16, Q8_0, Q4_0")
