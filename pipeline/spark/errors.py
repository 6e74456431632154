"""The featurize job's errors (jobs/featurize.py prints them as ``featurize: error: ...`` and exits 2)."""
from __future__ import annotations


class FeaturizeError(RuntimeError):
    """The job cannot go on; the message says why. Nothing is committed to the output."""


class RejectLimitError(FeaturizeError):
    """More lines are malformed than the contract allows. The staging folder is kept with the rejected
    lines and their reasons, for inspection; nothing is committed."""
