"""Every rank prints its rank and the environment variables named in argv, as one JSON line
(a plain script: no MPI needed to read what the launcher set)."""

import json
import os
import sys

rank = next((os.environ[v] for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK") if v in os.environ), None)
line = "ENV " + json.dumps({"rank": int(rank), **{name: os.environ.get(name) for name in sys.argv[1:]}})
os.write(1, (line + "\n").encode())  # one write: the launcher merges the ranks' output
