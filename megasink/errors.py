"""The error type for problems with the user's inputs, as opposed to bugs.

A ``UserError`` (a bad config key, a truncated data file, a damaged checkpoint, a checkpoint
that does not fit the model) carries a message that says what is wrong, where, and what to
do. The command lines print that message as one line and exit 2; under torchrun only rank 0
prints it. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem with the user's inputs (config, data, checkpoints): reported in one line, exit 2."""


def report_user_error(prefix: str, error: BaseException) -> int:
    """Print ``prefix: error`` on stderr (rank 0 only under a launcher); return the exit code 2."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"{prefix}: {error}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


class DataError(UserError, ValueError):
    """Training data that cannot be used as configured (a truncated .bin, a corrupt .idx, a
    vocabulary larger than model.vocab_size, a loader state from other data)."""
