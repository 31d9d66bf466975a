"""Save a small sharded matrix to the cache: each rank writes its shard to its own host's
cache folder (``CMATRIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/cmatrix``, else
``~/.cache/cmatrix``, resolved on that rank's host)."""

import numpy as np

import cmatrix as cm

cl = cm.init()
cl.shard(np.arange(8 * 12, dtype=np.float32).reshape(8, 12), name="launch.where", cache="save")
print("SAVED", cl.size)
