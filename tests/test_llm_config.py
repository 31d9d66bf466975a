"""cmatrix.llm in process: config.json parsing (against transformers' rotary frequencies)
and the fused weight layout. The multi-rank runs are tests/test_llm_mpi.py."""
# ruff: noqa: F403, F405

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from llm_helpers import *  # noqa: E402 - fixtures and helpers shared by the llm tests

# ---- config ---------------------------------------------------------------------------

BASE = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def cfg_of(**changes) -> DecoderConfig:
    return DecoderConfig.from_dict({**BASE, **changes})


def same_scaling(s: dict | None) -> dict | None:
    """rope_scaling without the keys that only say where it came from."""
    return None if s is None else {k: v for k, v in s.items() if k not in ("type", "rope_theta")}


def transformers_inv_freq(raw: dict) -> np.ndarray:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = copy.deepcopy({k: v for k, v in raw.items() if k != "model_type"})  # transformers edits dicts
    return LlamaRotaryEmbedding(transformers.LlamaConfig(**raw)).inv_freq.numpy()


@pytest.mark.parametrize("v4, v5", [
    (dict(rope_theta=500000.0), {"rope_type": "default", "rope_theta": 500000.0}),
    (dict(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0}),
     {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    (dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3}),
     {"rope_type": "llama3", **LLAMA3, "rope_theta": 500000.0}),
    (dict(rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3}),
     {"rope_type": "llama3", **LLAMA3, "rope_theta": 500000.0}),
], ids=["default", "linear", "llama3", "llama3-type-key"])
def test_v4_and_v5_rope_keys_give_the_same_config(v4, v5):
    old, new = cfg_of(**v4), cfg_of(rope_parameters=v5)
    for field in DecoderConfig.__dataclass_fields__:
        if field != "rope_scaling":
            assert getattr(old, field) == getattr(new, field), field
    assert same_scaling(old.rope_scaling) == same_scaling(new.rope_scaling)
    assert (old.rope_scaling is None) == (v5["rope_type"] == "default")
    np.testing.assert_array_equal(old.inv_freq(), new.inv_freq())
    assert old.inv_freq().dtype == np.float32 and old.inv_freq().shape == (old.head_dim // 2,)


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "llama3", **LLAMA3},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 8},
], ids=["default", "linear", "llama3", "llama3-b"])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_inv_freq_equals_transformers(scaling, head_dim):
    raw = {**BASE, "rope_theta": 500000.0, "head_dim": head_dim, "max_position_embeddings": 4096}
    if scaling:
        raw["rope_scaling"] = scaling
    ours = DecoderConfig.from_dict(copy.deepcopy(raw)).inv_freq()
    theirs = transformers_inv_freq(raw)
    assert ours.shape == theirs.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    if scaling:  # the scaling really changed something
        plain = DecoderConfig.from_dict({**BASE, "rope_theta": 500000.0, "head_dim": head_dim}).inv_freq()
        assert not np.allclose(ours, plain)


def test_rope_parameters_with_top_level_theta():
    raw = {**BASE, "rope_theta": 500000.0, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    ours = DecoderConfig.from_dict(copy.deepcopy(raw))
    np.testing.assert_allclose(ours.inv_freq(), transformers_inv_freq(raw), rtol=1e-6)


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="gpt2"), r"model_type 'gpt2' is not supported"),
    (dict(model_type=None), r"model_type None is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"rope scaling 'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope scaling 'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"'llama3' needs low_freq_factor"),
    (dict(rope_scaling={"rope_type": "linear"}), r"'linear' needs factor"),
    (dict(rope_theta=-1.0), r"rope_theta must be positive"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu'"),
    (dict(num_attention_heads=4, num_key_value_heads=3),
     r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(hidden_size=60, num_attention_heads=4, num_key_value_heads=4), r"head_dim 15 must be even"),
    (dict(head_dim=9), r"head_dim 9 must be even"),
    (dict(hidden_size=66, num_attention_heads=4),
     r"hidden_size 66 is not a multiple of num_attention_heads 4"),
    (dict(vocab_size=0), r"vocab_size must be a positive integer"),
    (dict(num_hidden_layers=True), r"num_hidden_layers must be a positive integer"),
    (dict(intermediate_size="96"), r"intermediate_size must be a positive integer"),
    (dict(num_hidden_layers=10**9), r"num_hidden_layers 1000000000 is beyond any real checkpoint"),
    (dict(vocab_size=2**40), r"vocab_size .* is beyond any real checkpoint"),
    (dict(head_dim="64"), r"head_dim must be a positive integer"),
    (dict(rms_norm_eps="1e-5"), r"rms_norm_eps must be a small number"),
    (dict(tie_word_embeddings="false"), r"tie_word_embeddings must be true or false"),
    (dict(attention_bias=1), r"attention_bias must be true or false"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0}), r"factor must be a positive number"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
     r"partial_rotary_factor is not supported"),
    (dict(rope_scaling={"rope_type": "linear", "factor": "abc"}), r"factor must be a positive number"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0,
                        "original_max_position_embeddings": 64}), r"low_freq_factor != high_freq_factor"),
])
def test_bad_configs_are_refused_naming_the_problem(changes, match):
    with pytest.raises(cm.InputError, match=match):
        cfg_of(**changes)


def test_a_config_that_is_not_an_object_is_refused():
    with pytest.raises(cm.InputError, match="expected a JSON object"):
        DecoderConfig.from_dict([1, 2])


def test_missing_or_unreadable_config_json(tmp_path):
    with pytest.raises(cm.InputError, match=r"config\.json: not found"):
        DecoderConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(cm.InputError, match=r"config\.json: cannot read it as JSON"):
        DecoderConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "bert"}))
    with pytest.raises(cm.InputError, match=r"config\.json: model_type 'bert'"):
        DecoderConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert DecoderConfig.from_dir(tmp_path) == cfg_of()


def test_defaults_biases_and_explicit_head_dim():
    c = DecoderConfig.from_dict({k: v for k, v in BASE.items() if k != "num_key_value_heads"})
    assert c.num_kv_heads == c.num_heads == 4 and c.group_size == 1 and c.head_dim == 16
    assert (c.rope_theta, c.rope_scaling, c.windows) == (10000.0, None, (None, None))
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings) == (False, False, False, False)
    c = cfg_of(head_dim=32)
    assert c.head_dim == 32 and c.inv_freq().shape == (16,)
    # an explicit head_dim need not divide hidden_size
    assert cfg_of(hidden_size=66, num_attention_heads=4, head_dim=16).head_dim == 16
    assert cfg_of(model_type="qwen2").qkv_bias and not cfg_of(model_type="qwen2").o_bias
    c = cfg_of(attention_bias=True, mlp_bias=True)
    assert c.qkv_bias and c.o_bias and c.mlp_bias
    # transformers builds Mistral without biases and Qwen2 with q/k/v biases only, whatever
    # attention_bias/mlp_bias say
    c = cfg_of(model_type="mistral", attention_bias=True, mlp_bias=True)
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias)
    c = cfg_of(model_type="qwen2", attention_bias=True, mlp_bias=True)
    assert c.qkv_bias and not (c.o_bias or c.mlp_bias)
    assert cfg_of(num_key_value_heads=None).num_kv_heads == cfg_of().num_heads
    assert cfg_of(num_attention_heads=8, num_key_value_heads=2).group_size == 4


@pytest.mark.parametrize("changes, windows", [
    (dict(model_type="mistral", sliding_window=5, num_hidden_layers=3), (5, 5, 5)),
    (dict(model_type="mistral", sliding_window=None, num_hidden_layers=3), (None, None, None)),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2,
          num_hidden_layers=4), (None, None, 4, 4)),
    (dict(model_type="qwen2", use_sliding_window=False, sliding_window=4, max_window_layers=2,
          num_hidden_layers=4), (None,) * 4),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0,
          num_hidden_layers=2), (4, 4)),
    (dict(model_type="llama", sliding_window=7, num_hidden_layers=3), (None, None, None)),
    (dict(model_type="qwen2", sliding_window=6, num_hidden_layers=3, use_sliding_window=True,
          layer_types=["sliding_attention", "full_attention", "sliding_attention"]), (6, None, 6)),
    # as transformers: Qwen2 windows nothing without use_sliding_window; Mistral ignores layer_types
    (dict(model_type="qwen2", sliding_window=6, num_hidden_layers=3,
          layer_types=["sliding_attention", "full_attention", "sliding_attention"]), (None,) * 3),
    (dict(model_type="mistral", sliding_window=6, num_hidden_layers=2,
          layer_types=["full_attention", "sliding_attention"]), (6, 6)),
    (dict(model_type="mistral", num_hidden_layers=2), (4096, 4096)),
])
def test_sliding_windows_per_layer(changes, windows):
    assert cfg_of(**changes).windows == windows


@pytest.mark.parametrize("settings", [
    dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    dict(num_hidden_layers=4, use_sliding_window=False, sliding_window=4, max_window_layers=1),
    dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=0),
])
def test_qwen2_windows_from_a_transformers_config_json(settings):
    """A config.json as transformers writes it (with layer_types) gives its windows."""
    raw = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=128, **settings).to_dict()
    theirs = transformers.Qwen2Config.from_dict(copy.deepcopy(raw))
    if not hasattr(theirs, "layer_types"):
        pytest.skip("this transformers has no layer_types")
    want = tuple(theirs.sliding_window if t == "sliding_attention" else None for t in theirs.layer_types)
    assert DecoderConfig.from_dict(raw).windows == want


def test_qwen2_default_max_window_layers_is_transformers_default():
    raw = {**BASE, "model_type": "qwen2", "num_hidden_layers": 30, "use_sliding_window": True,
           "sliding_window": 4}
    theirs = transformers.Qwen2Config(**{k: v for k, v in raw.items() if k != "model_type"})
    assert theirs.max_window_layers == 28
    assert DecoderConfig.from_dict(raw).windows == (None,) * 28 + (4, 4)


# ---- layout ---------------------------------------------------------------------------

rng = np.random.default_rng(5)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("heads, kv, head_dim", [(4, 2, 8), (8, 2, 4), (4, 4, 6), (6, 1, 4)])
def test_fuse_then_split_qkv_recovers_q_k_v_per_group(heads, kv, head_dim):
    hidden = 24
    cfg = cfg_of(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)
    rep, t = heads // kv, 3
    qw, kw, vw = f32(heads * head_dim, hidden), f32(kv * head_dim, hidden), f32(kv * head_dim, hidden)
    fused = lay.fuse_qkv(qw, kw, vw, cfg)
    assert fused.shape == ((heads + 2 * kv) * head_dim, hidden) and fused.flags.c_contiguous
    h = f32(t, hidden)
    q, k, v = lay.split_qkv(h @ fused.T, cfg)
    want_q = (h @ qw.T).reshape(t, kv, rep, head_dim)  # query head j uses KV head j // rep
    want_k, want_v = (h @ kw.T).reshape(t, kv, head_dim), (h @ vw.T).reshape(t, kv, head_dim)
    np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k, want_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, want_v, rtol=1e-5, atol=1e-5)
    # a rank's contiguous block of rows is whole groups: here the last group alone
    unit = (rep + 2) * head_dim
    q1, k1, v1 = lay.split_qkv(h @ fused[-unit:].T, cfg)
    assert q1.shape == (t, 1, rep, head_dim)
    np.testing.assert_allclose(q1[:, 0], want_q[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k1[:, 0], want_k[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v1[:, 0], want_v[:, -1], rtol=1e-5, atol=1e-5)
    # biases (1-D) are fused the same way
    qb, kb, vb = f32(heads * head_dim), f32(kv * head_dim), f32(kv * head_dim)
    bq, bk, bv = lay.split_qkv(lay.fuse_qkv(qb, kb, vb, cfg)[None], cfg)
    np.testing.assert_array_equal(bq[0], qb.reshape(kv, rep, head_dim))
    np.testing.assert_array_equal(bk[0], kb.reshape(kv, head_dim))
    np.testing.assert_array_equal(bv[0], vb.reshape(kv, head_dim))


@pytest.mark.parametrize("inter, chunk", [(96, 32), (12, 1), (12, 4), (64, 64)])
def test_fuse_then_split_gate_up(inter, chunk):
    hidden, t = 16, 4
    gate, up, h = f32(inter, hidden), f32(inter, hidden), f32(t, hidden)
    fused = lay.fuse_gate_up(gate, up, chunk)
    assert fused.shape == (2 * inter, hidden)
    g, u = lay.split_gate_up(h @ fused.T, chunk)
    np.testing.assert_allclose(g, h @ gate.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u, h @ up.T, rtol=1e-5, atol=1e-5)
    # a block of 2 * chunk rows holds matching gate and up rows
    if inter >= 2 * chunk:
        g1, u1 = lay.split_gate_up(h @ fused[2 * chunk:4 * chunk].T, chunk)
        np.testing.assert_allclose(g1, h @ gate[chunk:2 * chunk].T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(u1, h @ up[chunk:2 * chunk].T, rtol=1e-5, atol=1e-5)
    gb, ub = f32(inter), f32(inter)
    g2, u2 = lay.split_gate_up(lay.fuse_gate_up(gb, ub, chunk)[None], chunk)
    np.testing.assert_array_equal(g2[0], gb)
    np.testing.assert_array_equal(u2[0], ub)


def test_pack_unpack_roundtrip():
    vectors = {"a": f32(5), "b": f32(2, 3), "empty": np.zeros(0, np.float32),
               "c": np.arange(4, dtype=np.float64)}
    buffer, where = lay.pack(vectors)
    assert buffer.dtype == np.float32 and buffer.size == 5 + 6 + 0 + 4
    assert where == {"a": (0, 5), "b": (5, 6), "empty": (11, 0), "c": (11, 4)}
    back = lay.unpack(buffer.copy(), where)
    assert list(back) == list(vectors)
    for name, v in vectors.items():
        np.testing.assert_array_equal(back[name], v.ravel().astype(np.float32))
    assert lay.pack({})[0].size == 0


def test_group_step_and_mlp_chunk():
    c = cfg_of(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)  # 16 values per group
    assert lay.group_step(c, None) == 1 and lay.group_step(c, "q8_0") == 2
    c = cfg_of(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # 32 per group
    assert lay.group_step(c, "q4_0") == 1
    c = cfg_of(hidden_size=64, num_attention_heads=8, num_key_value_heads=8)  # 8 per group
    assert lay.group_step(c, "q8_0") == 4
    assert lay.mlp_chunk(cfg_of(intermediate_size=96), None) == 32
    assert lay.mlp_chunk(cfg_of(intermediate_size=100), None) == 1
    lay.check_quant(cfg_of(), "q8_0")
    lay.check_quant(cfg_of(hidden_size=48, intermediate_size=100), None)  # no quant: anything goes


@pytest.mark.parametrize("changes, quant, match", [
    (dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4), "q8_0",
     r"hidden_size 48 is not a multiple of 32"),
    (dict(intermediate_size=80), "q4_0", r"intermediate_size 80 is not a multiple of 32"),
    (dict(hidden_size=64, num_attention_heads=3, num_key_value_heads=3, head_dim=16), "q8_0",
     r"3 KV groups cannot be split in units of 2"),
    (dict(hidden_size=64, num_attention_heads=6, num_key_value_heads=6, head_dim=8), "q8_0",
     r"6 KV groups cannot be split in units of 4"),
    (dict(), "q5_k", r"q5_k"),
])
def test_check_quant_refusals(changes, quant, match):
    with pytest.raises(cm.InputError, match=match):
        lay.check_quant(cfg_of(**changes), quant)


def test_a_quant_refusal_happens_before_anything_moves(cl, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "intermediate_size": 80}))
    refused(cl, lambda: cm.llm.load(cl, tmp_path, quant="q8_0"), r"intermediate_size 80")
