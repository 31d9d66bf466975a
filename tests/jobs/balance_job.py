"""Shares from measured speed on a cluster whose rank 1 the test slowed down with a CPU quota
(see tests/slow_rank.py).

    mpiexec -n 2 python tests/jobs/balance_job.py SITUATION [MODEL] [LIMIT_FILE]

SITUATION:
- "init": ``cm.init(weights="auto")`` measures; rank 1, held to a fraction of a core, gets
  the smaller share, and a product split by those shares is exact.
- "rebalance": rank 1 runs free until the 8th new token, when this job writes the quota into
  LIMIT_FILE; generation goes on, the driver moves work away from rank 1, and the tokens
  equal those of the same model loaded without rebalancing.
- "zero": shares [1, 0]: rank 1 holds nothing and takes no part in any decode step.
- "replan": ``model.replan`` in the middle of a sequence (to [0.8, 0.2], then [1, 0], then
  back): the K/V cache moves with the heads, and the logits equal those of a model never moved.
- "replan-fault": rank 1 fails in a re-plan (the test sets CMATRIX_FAULT): the driver gets the
  error, the model is closed, and it loads again.
"""

import sys
from pathlib import Path

import numpy as np
from tally import Tally

import cmatrix as cm

situation = sys.argv[1]
cl = cm.init(weights="auto" if situation == "init" else None)
t = Tally(f"balance-{situation}", cl)


def even_split_tokens(model_path: str, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the model split evenly, never moved: the reference."""
    ref = cm.llm.load(cl, model_path, weights=[0.5, 0.5], rebalance=False)
    try:
        t.check("both ranks run the steps of an even split", ref.members == [0, 1], f"members {ref.members}")
        return ref.generate(token_ids=prompt, max_new_tokens=n, stop_token_ids=[]).token_ids
    finally:
        ref.close()

if situation == "init":
    shares = [float(w) for w in cl.weights]
    print("shares:", ",".join(f"{s:g}" for s in shares), flush=True)
    print(cl.ranks, flush=True)
    t.check("the slowed rank gets the smaller share", shares[1] < shares[0], f"shares {shares}")
    t.check("the rank table shows the measured speed", "GFLOP/s" in str(cl.ranks), str(cl.ranks))
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((16, 96), dtype=np.float32), rng.standard_normal((96, 301), dtype=np.float32)
    t.close("a product split by measured shares", cl.matmul(a, cl.shard(w)), a @ w, rtol=1e-5)

elif situation == "rebalance":
    model_path, limit_file = sys.argv[2], Path(sys.argv[3])
    prompt = [1, 5, 9, 33, 2, 17]

    def slow_down_at(k: int):
        def on_token(_token: int, seen=[0]) -> None:  # noqa: B006 - a counter of this run's tokens
            seen[0] += 1
            if seen[0] == k:
                limit_file.write_text(sys.argv[4])  # the quota, as the test computed it
        return on_token

    m = cm.llm.load(cl, model_path, weights=[0.5, 0.5], rebalance=True)
    got = m.generate(token_ids=prompt, max_new_tokens=200, stop_token_ids=[], on_token=slow_down_at(8))
    print(got.summary(), flush=True)
    for line in got.rebalances:
        print(line, flush=True)
    t.check("work moved away from the slowed rank", bool(got.rebalances) and m.weights[1] < 0.5,
            f"re-plans {got.rebalances}, shares now {list(m.weights)}")
    t.check("the summary shows each rank's compute time", "rank compute ms/token" in got.summary(),
            got.summary())
    m.close()
    limit_file.write_text("-1" if limit_file.name.endswith("quota_us") else "max 100000")
    want = even_split_tokens(model_path, prompt, 200)
    t.check("the same tokens as without rebalancing", got.token_ids == want, f"{got.token_ids}\n{want}")

elif situation == "zero":
    model_path = sys.argv[2]
    prompt = [1, 5, 9, 33, 2, 17]
    m = cm.llm.load(cl, model_path, weights=[1.0, 0.0])
    t.check("only the driver runs the steps", m.members == [0], f"members {m.members}")
    got = m.generate(token_ids=prompt, max_new_tokens=12, stop_token_ids=[])
    stats = m.rank_stats()
    t.check("rank 1 took part in no decode step", stats[1]["steps"] == 0 and stats[0]["steps"] > 0,
            f"steps {[s['steps'] for s in stats]}")
    m.close()
    want = even_split_tokens(model_path, prompt, 12)
    t.check("the same tokens as an even split", got.token_ids == want, f"{got.token_ids}\n{want}")

elif situation == "replan":
    model_path = sys.argv[2]
    ids = [1, 5, 9, 33, 2, 17, 40, 8, 11, 3, 25, 6]
    ref = cm.llm.load(cl, model_path, weights=[0.5, 0.5])
    want = ref.forward(ids, start=0, all_logits=True)
    ref.close()
    m = cm.llm.load(cl, model_path, weights=[0.5, 0.5])
    got = [m.forward(ids[:4], start=0, all_logits=True)]
    for i, shares in zip(range(4, 12, 2), ([0.8, 0.2], [1.0, 0.0], [0.2, 0.8], [0.5, 0.5]), strict=True):
        m.replan(shares)
        got.append(m.forward(ids[i:i + 2], all_logits=True))
    t.check("a rank moved to no share leaves the steps, and comes back", m.members == [0, 1], str(m.members))
    t.close("logits with the K/V cache moved four times", np.concatenate(got), want, rtol=1e-4)
    t.refused("shares for another number of ranks", "weights", lambda: m.replan([1.0]))
    t.refused("an invalid rebalance setting", "rebalance",
              lambda: cm.llm.load(cl, model_path, rebalance="yes"))
    m.close()

elif situation == "replan-fault":  # CMATRIX_FAULT=llm_kv_scatter:import:1
    model_path = sys.argv[2]
    ids = [1, 5, 9, 33, 2, 17]
    m = cm.llm.load(cl, model_path, weights=[0.5, 0.5])
    want = m.forward(ids, start=0, all_logits=True)
    # rank 1 fails while the K/V cache comes back: the model is closed, not left half placed
    try:
        m.replan([0.6, 0.4])
    except cm.RankError as err:
        t.check("the failing rank is named", err.ranks == [1], str(err))
    else:
        t.check("a failure while the cache comes back is raised", False)
    t.refused("a model a failed re-plan closed", "closed", lambda: m.forward([1]))
    t.refused("re-planning a closed model", "closed", lambda: m.replan([0.5, 0.5]))
    m.close()
    again = cm.llm.load(cl, model_path, weights=[0.5, 0.5])
    t.close("the model loads again after it", again.forward(ids, start=0, all_logits=True), want, rtol=1e-4)
    again.close()

t.finish()
