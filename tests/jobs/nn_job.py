"""cm.nn.shard_linears on random transformers models (BERT-, GPT-2- and Llama-style)
gives the unmodified model's outputs.

Run: mpiexec -n N python -m cmatrix run tests/jobs/nn_job.py '[w0, ...]' ['["numpy", ...]']
Prints "nn: K models, 0 failures on N ranks"; exits non-zero on a mismatch.
"""

import json
import sys

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import cmatrix as cm

weights = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
names = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
cl = cm.init(weights=weights, backends=names)
torch.manual_seed(cl.size)
failures = []
ids = torch.randint(0, 97, (2, 9))
models = {
    "bert": (BertModel(BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)),
             lambda m: m(input_ids=ids).last_hidden_state, 13),
    "gpt2": (GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                        bos_token_id=0, eos_token_id=0)),
             lambda m: m(input_ids=ids).logits, 9),
    "llama (GQA)": (LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, max_position_embeddings=32,
                                                 bos_token_id=0, eos_token_id=0, pad_token_id=0)),
                    lambda m: m(input_ids=ids).logits, 15),
}
for label, (model, run, expected) in models.items():
    model.eval()
    with torch.no_grad():
        reference = run(model)
        swapped = cm.nn.shard_linears(model, cl)
        before = cl.stats()["bytes_moved"]
        out = run(model)
    scale = reference.abs().max().item()
    error = (out - reference).abs().max().item()
    print(f"{label}: {len(swapped)} linears on the cluster, max error {error:.2e} (scale {scale:.2f})")
    if len(swapped) != expected:
        failures.append(f"{label}: swapped {len(swapped)} linears, expected {expected}")
    if not all(isinstance(model.get_submodule(n), cm.nn.ClusterLinear) for n in swapped):
        failures.append(f"{label}: a swapped name is not a ClusterLinear")
    if error > 1e-4 * max(scale, 1.0):
        failures.append(f"{label}: outputs differ by {error:.3g}")
    if cl.size > 1 and cl.stats()["bytes_moved"] == before:
        failures.append(f"{label}: nothing moved between ranks: the linears did not run on the cluster")
print(f"nn: {len(models)} models, {len(failures)} failures on {cl.size} ranks")
for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
