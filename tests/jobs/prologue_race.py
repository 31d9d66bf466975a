"""A seed-style script under plain mpirun: a prologue after the import writes a random matrix
to a file that the driver then reads back.

Run: mpiexec -n N python prologue_race.py FOLDER (every rank starts the script). Only the
driver may run the prologue: were workers to run it too, each would write its own random
matrix to the same file, and the driver could read another rank's. Prints one
"PROLOGUE pid" line per rank that ran it and "race: ok" when the product is right.
"""

import os
import sys

import numpy as np

import cmatrix as cm

folder = sys.argv[1]
print(f"PROLOGUE {os.getpid()}", flush=True)
a = np.random.default_rng().standard_normal((6, 5)).astype(np.float32)
np.save(os.path.join(folder, "a.npy"), a)
cl = cm.init()
got = cl.matmul(os.path.join(folder, "a.npy"), np.eye(5, dtype=np.float32))
if not np.array_equal(got, a):
    sys.exit("race: the driver read a matrix another rank wrote")
print(f"race: ok on {cl.size} ranks")
