"""Storage views: which ranks see which folder (shared file systems and node-local disks).

This module owns one question, asked once per folder at start-up: when rank r writes a file
into ``path``, which ranks see it? :func:`probe_views` answers it collectively (every rank
writes a nonce file, waits at a barrier, and lists which ranks' files it sees); ranks that see
each other's files share a *view* (typically a node with a local disk), and the lowest rank of
a view (:meth:`StorageViews.is_leader`) writes what must exist once per view (the markers of a
checkpoint, see :mod:`.save_load`). :func:`copy_to_views` sends the files one view has and
another lacks point to point to the other view's leader: ``training/data.py`` uses it for the
dataset index cache, which megatron-core builds on global rank 0 only.

What is *in* a view (checkpoint files, the tracker) is :mod:`.format`'s; which view resumes from
which files is :mod:`.checkpointer`'s. A shared file system whose clients cache directory
listings for longer than the probe waits (NFS ``acdirmin``/``lookupcache``) can look like
node-local views; the probe retries for ``settle_s`` seconds before it decides.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .verdicts import CheckpointError

PROBE_PREFIX = ".ppu-view-"


@dataclass
class StorageViews:
    """Which ranks see the same contents at ``path`` (result of :func:`probe_views`).

    Attributes:
        path: the folder probed.
        groups: the ranks of each view (sorted lists, ordered by lowest rank); ranks in
            ``absent``/``unwritable`` are in no group.
        absent: ranks on which ``path`` does not exist.
        unwritable: ranks that could not write a probe file there (rank -> reason).
    """

    path: str
    groups: List[List[int]]
    absent: List[int] = field(default_factory=list)
    unwritable: Dict[int, str] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        """One view holds every rank."""
        return len(self.groups) == 1 and not self.absent and not self.unwritable

    def group_of(self, rank: int) -> Optional[List[int]]:
        """The ranks that share ``rank``'s view (None if it has none)."""
        return next((g for g in self.groups if rank in g), None)

    def is_leader(self, rank: int) -> bool:
        """Whether ``rank`` is the lowest rank of its view (it writes the view's markers)."""
        g = self.group_of(rank)
        return g is not None and g[0] == rank

    def describe(self, flag: str) -> str:
        """One line for the start-up log: the views of ``flag``'s folder."""
        if self.shared:
            return f"{flag} {self.path}: one folder shared by all {len(self.groups[0])} ranks"
        if not self.groups and not self.unwritable:
            return f"{flag} {self.path}: does not exist on any rank"
        views = ", ".join("{" + _ranks(g) + "}" for g in self.groups)
        s = f"{flag} {self.path}: not shared; {len(self.groups)} views (ranks {views})"
        if self.absent:
            s += f"; absent on ranks {_ranks(self.absent)}"
        if self.unwritable:
            s += f"; not writable on ranks {_ranks(sorted(self.unwritable))}"
        return s


def _ranks(ranks: List[int]) -> str:
    ranks = sorted(ranks)
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def probe_views(path: str, *, create: bool, settle_s: float = 3.0) -> StorageViews:
    """Collective over the world: find which ranks see the same folder at ``path``.

    Every rank writes ``path/.ppu-view-<nonce>-<rank>`` (creating ``path`` first when
    ``create``), waits at a barrier, and looks for every rank's file; the probe files are
    removed afterwards. Where some rank does not see all files, the check is repeated
    for up to ``settle_s`` seconds (listing caches of network file systems).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    nonce = [uuid.uuid4().hex[:12] if rank == 0 else None]
    dist.broadcast_object_list(nonce, src=0)
    name = lambda r: os.path.join(path, f"{PROBE_PREFIX}{nonce[0]}-{r}")  # noqa: E731
    err = None
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            err = f"cannot create {path} on {socket.gethostname()}: {e}"
    present = os.path.isdir(path)
    wrote = False
    if present and err is None:
        try:
            with open(name(rank), "w") as f:
                f.write(socket.gethostname())
            wrote = True
        except OSError as e:
            err = f"cannot write into {path} on {socket.gethostname()}: {e}"
    dist.barrier()
    deadline = time.monotonic() + settle_s
    while True:
        seen = [r for r in range(world) if os.path.exists(name(r))] if present else []
        everyone = [None] * world
        dist.all_gather_object(everyone, (present, seen, err))
        complete = all(len(s) == world for _, s, _ in everyone)
        if complete or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    dist.barrier()
    if wrote:
        try:
            os.remove(name(rank))
        except OSError:
            pass
    absent = [r for r, (p, _, _) in enumerate(everyone) if not p]
    unwritable = {r: e for r, (p, _, e) in enumerate(everyone) if p and e is not None}
    groups: List[List[int]] = []
    for r, (p, s, e) in enumerate(everyone):
        if p and e is None and s and not any(r in g for g in groups):
            groups.append(sorted(x for x in s if x not in absent and x not in unwritable))
    # A consistent picture: the views partition the ranks that wrote (each sees exactly its group).
    for r, (p, s, e) in enumerate(everyone):
        if p and e is None:
            g = next(g for g in groups if r in g) if any(r in g for g in groups) else None
            if g is None or sorted(s) != g:
                raise CheckpointError(
                    f"{path}: ranks see inconsistent contents (rank {r} sees the probe files of ranks "
                    f"{_ranks(s)}); is a network file system still propagating? Retry, or use a folder on "
                    f"one shared file system or a node-local one.")
    return StorageViews(path, groups, absent, unwritable)


def copy_to_views(folder: str, views: StorageViews, src: int = 0) -> List[str]:
    """Collective: copy the files of ``folder`` that global rank ``src`` sees, and that the
    view of another rank lacks, into that view (sent point to point to the view's lowest
    rank, written under a temporary name and renamed). Returns the names this rank wrote."""
    rank, world = dist.get_rank(), dist.get_world_size()
    leader = views.is_leader(rank)
    listing = sorted(n for n in os.listdir(folder) if not n.startswith(".")
                     and os.path.isfile(os.path.join(folder, n))) if leader and os.path.isdir(folder) else None
    listings = [None] * world
    dist.all_gather_object(listings, listing)
    if listings[src] is None:
        raise ValueError(f"copy_to_views: rank {src} is not the lowest rank of its view of {folder}.")
    src_group = views.group_of(src)
    wrote = []
    for name in listings[src]:
        takers = [r for r, l in enumerate(listings) if l is not None and r not in src_group and name not in l]
        if not takers:
            continue
        size = [os.path.getsize(os.path.join(folder, name)) if rank == src else None]
        dist.broadcast_object_list(size, src=src)
        buf = torch.empty(size[0], dtype=torch.uint8)
        if rank == src:
            buf = torch.from_numpy(np.fromfile(os.path.join(folder, name), dtype=np.uint8))
            for r in takers:
                dist.send(buf, dst=r)
        elif rank in takers:
            dist.recv(buf, src=src)
            tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
            buf.numpy().tofile(tmp)
            os.replace(tmp, os.path.join(folder, name))
            wrote.append(name)
    dist.barrier()
    return wrote

