"""Rank half of the node-side operations (see :mod:`cmatrix.nodeops`)."""

from __future__ import annotations
