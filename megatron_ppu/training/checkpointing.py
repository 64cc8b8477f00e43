"""Atomic, exact checkpoints in Megatron's directory layout, on shared or node-local disks.

::

    SAVE/
      latest_checkpointed_iteration.txt   Megatron-LM's tracker file (the iteration)
      iter_0000100/                       a complete checkpoint (appears by rename only)
        metadata.json, common.pt, .metadata, __R_0.distcp
                                            the model, via megatron.core.dist_checkpointing,
                                            in Megatron's full layout under key "model"
                                            (replicated tensors written once, by one rank)
        ppu/run.json                        iteration, data position, layout, plan summary
        ppu/rank_00003.pt                   per rank: LR scheduler, ownership plan, RNG states,
                                            and this rank's share of its replica's state
      .iter_0000200.tmp-<nonce>/          a save in progress: never read, removed later

A crash at any point leaves the previous checkpoint and the tracker file intact:
the new directory only gets its final name after every rank has finished writing,
and the tracker is replaced atomically after that. ``--load`` reads the tracker (or,
without one, the newest complete ``iter_*``), never a ``.tmp`` directory.

**Replica state is written once per replica.** The inner-DP ranks of a replica hold
identical copies of the replica's local weights, DiLoCo snapshot θ(t) and outer
momentum, and (without ``--use-distributed-optimizer``) the inner optimizer state.
That state is flattened per dtype and split into ``inner_dp`` equal shares; inner-DP
rank i writes share i in its ``rank_*.pt``; on resume the shares are all-gathered
inside the replica (``ReplicaLayout.inner_dp_group``, fast links). The save log line
gives the bytes this rank wrote and the total over all ranks.

**File systems that are not shared.** At start-up every rank writes a nonce file into
``--save`` (and ``--load``, when it exists), and after a barrier lists which ranks'
files it sees: ranks that see each other's files share a *view* (typically a node
with a local disk). Both cases work:

* Saving: every rank creates the temp folder it writes into. Each view's lowest rank
  writes ``ppu/run.json`` in its view, renames the temp folder and updates the tracker
  there, so every view holds a complete checkpoint marker and the files of its own
  ranks. Copying the views' ``SAVE/`` folders into one folder gives an ordinary,
  complete checkpoint (no file name occurs in two views).
* Resuming reads only ``ppu/run.json`` and the rank's own ``ppu/rank_*.pt`` (the
  per-rank files hold each rank's complete local model), so node-local folders resume
  as long as every rank runs on a node that holds its files (the same ranks per node
  as the run that saved). The model part written through ``dist_checkpointing`` is
  complete only where all views are gathered (metadata is written by the coordinator,
  replicated tensors by one rank): ``--finetune`` (which reads only it) checks that
  every rank sees all of its files and otherwise names the missing files and the fix.
* Loading is decided collectively, so ranks never disagree: global rank 0 picks the
  checkpoint (tracker or newest complete ``iter_*`` in its view) and broadcasts it;
  every rank then reads what it needs, and the verdicts (found / missing / corrupt /
  incompatible) are all-gathered, so a file missing on one node is the same
  ``CheckpointError`` on every rank within seconds, never a hang in a collective.

The dataset index cache (``--data-cache-path``, by default ``~/.cache/megatron_ppu/index-cache``,
a per-user folder other nodes usually cannot see) is probed the same way by
``training/data.py``: megatron-core builds index caches on global rank 0 only, so where
the folder is not shared, rank 0 builds them and :func:`copy_to_views` sends every file
another view lacks to that view's lowest rank (written under a temporary name, then
renamed), before every rank reads its own copy.

What ``--load`` finds:

* ``--save D --load D`` with D absent or without any checkpoint: a first launch; the
  run starts from scratch and says so (Megatron-LM's usual auto-resume idiom).
* ``--load D`` (D not the ``--save`` folder) or ``--finetune`` that finds nothing to
  load, a tracker pointing at a missing folder, or ``iter_*`` folders none of which is
  complete: ``CheckpointError`` (the user meant a checkpoint; never a silent fresh start).

Resuming requires the same parallel layout, model and PPU/DiLoCo plan; anything
else is a ``CheckpointError`` naming the difference. ``--finetune`` loads the model
weights only (any TP/PP/N/replica layout: the weights are in Megatron's full
layout) and starts a fresh run from them.

Caveat: a shared file system whose clients cache directory listings for longer than
the probe waits (NFS ``acdirmin``/``lookupcache``) can look like node-local views; the
probe retries for a few seconds before it decides.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 2
PROBE_PREFIX = ".ppu-view-"
SHARED_FS_FIX = (
    "Every rank must see its own files of the checkpoint at --load: put --save/--load on a file system "
    "shared by all nodes, or, with node-local folders, resume on the same nodes with the same ranks per "
    "node as the run that saved it (each node's folder holds its own ranks' files; copying every node's "
    "folder into one gives a complete checkpoint).")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def iter_dir_name(iteration: int) -> str:
    """Megatron-LM's name of the folder of ``iteration``."""
    return f"iter_{iteration:07d}"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every RNG state of this rank (Python, NumPy, torch, CUDA, Megatron's tracker)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# -- which ranks see the same folder -----------------------------------------------------
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


# -- one verdict for all ranks -----------------------------------------------------------------
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


# -- replica-shared state, split over the inner-DP ranks -------------------------------------------
@dataclass(frozen=True)
class _TensorRef:
    index: int


def _strip(obj, tensors: list):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach())
        return _TensorRef(len(tensors) - 1)
    if isinstance(obj, dict):
        return type(obj)((k, _strip(v, tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj, tensors: list):
    if isinstance(obj, _TensorRef):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return type(obj)((k, _fill(v, tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def _dtype_groups(meta: List[Tuple[str, tuple]]) -> Dict[str, List[int]]:
    groups: Dict[str, List[int]] = {}
    for i, (dt, _) in enumerate(meta):
        groups.setdefault(dt, []).append(i)
    return dict(sorted(groups.items()))


def shard_state(state, group) -> dict:
    """This rank's share of ``state`` (identical on every rank of ``group``).

    The tensors are flattened and concatenated per dtype (a fixed order), and each
    concatenation is split into ``len(group)`` equal parts; rank i of ``group`` keeps
    part i (copied to host memory). :func:`unshard_state` puts the shares back together.
    """
    tensors: list = []
    skeleton = _strip(state, tensors)
    parts = dist.get_world_size(group) if group is not None else 1
    index = dist.get_rank(group) if group is not None else 0
    meta = [(str(t.dtype).replace("torch.", ""), tuple(t.shape)) for t in tensors]
    pieces = {}
    for dt, members in _dtype_groups(meta).items():
        n = sum(tensors[i].numel() for i in members)
        chunk = math.ceil(n / parts)
        lo, hi = index * chunk, min(n, (index + 1) * chunk)
        out, off = [], 0
        for i in members:
            t = tensors[i]
            a, b = max(lo, off), min(hi, off + t.numel())
            if a < b:
                out.append(t.reshape(-1)[a - off:b - off].to("cpu"))
            off += t.numel()
        pieces[dt] = torch.cat(out) if out else torch.empty(0, dtype=getattr(torch, dt))
    return {"skeleton": skeleton, "meta": meta, "parts": parts, "index": index, "pieces": pieces}


def unshard_state(shard: dict, group):
    """Collective over ``group``: all-gather the shares written by :func:`shard_state`
    and return the whole state (host tensors)."""
    parts = dist.get_world_size(group) if group is not None else 1
    index = dist.get_rank(group) if group is not None else 0
    if shard["parts"] != parts or shard["index"] != index:
        raise CheckpointError(f"the replica state was split over {shard['parts']} inner-DP ranks "
                              f"(this share: {shard['index']}), this run has {parts} (this rank: {index}).")
    meta = shard["meta"]
    tensors: List[Optional[torch.Tensor]] = [None] * len(meta)
    for dt, members in _dtype_groups(meta).items():
        dtype = getattr(torch, dt)
        n = sum(math.prod(meta[i][1]) for i in members)
        chunk = math.ceil(n / parts)
        mine = shard["pieces"][dt].reshape(-1)
        if parts > 1:
            pad = torch.zeros(chunk, dtype=dtype)
            pad[:mine.numel()] = mine
            raw = pad.view(torch.uint8) if dtype != torch.bool else pad.to(torch.uint8)
            gathered = [torch.empty_like(raw) for _ in range(parts)]
            dist.all_gather(gathered, raw, group=group)
            flat = torch.cat([g.view(dtype) if dtype != torch.bool else g.bool() for g in gathered])[:n]
        else:
            flat = mine
        off = 0
        for i in members:
            k = math.prod(meta[i][1])
            tensors[i] = flat[off:off + k].clone().view(meta[i][1])
            off += k
    return _fill(shard["skeleton"], tensors)


# -- saving -------------------------------------------------------------------------------------
def _rank_files_bytes(folder: str, rank: int) -> int:
    """Bytes of the model-part files this rank wrote into ``folder`` (dist_checkpointing:
    ``__<rank>_<i>.distcp``; the coordinator also writes the metadata and ``common.pt``)."""
    total = 0
    for n in os.listdir(folder):
        if n.startswith(f"__{rank}_") or (rank == 0 and n in ("common.pt", "metadata.json", ".metadata")):
            total += os.path.getsize(os.path.join(folder, n))
    return total


def save_checkpoint(save_dir: str, iteration: int, model, run_info: dict, rank_state: dict, *,
                    views: Optional[StorageViews] = None, replica_state=None, replica_group=None) -> dict:
    """Collective: write a complete checkpoint for ``iteration`` and point the tracker at it.

    ``rank_state`` is this rank's own state; ``replica_state`` (identical on the ranks of
    ``replica_group``) is written split over them (see :func:`shard_state`). ``views``
    (from :func:`probe_views`; probed here when None) says which ranks share a folder.
    Returns ``{"path", "rank_bytes", "total_bytes"}``.
    """
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    if views is None:
        views = probe_views(save_dir, create=True)
    nonce = [uuid.uuid4().hex[:8] if rank == 0 else None]
    dist.broadcast_object_list(nonce, src=0)
    final = os.path.join(save_dir, iter_dir_name(iteration))
    tmp = os.path.join(save_dir, f".{iter_dir_name(iteration)}.tmp-{nonce[0]}")
    leader = views.is_leader(rank)
    nbytes, err = 0, None
    try:
        os.makedirs(tmp, exist_ok=True)  # every rank creates what it writes (node-local disks)
        # ppu/ only after the model part: dist_checkpointing warns about an old incomplete
        # checkpoint when the folder it is given is not empty.
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": iteration,
                                 "checkpoint_version": 3.0}, tmp)
        nbytes += _rank_files_bytes(tmp, rank)
        os.makedirs(os.path.join(tmp, "ppu"), exist_ok=True)
        state = {"format_version": FORMAT_VERSION, "save_nonce": nonce[0], "rank": rank_state,
                 "replica_shard": shard_state(replica_state, replica_group) if replica_state is not None else None}
        path = os.path.join(tmp, "ppu", f"rank_{rank:05d}.pt")
        torch.save(state, path + ".part")
        os.replace(path + ".part", path)
        nbytes += os.path.getsize(path)
        if leader:
            info = dict(run_info, iteration=iteration, format_version=FORMAT_VERSION, save_nonce=nonce[0])
            text = json.dumps(info, indent=1, sort_keys=True)
            _atomic_write_text(os.path.join(tmp, "ppu", "run.json"), text)
            nbytes += len(text.encode())
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        logger.exception("checkpoint save failed on rank %d", rank)
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (err, nbytes, socket.gethostname()))
    failed = [(r, e, h) for r, (e, _, h) in enumerate(verdicts) if e is not None]
    if failed:
        if leader:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        lines = "\n  ".join(f"rank {r} ({h}): {e}" for r, e, h in failed)
        raise CheckpointError(f"saving checkpoint {final} failed; the previous checkpoint is intact:\n  {lines}")
    if leader:  # one rank per view finalises that view
        # (A folder that looked node-local but is shared, the probe having seen a stale listing:
        # another view's leader may have finalised this very save already.)
        if _save_nonce(final) != nonce[0]:
            try:
                if os.path.exists(final):  # re-save of the same iteration: swap, then drop the old one
                    old = f"{tmp}.old"
                    os.rename(final, old)
                    os.rename(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, final)
            except FileNotFoundError:
                if _save_nonce(final) != nonce[0]:
                    raise
        _atomic_write_text(os.path.join(save_dir, TRACKER), f"{iteration}\n")
        for name in os.listdir(save_dir):  # leftovers of crashed saves
            if name.startswith(".iter_") and ".tmp-" in name:
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    dist.barrier()
    return {"path": final, "rank_bytes": nbytes, "total_bytes": sum(b for _, b, _ in verdicts)}


def _save_nonce(path: str) -> Optional[str]:
    try:
        with open(os.path.join(path, "ppu", "run.json"), encoding="utf-8") as f:
            return json.load(f).get("save_nonce")
    except (OSError, ValueError):
        return None


# -- loading --------------------------------------------------------------------------------------
def find_checkpoint(load_dir: str) -> Optional[str]:
    """The complete checkpoint in ``load_dir`` (this rank's view), or None if the folder is
    absent or holds no checkpoint. Raises ``CheckpointError`` for a tracker that points at a
    missing folder or holds no iteration, and for ``iter_*`` folders none of which is complete."""
    if not os.path.isdir(load_dir):
        return None
    tracker = os.path.join(load_dir, TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker, encoding="utf-8").read().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} does not contain an iteration number ({text!r}); remove it "
                                  f"to fall back to the newest complete iter_* directory.")
        path = os.path.join(load_dir, iter_dir_name(int(text)))
        if not os.path.isfile(os.path.join(path, "ppu", "run.json")):
            raise CheckpointError(f"{tracker} points at {path}, which is missing or incomplete.")
        return path
    names = [n for n in os.listdir(load_dir) if n.startswith("iter_")]
    complete = sorted(n for n in names if os.path.isfile(os.path.join(load_dir, n, "ppu", "run.json")))
    if names and not complete:
        raise CheckpointError(f"{load_dir} has {len(names)} iter_* folder(s) ({sorted(names)[-1]}, ...) but none "
                              f"is a complete megatron_ppu checkpoint (ppu/run.json); point --load at a folder "
                              f"with a complete checkpoint, or remove the incomplete ones to start from scratch.")
    return os.path.join(load_dir, complete[-1]) if complete else None


def resolve_checkpoint(load_dir: str, *, save_dir: Optional[str], finetune: bool) -> Optional[str]:
    """Collective: the checkpoint every rank loads, chosen by global rank 0 in its view of
    ``load_dir`` and broadcast; None for a first launch (``--save D --load D``, nothing in D).
    Raises the same ``CheckpointError`` on every rank when there is nothing to load but the
    user asked for a checkpoint, or when the ranks' views of ``load_dir`` disagree."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local, local_err = None, None
    try:
        local = find_checkpoint(load_dir)
    except CheckpointError as e:
        local_err = str(e)
    choice = [(os.path.basename(local) if local else None, local_err) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    chosen, err0 = choice[0]
    if err0 is not None:
        raise CheckpointError(f"--load {load_dir} (as rank 0 sees it): {err0}")
    if chosen is not None:
        return os.path.join(load_dir, chosen)
    # Rank 0 sees nothing: every rank must agree, or some node has a checkpoint rank 0 lacks.
    views = [None] * world
    dist.all_gather_object(views, (os.path.basename(local) if local else None, local_err, socket.gethostname()))
    others = [(r, c, e, h) for r, (c, e, h) in enumerate(views) if c is not None or e is not None]
    if others:
        lines = "\n  ".join(f"rank {r} ({h}) sees " + (c if c else e) for r, c, e, h in others)
        raise CheckpointError(f"--load {load_dir}: rank 0 sees no checkpoint there, but\n  {lines}\n"
                              f"Ranks disagree about the folder's contents. {SHARED_FS_FIX}")
    where = "does not exist" if not os.path.isdir(load_dir) else "holds no checkpoint"
    if finetune:
        raise CheckpointError(f"--finetune --load {load_dir}: the folder {where}; --finetune needs a checkpoint "
                              f"to take the weights from (a folder with {TRACKER} or iter_*/ppu/run.json).")
    if save_dir is None or os.path.abspath(save_dir) != os.path.abspath(load_dir):
        raise CheckpointError(f"--load {load_dir}: the folder {where}. To start a new run, drop --load; to resume "
                              f"automatically whenever a checkpoint exists, give the same folder to --save and "
                              f"--load (--save {load_dir} --load {load_dir}).")
    return None


def read_run_info(path: str) -> dict:
    """``ppu/run.json`` of the checkpoint at ``path``."""
    f = os.path.join(path, "ppu", "run.json")
    if not os.path.isfile(f):
        raise CheckpointError(f"{f} is missing on this rank's view of the checkpoint.")
    with open(f, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is corrupt ({e}).") from e


def check_compatible(saved: dict, current: dict) -> None:
    """Raise ``CheckpointError`` if a checkpoint written with ``saved`` run info cannot resume ``current``."""
    if saved.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {saved.get('format_version')} is not {FORMAT_VERSION} "
                              f"(written by another version of megatron_ppu); --finetune still loads its weights.")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
             for k in ("world_size", "layout", "plan", "model", "diloco_fragments")
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            "the checkpoint was written by a run with another layout or plan, so its optimizer, "
            "DiLoCo and per-rank state do not apply here:\n  " + "\n  ".join(diffs) +
            "\nResume with the same flags and world size, or pass --finetune to load only the model "
            "weights (Megatron's full layout, valid for any TP/PP/--ppu-slices/--diloco-replicas) "
            "and start a new run from them."
        )


def check_model_part(path: str) -> None:
    """Raise ``CheckpointError`` unless this rank sees every file of the checkpoint's model
    part (``dist_checkpointing``'s metadata, ``common.pt`` and every ``*.distcp`` it names)."""
    missing = [n for n in ("metadata.json", "common.pt", ".metadata") if not os.path.isfile(os.path.join(path, n))]
    if not missing:
        try:
            md = FileSystemReader(path).read_metadata()
        except Exception as e:
            raise CheckpointError(f"{path}/.metadata is corrupt ({type(e).__name__}: {e}).") from e
        files = sorted({getattr(v, "relative_path", None) for v in (md.storage_data or {}).values()} - {None})
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(
            f"{path}: the model part (Megatron's full layout, read by --finetune) is incomplete in this rank's "
            f"view: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} missing. The model part is "
            f"written by ranks on several nodes; copy every node's {os.path.basename(path)} into one folder that "
            f"every rank sees (no file name occurs twice), or save to a file system shared by all nodes.")


def load_model_weights(path: str, model) -> None:
    """Collective: load the model part of a checkpoint (Megatron full layout) into ``model``."""
    from megatron.core import dist_checkpointing

    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    except Exception as e:
        raise CheckpointError(f"could not load the model weights from {path}: {type(e).__name__}: {e}. "
                              f"Is it a checkpoint of the same model architecture?") from e
    model.load_state_dict(loaded["model"])


def load_rank_state(path: str) -> Dict:
    """This rank's ``ppu/rank_*.pt`` of the checkpoint at ``path`` (raises ``CheckpointError``
    when it is missing or unreadable)."""
    f = os.path.join(path, "ppu", f"rank_{dist.get_rank():05d}.pt")
    if not os.path.isfile(f):
        raise CheckpointError(f"{f} is missing (this rank's view of {path}"
                              + ("" if os.path.isdir(path) else " does not have the folder at all") + ").")
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{f} is corrupt or truncated ({type(e).__name__}: {e}).") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{f} is not a megatron_ppu rank state of format {FORMAT_VERSION}.")
    return state
