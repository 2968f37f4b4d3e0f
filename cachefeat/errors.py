"""What an error means for the exit status (docs/cli.md, Exit status). Each part of the package raises its
own error classes (SpecError, ManifestError, CacheError, TrainError, ...), all of which mean bad usage or
input, exit status 2, unless they are also one of these:

- `Damaged`: data on disk is damaged (a cache, a checkpoint); the message names it and the command that
  repairs it. Exit status 1.
- `Failed`: the work itself failed (not the user's input). Exit status 1.
"""
from __future__ import annotations


class Failed(Exception):
    """The work failed (exit status 1); the message says what, in one line."""

    exit_code = 1


class Damaged(Failed):
    """Data on disk is damaged (exit status 1); the message names the file and the command that repairs it."""
