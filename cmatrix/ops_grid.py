"""Rank half of grid mode (see :mod:`cmatrix.grid`)."""

from __future__ import annotations
