"""Errors shared across zerojax modules."""
from __future__ import annotations


class CheckpointError(Exception):
    """A bad, missing, partial or incompatible checkpoint.

    Messages name the file or tag and say what is wrong with it.
    """
