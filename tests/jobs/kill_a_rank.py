"""The driver kills rank 1 (SIGKILL, as the out-of-memory killer does) and runs one more
command. Run under cmatrix launch, which names the dead rank; prints "KILLED pid" first."""

import json
import os
import signal
from pathlib import Path

import numpy as np

import cmatrix as cm

cl = cm.init()
card = json.loads(Path(os.environ["CMATRIX_JOB_DIR"], "rank1.json").read_text())
print(f"KILLED {card['pid']}", flush=True)
os.kill(card["pid"], signal.SIGKILL)
W = cl.shard(np.ones((64, 64), np.float32))
cl.matmul(np.ones((1, 64), np.float32), W)
