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

import argparse
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

from ..patches import compat

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


# -- Megatron-LM's own entries (common.pt, sharded state), both ways ---------------------------------
#: Megatron-LM's ``checkpoint_version`` of its torch_dist checkpoints (megatron/training/checkpointing.py).
MEGATRON_CHECKPOINT_VERSION = 3.0
RELEASE = "release"


def _megatron_default(dest: str, value):
    """Megatron-LM's parser default, with the two enum defaults the flag table stores as strings."""
    if dest == "attention_backend":
        from megatron.core.transformer.enums import AttnBackend

        return AttnBackend.auto
    if dest == "exit_signal":
        import signal

        return signal.SIGTERM
    return value


def megatron_lm_args(train_args, *, world_size: int, data_parallel_size: int, padded_vocab_size: int,
                     ffn_hidden_size: int, iteration: int, consumed_train_samples: int, global_batch_size: int,
                     train_iters: int, tokenizer_type: Optional[str] = None, tokenizer_model: Optional[str] = None,
                     saves_optimizer: bool = False, saves_rng: bool = False) -> argparse.Namespace:
    """The ``args`` of a checkpoint, as Megatron-LM stores them in ``common.pt``: an
    ``argparse.Namespace`` holding every dest of Megatron-LM's parser (core_v0.16.1) with its
    default, overridden by this run's values and by what Megatron-LM's ``validate_args`` derives
    (``ffn_hidden_size``, ``kv_channels``, ``padded_vocab_size``, ``params_dtype``, the parallel
    sizes, ``consumed_train_samples``, ...). megatron_ppu's own settings (``ppu_slices``,
    ``diloco_*``, ``subnet_*``) are kept as extra attributes.

    ``saves_optimizer``/``saves_rng`` False set Megatron-LM's markers ``no_save_optim`` /
    ``no_save_rng``: Megatron-LM's ``load_checkpoint`` then does not look for optimizer
    (sharded state) or RNG entries.
    """
    from .megatron_lm_flags import MEGATRON_LM_FLAGS

    ns = argparse.Namespace(**{dest: _megatron_default(dest, default)
                               for dest, _, _, default in MEGATRON_LM_FLAGS.values()})
    a = train_args
    for group in (a.model, a.training, a.precision, a.parallel, a.data, a.checkpoint, a.ppu, a.diloco, a.subnet):
        for k, v in a.flag_values(group).items():
            setattr(ns, k, v)
    m = a.model
    ns.disable_bias_linear = m.disable_bias_linear
    ns.add_bias_linear = not m.disable_bias_linear
    ns.add_qkv_bias = not m.disable_bias_linear  # validate_args keeps it in sync with add_bias_linear
    ns.layernorm_epsilon = m.norm_epsilon
    del ns.norm_epsilon
    ns.ffn_hidden_size = ffn_hidden_size
    ns.kv_channels = m.kv_channels or m.hidden_size // m.num_attention_heads
    ns.max_position_embeddings = m.max_position_embeddings or m.seq_length
    ns.num_query_groups = m.num_query_groups if m.group_query_attention else m.num_attention_heads
    from megatron.core.transformer.enums import AttnBackend

    # The run's value (auto / unfused / local all run megatron-core's local attention here): Megatron-LM's
    # validate_args refuses AttnBackend.local without a local --spec, and convert.py copies these args.
    ns.attention_backend = AttnBackend[a.model.attention_backend]
    ns.padded_vocab_size = padded_vocab_size
    ns.params_dtype = torch.bfloat16 if a.precision.bf16 else torch.half if a.precision.fp16 else torch.float
    ns.world_size = world_size
    ns.data_parallel_size = data_parallel_size
    ns.global_batch_size = global_batch_size
    ns.train_iters = train_iters
    ns.iteration = iteration
    ns.consumed_train_samples = consumed_train_samples
    ns.skipped_train_samples = 0
    ns.consumed_valid_samples = 0
    ns.ckpt_format = "torch_dist"
    ns.use_dist_ckpt = True
    ns.transformer_impl = "local"
    ns.use_legacy_models = False
    ns.use_mcore_models = True
    ns.tokenizer_type = tokenizer_type or a.data.tokenizer_type
    ns.tokenizer_model = tokenizer_model or a.data.tokenizer_model
    ns.no_save_optim = True if not saves_optimizer else None
    ns.no_save_rng = True if not saves_rng else None
    return ns


def megatron_rng_state(tp_group, pp_group, dp_group):
    """Megatron-LM's ``rng_state`` entry of a torch_dist checkpoint (its ``get_rng_state``,
    without ``--data-parallel-random-init``): a ``ShardedObject`` over (PP, TP) written by
    data-parallel rank 0, holding ``[{random, np, torch, cuda, tracker states}]``. None
    without CUDA: Megatron-LM restores ``cuda_rng_state`` with ``torch.cuda.set_rng_state``,
    so a CPU run cannot produce an entry it reads (the checkpoint's args then carry
    ``no_save_rng``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    if not torch.cuda.is_available():
        return None
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
             "rng_tracker_states": get_cuda_rng_tracker().get_states()}
    return ShardedObject("rng_state", [state], (dist.get_world_size(pp_group), dist.get_world_size(tp_group)),
                         (dist.get_rank(pp_group), dist.get_rank(tp_group)), replica_id=dist.get_rank(dp_group))


def _optimizer_metadata(use_distributed_optimizer: bool, dp_group) -> dict:
    """Megatron-LM's ``_build_sharded_state_dict_metadata`` (``--dist-ckpt-optim-fully-reshardable``:
    the one distributed-optimizer sharding that works without TE/apex)."""
    md = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True, "dp_cp_group": dp_group}
    if use_distributed_optimizer:
        md.update(distrib_optim_sharding_type="fully_reshardable", distrib_optim_fully_reshardable_mem_efficient=False)
    return md


def _serialisable(md: Optional[dict]) -> Optional[dict]:
    return None if md is None else {k: v for k, v in md.items() if k != "dp_cp_group"}


def megatron_lm_entries(trainer) -> dict:
    """What a checkpoint of ``trainer`` (a :class:`~megatron_ppu.training.loop.Trainer`) adds for
    Megatron-LM: ``{"state": top-level entries for dist_checkpointing.save, "content_metadata": ...}``.

    * ``args`` (:func:`megatron_lm_args`), ``checkpoint_version``, ``iteration`` (already there),
      ``num_floating_point_operations_so_far`` (Megatron-LM's dense-GPT formula x iterations);
    * a plain synchronous run (no replicas: its inner optimizer *is* Megatron's optimizer over every
      parameter): ``optimizer`` (Megatron's sharded optimizer state) and ``opt_param_scheduler``,
      so Megatron-LM resumes it exactly as its own;
    * runs with replicas (DiLoCo/PPU/SDP): their optimizer state (per-replica inner Adam over the
      owned slices, outer momentum) has no Megatron-LM equivalent: ``args.no_save_optim`` marks the
      checkpoint weights-only for the optimizer;
    * ``rng_state`` where Megatron-LM can restore it (CUDA), else ``args.no_save_rng``.
    """
    from megatron.core import parallel_state as ps

    a = trainer.args
    # (--use-distributed-optimizer: Megatron's sharded form of its state fails in save on CPU without
    # TE/apex, seen in tests/test_checkpoint_fs.py; marked weights-only until that path is fixed)
    with_optim = not a.uses_replicas and not a.parallel.use_distributed_optimizer
    dp_group = ps.get_data_parallel_group()
    rng = megatron_rng_state(ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(), dp_group)
    ffn = trainer.config.ffn_hidden_size
    ns = megatron_lm_args(
        a, world_size=dist.get_world_size(), data_parallel_size=trainer.dp, padded_vocab_size=trainer.vocab_size,
        ffn_hidden_size=ffn, iteration=trainer.iteration, consumed_train_samples=trainer.batches.consumed_samples,
        global_batch_size=trainer.global_batch_size, train_iters=a.training.train_iters,
        saves_optimizer=with_optim, saves_rng=rng is not None)
    state = {"args": ns, "checkpoint_version": MEGATRON_CHECKPOINT_VERSION,
             "num_floating_point_operations_so_far": trainer.flops_per_iteration * trainer.iteration}
    md = _optimizer_metadata(a.parallel.use_distributed_optimizer, dp_group)
    if rng is not None:
        state["rng_state"] = rng
    if with_optim:
        state["opt_param_scheduler"] = scheduler_to_samples(trainer.scheduler.state_dict(), trainer.global_batch_size)
    return {"state": state, "content_metadata": _serialisable(md), "optimizer_metadata": md,
            "optimizer": trainer.optimizer if with_optim else None}


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
                    views: Optional[StorageViews] = None, replica_state=None, replica_group=None,
                    megatron: Optional[dict] = None) -> dict:
    """Collective: write a complete checkpoint for ``iteration`` and point the tracker at it.

    ``rank_state`` is this rank's own state; ``replica_state`` (identical on the ranks of
    ``replica_group``) is written split over them (see :func:`shard_state`). ``views``
    (from :func:`probe_views`; probed here when None) says which ranks share a folder.
    ``megatron`` (from :func:`megatron_lm_entries`) adds Megatron-LM's own entries (``args``,
    ``rng_state``, ``optimizer``, ``opt_param_scheduler``, ...) to the model part.
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
        sd = {"model": model.sharded_state_dict(), "iteration": iteration,
              "checkpoint_version": MEGATRON_CHECKPOINT_VERSION}
        megatron = megatron or {}
        sd.update(megatron.get("state", {}))
        if megatron.get("optimizer") is not None:  # Megatron's sharded optimizer state, keyed by the model's
            sd["optimizer"] = megatron["optimizer"].sharded_state_dict(
                sd, is_loading=False, metadata=megatron["optimizer_metadata"])
        dist_checkpointing.save(sd, tmp, content_metadata=megatron.get("content_metadata"))
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
def is_complete(path: str) -> bool:
    """Whether ``path`` is a complete checkpoint: megatron_ppu's (``ppu/run.json``, written last)
    or Megatron-LM's torch_dist one (``metadata.json``, which dist_checkpointing writes after
    every shard, and ``common.pt``, or with megatron-core 0.19 the shared state in the ``.distcp``
    files: :func:`megatron_ppu.patches.compat.common_state_format`)."""
    return os.path.isfile(os.path.join(path, "ppu", "run.json")) or (
        os.path.isfile(os.path.join(path, "metadata.json")) and compat.common_state_format(path) is not None)


def is_ours(path: str) -> bool:
    """Whether the checkpoint at ``path`` has megatron_ppu's ``ppu/`` part (else it is Megatron-LM's)."""
    return os.path.isfile(os.path.join(path, "ppu", "run.json"))


def find_checkpoint(load_dir: str) -> Optional[str]:
    """The complete checkpoint in ``load_dir`` (this rank's view), or None if the folder is
    absent or holds no checkpoint.

    As Megatron-LM: the tracker file names the iteration (``iter_NNNNNNN``) or ``release``
    (the ``release/`` folder). Without a tracker, the newest complete ``iter_*`` (a Megatron-LM
    run whose tracker was lost, or a copied folder). A checkpoint is megatron_ppu's or
    Megatron-LM's (:func:`is_complete`). Raises ``CheckpointError`` for a tracker that points at
    a missing or incomplete folder or holds neither, and for ``iter_*`` folders none of which is
    complete."""
    if not os.path.isdir(load_dir):
        return None
    tracker = os.path.join(load_dir, TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker, encoding="utf-8").read().strip()
        if not text.isdigit() and text != RELEASE:
            raise CheckpointError(f"{tracker} contains neither an iteration number nor 'release' ({text!r}); "
                                  f"remove it to fall back to the newest complete iter_* directory.")
        path = os.path.join(load_dir, RELEASE if text == RELEASE else iter_dir_name(int(text)))
        if not is_complete(path):
            raise CheckpointError(f"{tracker} points at {path}, which is missing or incomplete (neither "
                                  f"megatron_ppu's ppu/run.json nor a torch_dist checkpoint's metadata.json + "
                                  f"common.pt); point the tracker at a complete checkpoint, or remove it to "
                                  f"fall back to the newest complete iter_* directory.")
        return path
    names = [n for n in os.listdir(load_dir) if n.startswith("iter_")]
    complete = sorted(n for n in names if is_complete(os.path.join(load_dir, n)))
    if names and not complete:
        raise CheckpointError(f"{load_dir} has {len(names)} iter_* folder(s) ({sorted(names)[-1]}, ...) but none "
                              f"is a complete checkpoint (megatron_ppu's ppu/run.json, or a torch_dist "
                              f"checkpoint's metadata.json + common.pt); point --load at a folder with a complete "
                              f"checkpoint, or remove the incomplete ones to start from scratch.")
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
                              f"to take the weights from (a folder with {TRACKER}, or a complete iter_* checkpoint "
                              f"of megatron_ppu or Megatron-LM).")
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
    part (``dist_checkpointing``'s metadata, ``common.pt`` (none with megatron-core 0.19) and every
    ``*.distcp`` it names); a checkpoint the installed megatron-core cannot read is refused with
    the reason (:func:`megatron_ppu.patches.compat.checkpoint_unreadable_reason`)."""
    reason = compat.checkpoint_unreadable_reason(path)  # a megatron-core 0.19 checkpoint given to 0.16.1
    if reason:
        raise CheckpointError(reason)
    missing = [n for n in ("metadata.json", ".metadata") if not os.path.isfile(os.path.join(path, n))]
    if not missing and compat.common_state_format(path) is None:
        missing = ["common.pt"]  # megatron-core 0.19 keeps it in the .distcp files instead
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


# -- Megatron-LM checkpoints (no ppu/ part) ------------------------------------------------------------
_SCHEDULER_STEPS = ("lr_warmup_steps", "num_steps", "lr_decay_steps", "wd_incr_steps")


def scheduler_to_samples(state: dict, global_batch_size: int) -> dict:
    """Our scheduler state (counted in iterations) in Megatron-LM's units: samples (Megatron-LM
    steps its scheduler by the global batch size each iteration)."""
    return {k: v * global_batch_size if k in _SCHEDULER_STEPS and v is not None else v for k, v in state.items()}


def ignore_constant_wd_length(state: dict, scheduler) -> dict:
    """``state`` (a scheduler state dict) with ``wd_incr_steps`` set to ``scheduler``'s when both keep the
    weight decay constant: the length of a constant schedule changes nothing, and it is the run's length
    (Megatron-LM's ``train_iters``), so without this a resume that extends ``--train-iters`` would be
    refused by megatron-core's "total number of weight decay iterations do not match" check."""
    constant = (state.get("start_wd") == state.get("end_wd") and state.get("wd_incr_style") == "constant"
                and scheduler.start_wd == scheduler.end_wd and scheduler.wd_incr_style == "constant")
    return {**state, "wd_incr_steps": scheduler.wd_incr_steps} if constant and "wd_incr_steps" in state else state


def scheduler_to_iterations(state: dict, global_batch_size: int, path: str) -> dict:
    """Megatron-LM's scheduler state (samples) in our units (iterations of ``global_batch_size``)."""
    out = {}
    for k, v in state.items():
        if k in _SCHEDULER_STEPS and v is not None:
            if v % global_batch_size:
                raise CheckpointError(
                    f"{path}: the learning-rate schedule's {k} = {v} samples is not a whole number of iterations "
                    f"of the checkpoint's global batch {global_batch_size} (a batch-size ramp-up?); pass "
                    f"--no-load-optim to resume with this run's schedule and a fresh optimizer, or --finetune.")
            v //= global_batch_size
        out[k] = v
    return out


def checkpoint_kind(path: str) -> str:
    """Collective: ``"ours"`` or ``"megatron-lm"`` for the checkpoint at ``path``, as global rank 0
    sees it (every rank then takes the same path)."""
    kind = ["ours" if is_ours(path) else "megatron-lm"] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(kind, src=0)
    return kind[0]


def _sharded_keys(path: str) -> set:
    return set(FileSystemReader(path).read_metadata().state_dict_metadata)


def load_megatron_lm_checkpoint(trainer, path: str, *, finetune: bool, no_load_optim: bool,
                                no_load_rng: bool) -> str:
    """Collective: load a Megatron-LM torch_dist checkpoint (no ``ppu/`` part) into ``trainer``
    with Megatron-LM's rules (its ``load_checkpoint`` at core_v0.16.1); returns what was loaded.

    * always the model weights (Megatron's full layout: any TP/PP, any PPU/DiLoCo plan);
    * ``--finetune`` or a ``release`` checkpoint: weights only, iteration 0;
    * else iteration and data position (``args.consumed_train_samples``); the optimizer and
      learning-rate schedule unless ``--no-load-optim`` or the checkpoint's ``args.no_save_optim``
      (only into a run without replicas, whose optimizer is Megatron's over every parameter; a
      checkpoint without optimizer state, or a run with replicas, is a ``CheckpointError`` naming
      ``--no-load-optim``/``--finetune``, as Megatron-LM stops there too); the RNG states unless
      ``--no-load-rng``, ``args.no_save_rng`` or another TP/PP layout (the CUDA states only where
      CUDA is present).
    Without the optimizer state, the inner optimizer, the DiLoCo snapshot and the outer momentum
    start fresh from the loaded weights.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    a = trainer.args
    agreed(lambda: check_model_part(path), f"loading the Megatron-LM checkpoint {path}", SHARED_FS_FIX)
    common = agreed(lambda: dist_checkpointing.load_common_state_dict(path), f"reading {path}/common.pt")
    keys = agreed(lambda: _sharded_keys(path), f"reading {path}/.metadata")
    ckpt_args = common.get("args")
    release = os.path.basename(os.path.normpath(path)) == RELEASE
    weights_only = finetune or release
    tp, pp = a.parallel.tensor_model_parallel_size, a.parallel.pipeline_model_parallel_size
    ckpt_tp_pp = (getattr(ckpt_args, "tensor_model_parallel_size", 1), getattr(ckpt_args, "pipeline_model_parallel_size", 1))
    load_optim = not (weights_only or no_load_optim or getattr(ckpt_args, "no_save_optim", False))
    load_rng = not (weights_only or no_load_rng or getattr(ckpt_args, "no_save_rng", False)) and ckpt_tp_pp == (tp, pp)
    if load_optim and not any(k.startswith("optimizer.") for k in keys):
        raise CheckpointError(f"{path} holds no optimizer state (a weights-only Megatron-LM checkpoint); pass "
                              f"--no-load-optim to resume its weights, iteration and data position with a fresh "
                              f"optimizer, or --finetune to start a new run from its weights (Megatron-LM needs "
                              f"the same flags).")
    if load_optim and a.uses_replicas:
        raise CheckpointError(f"{path} is a Megatron-LM checkpoint: its optimizer state is Megatron's Adam over "
                              f"every parameter, while this run's replicas (DiLoCo/PPU/SDP) keep an inner optimizer "
                              f"per replica (over the owned slices only) and an outer optimizer. Pass "
                              f"--no-load-optim to resume its weights, iteration and data position with fresh "
                              f"optimizer state, or --finetune to start a new run from its weights.")
    if load_rng and not any(k.startswith("rng_state") for k in keys):
        raise CheckpointError(f"{path} holds no RNG state; pass --no-load-rng (as Megatron-LM asks too), or "
                              f"--finetune.")
    sd = {"model": trainer.model.sharded_state_dict()}
    if load_optim:
        md = dict(dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {},
                  dp_cp_group=ps.get_data_parallel_group())
        sd["optimizer"] = trainer.optimizer.sharded_state_dict(sd, is_loading=True, metadata=md)
    if load_rng:
        sd["rng_state"] = ShardedObject("rng_state", [None], (pp, tp), (ps.get_pipeline_model_parallel_rank(),
                                        ps.get_tensor_model_parallel_rank()), replica_id=ps.get_data_parallel_rank())
    try:
        loaded = dist_checkpointing.load(sd, path)
    except Exception as e:
        raise CheckpointError(f"could not load the Megatron-LM checkpoint {path}: {type(e).__name__}: {e}. Is it a "
                              f"checkpoint of the same model architecture (--use-checkpoint-args takes it from "
                              f"the checkpoint)?") from e
    trainer.model.load_state_dict(loaded["model"])
    what = ["weights"]
    if load_optim:
        compat.load_optimizer_state_dict(trainer.optimizer, loaded["optimizer"])
        for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            for st in o.optimizer.state.values():  # one "step" tensor per parameter (see Trainer._load_optimizer)
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].clone()
        sched = common.get("opt_param_scheduler", common.get("lr_scheduler"))
        if sched is not None:
            gbs = getattr(ckpt_args, "global_batch_size", None) or trainer.global_batch_size
            try:
                trainer.scheduler.load_state_dict(
                    ignore_constant_wd_length(scheduler_to_iterations(sched, gbs, path), trainer.scheduler))
            except AssertionError as e:
                raise CheckpointError(
                    f"{path}: the learning-rate schedule of this run differs from the checkpoint's ({e}); resume "
                    "with the same --lr/--min-lr/--lr-warmup-*/--lr-decay-*/--weight-decay flags, or pass "
                    "--override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler, as in Megatron-LM.") from e
        what.append("optimizer and learning-rate schedule")
    else:
        trainer._after_weights_changed()
    if weights_only:
        trainer.iteration = 0
    else:
        trainer.iteration = int(common["iteration"])
        what.append(f"iteration {trainer.iteration}")
    if not finetune and ckpt_args is not None:
        trainer.batches.consumed_samples = int(getattr(ckpt_args, "consumed_train_samples", 0) or 0)
        what.append(f"data position {trainer.batches.consumed_samples} samples")
    if load_rng:
        st = loaded["rng_state"][0]
        random.setstate(st["random_rng_state"])
        np.random.set_state(st["np_rng_state"])
        torch.set_rng_state(st["torch_rng_state"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(st["cuda_rng_state"])
            get_cuda_rng_tracker().set_states(st["rng_tracker_states"])
            what.append("RNG states")
        else:
            what.append("RNG states (CPU generators; the checkpoint's CUDA states need CUDA)")
    return ", ".join(what) + (" (release checkpoint: weights only)" if release and not finetune else "")


# -- --use-checkpoint-args ---------------------------------------------------------------------------
#: Megatron-LM's ``load_args_from_checkpoint`` (core_v0.16.1) for the settings megatron_ppu has:
#: our field -> (the checkpoint's attribute, force). ``force`` False: only where this run left it unset.
CHECKPOINT_ARGS = {
    "num_layers": ("num_layers", False), "hidden_size": ("hidden_size", False),
    "ffn_hidden_size": ("ffn_hidden_size", False), "seq_length": ("seq_length", False),
    "num_attention_heads": ("num_attention_heads", False), "num_query_groups": ("num_query_groups", True),
    "group_query_attention": ("group_query_attention", True), "kv_channels": ("kv_channels", False),
    "max_position_embeddings": ("max_position_embeddings", False),
    "position_embedding_type": ("position_embedding_type", True), "rotary_base": ("rotary_base", True),
    "rotary_percent": ("rotary_percent", True), "rotary_interleaved": ("rotary_interleaved", True),
    "disable_bias_linear": ("add_bias_linear", True), "squared_relu": ("squared_relu", True),
    "swiglu": ("swiglu", True), "untie_embeddings_and_output_weights": ("untie_embeddings_and_output_weights", True),
    "normalization": ("normalization", True), "apply_query_key_layer_scaling": ("apply_query_key_layer_scaling", True),
    "attention_dropout": ("attention_dropout", True), "hidden_dropout": ("hidden_dropout", True),
    "tokenizer_type": ("tokenizer_type", True), "tokenizer_model": ("tokenizer_model", True),
    "tiktoken_pattern": ("tiktoken_pattern", True),
}


def read_checkpoint_args(load_dir: str) -> Tuple[str, argparse.Namespace]:
    """(path, ``args``) of the checkpoint ``--load load_dir`` finds (this process's view; no
    process group needed, as Megatron-LM reads them before initialising). Raises
    ``CheckpointError`` when there is none or it stores no ``args``."""
    path = find_checkpoint(load_dir)
    if path is None:
        raise CheckpointError(f"--use-checkpoint-args --load {load_dir}: no checkpoint there to take the model "
                              f"flags from; pass the model flags instead, or point --load at a checkpoint.")
    f = os.path.join(path, "common.pt")
    try:
        common = compat.read_common_state(path)  # common.pt, or megatron-core 0.19's .distcp files
    except ValueError as e:
        raise CheckpointError(f"--use-checkpoint-args: {e}") from e
    except Exception as e:
        raise CheckpointError(f"--use-checkpoint-args: cannot read {f} ({type(e).__name__}: {e}).") from e
    ns = common.get("args") if isinstance(common, dict) else None
    if not isinstance(ns, argparse.Namespace):
        raise CheckpointError(f"--use-checkpoint-args: {f} stores no args (written by an older megatron_ppu?); "
                              f"pass the model flags instead.")
    return path, ns


def apply_checkpoint_args(values: dict, load_dir: str) -> Tuple[List[str], str]:
    """``--use-checkpoint-args``: set the model (and tokenizer) settings in ``values`` (parsed
    flags, our field names) from the checkpoint's ``args`` as Megatron-LM does (:data:`CHECKPOINT_ARGS`:
    forced ones always, the others where unset). Refuses a checkpoint of a model megatron_ppu
    cannot build (MoE). Returns (the fields set, a description for the start-up log)."""
    path, ns = read_checkpoint_args(load_dir)
    if getattr(ns, "num_experts", None):
        raise CheckpointError(f"--use-checkpoint-args: {path} is a mixture-of-experts model (num_experts "
                              f"{ns.num_experts}); megatron_ppu trains dense GPT models.")
    set_ = []
    for ours, (theirs, force) in CHECKPOINT_ARGS.items():
        if not hasattr(ns, theirs) or (not force and values.get(ours) is not None):
            continue
        v = getattr(ns, theirs)
        if ours == "disable_bias_linear":
            v = not v
        if v is None and ours in ("tokenizer_type", "tokenizer_model", "tiktoken_pattern"):
            continue  # Megatron-LM's _set_arg keeps the run's value when the checkpoint has none
        if ours == "num_query_groups" and not getattr(ns, "group_query_attention", False):
            v = None  # Megatron-LM's validate_args fills it with the head count; our flag means GQA
        values[ours] = v
        set_.append(ours)
    desc = f"from {path}: " + (", ".join(f"--{k.replace('_', '-')} {values[k]}" for k in set_) or "nothing to change")
    return set_, desc
