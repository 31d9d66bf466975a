"""Plain script whose init() is refused (too few shares): must end, never hang."""

import sys

import cmatrix as cm

try:
    cm.init(weights=[1.0])
except cm.InputError as err:
    print("REFUSED", err, flush=True)
    if sys.argv[1:] == ["raise"]:
        raise
