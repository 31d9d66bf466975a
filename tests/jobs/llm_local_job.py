"""Ranks reading their weight blocks from their own copy of the model (local_weights): the
logits equal those of the driver sending every block, and the load moves (almost) nothing
between ranks when every rank has the copy.

    mpiexec -n 2 python tests/jobs/llm_local_job.py MODEL SITUATION

SITUATION: "same" (every rank sees the driver's copy at MODEL) or "differs" (the test gave
rank 1 another model at the same path, in a mount namespace of its own).
"""

import sys

import numpy as np
from tally import Tally

import cmatrix as cm

path, situation = sys.argv[1], sys.argv[2]
cl = cm.init()
t = Tally("local", cl)
ids = [5, 17, 200, 3, 99, 42, 7, 311, 12, 64]


def load(mode: str, **options):
    before = cl.stats()["bytes_moved"]
    m = cm.llm.load(cl, path, weights=[0.6, 0.4], local_weights=mode, **options)
    moved = cl.stats()["bytes_moved"] - before
    try:
        return m.forward(ids, start=0, all_logits=True), moved, m.local_ranks
    finally:
        m.close()


for options in ({}, {"quant": "q4_0"}, {"dtype": "bfloat16"}) if situation == "same" else ({},):
    label = ", ".join(f"{k}={v}" for k, v in options.items()) or "stored type"
    sent, sent_moved, _ = load("off", **options)
    got, moved, local = load("auto", **options)
    t.check(f"{label}: same logits as the driver sending", np.array_equal(got, sent),
            f"max difference {float(np.abs(got - sent).max()):.2e}")
    if situation == "same":
        t.check(f"{label}: every rank read its own copy", local == (True, True), f"{local}")
        t.check(f"{label}: the load moved next to nothing", moved < sent_moved / 20,
                f"{moved} bytes against {sent_moved} when the driver sends")
    else:
        t.check(f"{label}: rank 1's copy differs, so it was sent its blocks", local == (True, False)
                and moved == sent_moved, f"{local}, {moved} bytes against {sent_moved}")
if situation == "differs":  # refused after asking the ranks, before any weight moves
    before = cl.stats()["bytes_moved"]
    try:
        load("on")
        t.check("local_weights='on' with a rank whose copy differs is refused", False, "it loaded")
    except cm.InputError as exc:
        text = str(exc)
        t.check("local_weights='on' with a rank whose copy differs is refused",
                "rank 1 on host" in text and "differs from the driver's copy" in text and "rank 0" not in text
                and cl.stats()["bytes_moved"] == before, text)
t.finish()
