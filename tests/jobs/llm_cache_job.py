"""A restarted job loads the decoder from the nodes' disks.

Run twice: mpiexec -n N python -m cmatrix run tests/jobs/llm_cache_job.py MODEL_DIR save|load OUT.npy
"save" loads the model with cache="save" and writes the logits of a fixed prompt to OUT.npy;
"load" (a new job) loads with cache="load" and checks it gets the same logits while the
weights moved stay a small fraction of the save's. Prints "llm-cache: MODE ok on N ranks".
"""

import sys

import numpy as np

import cmatrix as cm

path, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
cl = cm.init()
before = cl.stats()["bytes_moved"]
model = cm.llm.load(cl, path, cache=mode, name="test.tiny")
moved = cl.stats()["bytes_moved"] - before
logits = model.forward([3, 1, 4, 1, 5], start=0, all_logits=True)
if mode == "save":
    np.save(out, logits)
    np.save(out + ".moved.npy", np.array([moved]))
else:
    saved_moved = int(np.load(out + ".moved.npy")[0])
    assert np.array_equal(logits, np.load(out)), "logits differ after loading from the cache"
    assert cl.size == 1 or moved < 0.05 * saved_moved, (moved, saved_moved)
    print(f"loaded moving {moved} bytes (the save moved {saved_moved})")
print(f"llm-cache: {mode} ok on {cl.size} ranks")
