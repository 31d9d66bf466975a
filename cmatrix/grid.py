"""Grid mode (the seed's "System 2"): both operands in 2-D blocks across all ranks."""

from __future__ import annotations


class GridOps:
    """Mixed into :class:`cmatrix.Cluster`."""
