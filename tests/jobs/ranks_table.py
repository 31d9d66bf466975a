"""Print the rank table as JSON lines for the test to inspect."""

import json
import sys

import cmatrix as cm

weights = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
cl = cm.init(weights=weights)
print(cl.ranks)
for r in cl.ranks:
    print("RANK", json.dumps({"rank": r.rank, "host": r.host, "local_rank": r.local_rank,
                              "local_size": r.local_size, "backend": r.backend,
                              "weight": r.weight, "threads": r.threads}))
