"""One verdict for all ranks: the error type of checkpoints and the collectives that decide it.

A checkpoint problem is usually local: a file missing in one node's view, a corrupt rank file,
a folder one rank cannot write. If the rank that sees it raised alone, the others would wait
in the next collective until the process-group timeout. This module owns the rule that
prevents it: every check whose outcome may differ between ranks runs through :func:`agreed`
(each rank runs the check, the outcomes are all-gathered, and every rank raises the same
:class:`CheckpointError` naming each failing rank and its host) or :func:`same_everywhere`
(a small value that must be equal on all ranks). The other parts of the package
(:mod:`.storage`, :mod:`.format`, :mod:`.megatron_lm`, :mod:`.save_load`, :mod:`.checkpointer`)
raise :class:`CheckpointError` for what they find, and leave the collective verdict to these
two functions. :data:`SHARED_FS_FIX` is the advice every "some ranks cannot see their files"
verdict ends with.
"""
from __future__ import annotations

import logging
import socket
from typing import Any, Callable

import torch.distributed as dist

logger = logging.getLogger(__name__)

SHARED_FS_FIX = (
    "Every rank must see its own files of the checkpoint at --load: put --save/--load on a file system "
    "shared by all nodes, or, with node-local folders, resume on the same nodes with the same ranks per "
    "node as the run that saved it (each node's folder holds its own ranks' files; copying every node's "
    "folder into one gives a complete checkpoint).")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def agreed(fn: Callable[[], Any], what: str, fix: str = "") -> Any:
    """Collective: run ``fn`` on every rank; if it raised ``CheckpointError`` (or any
    error) on some rank, raise one ``CheckpointError`` naming each failing rank (and
    ending with ``fix``) on every rank. Returns ``fn()``'s value."""
    rank, world = dist.get_rank(), dist.get_world_size()
    value, err = None, None
    try:
        value = fn()
    except CheckpointError as e:
        err = str(e)
    except Exception as e:  # corrupt file, unreadable pickle, I/O error
        err = f"{type(e).__name__}: {e}"
        logger.exception("%s failed on rank %d", what, rank)
    verdicts = [None] * world
    dist.all_gather_object(verdicts, (err, socket.gethostname()))
    failed = [(r, e, h) for r, (e, h) in enumerate(verdicts) if e is not None]
    if failed:
        if len(failed) == world and len({e for _, e, _ in failed}) == 1:  # the same everywhere: no view issue
            raise CheckpointError(f"{what}: {failed[0][1]}")
        lines = "\n  ".join(f"rank {r} ({h}): {e}" for r, e, h in failed)
        raise CheckpointError(f"{what} failed on {len(failed)} of {world} ranks:\n  {lines}" + (f"\n{fix}" if fix else ""))
    return value


def same_everywhere(value, what: str) -> None:
    """Collective: raise the same ``CheckpointError`` on every rank unless ``value``
    (a small picklable object) is equal on all ranks."""
    world = dist.get_world_size()
    values = [None] * world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        per = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise CheckpointError(f"{what} ({per}).")
