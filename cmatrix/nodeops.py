"""Node-side operations on resident matrices (driver half): activations,
softmax, RMSNorm, rotary embeddings, grouped-query repeat and attention."""

from __future__ import annotations


class NodeOps:
    """Mixed into :class:`cmatrix.Cluster`."""
