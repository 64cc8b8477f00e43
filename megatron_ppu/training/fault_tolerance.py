"""``--fault-tolerance torchft`` in the trainer: the settings a joiner must share, the state it heals,
and the join at start-up (issue 24).

Each replica is its own torchrun job in slot K (``--ft-replica-id``); the builder makes its world one
replica (:func:`megatron_ppu.parallel.build_ft_replica_layout`: PPU slice ``K mod N``, SDP holdings),
its data shard the one the single-world run gives replica K's DP ranks (DP rank ``K x DP_job + d`` of
``K_total x DP_job``; ``--global-batch-size`` is over all K slots) and its outer sync's transport a
:class:`~megatron_ppu.sync.torchft_replicas.TorchFTReplicas` (:func:`build_transport`).

Joining (:func:`join`, before the first inner step): one quorum. Replicas starting together (nobody
in a sync yet) close it with nothing to sum and start at iteration 0. A replica that comes while the
others run heals from a live peer in it (torchft's HTTP checkpoint transport, no shared file system):
every fragment's θ(t) and outer momentum and the schedule position (the peers' inner step, the
fragments' last syncs; the peers are in the sync of the fragment due at that step); it writes θ(t)
into its model, takes part in that sync with nothing of its own (not counted), and goes on from the
peers' iteration with its data position derived from (slot, iteration). Its inner optimizer (Adam
moments) and its error-feedback residual start fresh: they are per-replica state that nobody else
holds, and the replica's first inner steps rebuild them.

With a delayed sync (``--diloco-sync-delay`` τ > 0, ``--diloco-merge-alpha`` α; ``docs/overlap.md``) the
quorum is taken on the training thread when a fragment's reduction is launched (the reduction runs on
the background thread over the quorum's live slots). Since τ is below the gap between two fragment
syncs, no other delayed sync is in flight at any quorum: the healed state never carries a reduction
in flight (its ``in_flight`` record is empty). A joiner takes part in the sync being launched at its
join quorum (contributing nothing), trains τ steps and applies it after inner step s + τ with α, as
the others do. A member that dies while a reduction is in flight fails that reduction on the
survivors' background threads; each survivor that saw the failure discards the sync when it is due
(θ(t) kept for the fragment, its local steps since the last sync dropped: α has nothing to merge with);
one that committed it anyway is ahead, and the others heal from it at the next quorum (on the training
thread). A replica's own checkpoint taken with a sync in flight stores its result, or "discarded"
(``DiLoCoSync.state_dict``), and torchft's step with it, so a resume repeats the same decision.

Local checkpoints (each replica its own ``--save``): replicas restarted together from checkpoints of
the same sync heal nothing and keep their inner optimizer. One restarted from an older checkpoint of
its own is behind: it heals like a joiner (at the start-up quorum, or joining a run in progress), and
its inner optimizer starts fresh (the moments in that checkpoint belong to an older θ(t)), as does that
of a replica that fell behind and heals mid-run (:func:`realign`).
"""
from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Dict

from ..sync.torchft_replicas import TorchFTReplicas, state_checksum

logger = logging.getLogger(__name__)


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "none"


def join_settings(a) -> Dict[str, object]:
    """Name -> value of every setting a joining replica must share with the running ones: the model
    (architecture flags), PPU slicing, the outer loop (fragments, H, outer optimizer, payload), the
    SDP plan, the data (blend by file name: sites mount it at different paths), the seed, the batch
    and schedule, TP / PP, and the megatron_ppu and torchft versions. Per-site settings
    (``--ft-replica-id``, ``--ft-bind-address``, ``--save``, logging) are not compared."""
    out: Dict[str, object] = {}
    for group in (a.model, a.ppu, a.diloco, a.subnet):
        out.update(a.flag_values(group))
    d, t = a.data, a.training
    out.update(data_path=[os.path.basename(p) if os.sep in p else p for p in (d.data_path or [])],
               mock_data=d.mock_data, split=d.split, tokenizer_type=d.tokenizer_type,
               tokenizer_model=os.path.basename(d.tokenizer_model) if d.tokenizer_model else None,
               vocab_size=d.vocab_size, seed=t.seed, micro_batch_size=t.micro_batch_size,
               global_batch_size=t.global_batch_size, train_iters=t.train_iters, train_samples=t.train_samples,
               lr=t.lr, min_lr=t.min_lr, lr_decay_style=t.lr_decay_style,
               tensor_model_parallel_size=a.parallel.tensor_model_parallel_size,
               pipeline_model_parallel_size=a.parallel.pipeline_model_parallel_size,
               megatron_ppu_version=_version("megatron_ppu"), torchft_version=_version("torchft"))
    return out


def build_transport(a, num_slots: int) -> TorchFTReplicas:
    """The torchft transport of this rank (collective over the job's world: rank 0 opens the store)."""
    return TorchFTReplicas(a.fault_tolerance, num_slots, join_settings(a))


def attach(sync, transport: TorchFTReplicas) -> None:
    """Register the healed state (the outer loop's) and the schedule position with ``transport``."""

    def position():
        digest = state_checksum([[p.data for p in f.snapshot] for f in sync.fragments])
        return sync.step, int(digest[:15], 16)

    def state():
        s = sync.state_dict()
        s["residuals"] = [None] * len(sync.fragments)  # per-replica: a joiner starts error feedback afresh
        return s

    def load(s):
        # The inner-step counter stays this replica's until the sync it heals in is over (the outer loop
        # is in the middle of its own schedule); join() / realign() then move it to the healed step.
        own_step = sync.step
        sync.load_state_dict(s)
        sync.step = own_step
        transport.note_healed_step(int(s["step"]))
        for f in sync.fragments:
            f.restore()  # θ(t) into the model and the fp32 masters
        # The inner optimizer's moments belong to another θ(t) (an older checkpoint's of its own, or the
        # trajectory it fell behind on): fresh, as a new joiner's.
        sync.optimizer_view.reset_state()

    transport.register_state(state, load, position)


def join(trainer) -> None:
    """The start-up quorum of a replica job (see the module docstring); sets the trainer's iteration,
    data position and learning-rate schedule to the running replicas' when it joins a run in progress."""
    sync = trainer.sync
    t: TorchFTReplicas = sync.transport
    while True:
        t.begin_sync()
        if not t.voided:
            break
        t.agree(False)  # a voided quorum (a member refused, one failed): close it and ask again
    step = t.peer_step
    t.mark_joined()
    if step < 0:  # every member is starting (fresh, or resuming from their own checkpoints): no sync in progress
        t.agree(True)
        realign(trainer)  # one that resumed from an older checkpoint healed to the others' position
        trainer.log(f"fault tolerance: slot {t.slot} started with the live slots {list(t.live)}")
        return
    t.take_healed_step()  # the others' step, which this replica takes now (below)
    sync.step = step  # healed: already; joined the first sync without a heal: θ(t) = θ(0) here and there
    due = [f.index for f in sync.fragments if f.due(step)]
    assert len(due) == 1, (step, due)
    t.prime()
    # nothing of ours in it (model = θ(t), not counted); τ = 0: θ(t+1) now as everywhere; τ > 0: launched,
    # applied after inner step step + τ (with α) as everywhere
    sync.join_sync(due[0])
    trainer.scheduler.step(increment=step - trainer.iteration)
    trainer.iteration = step
    trainer.batches.consumed_samples = step * trainer.global_batch_size  # (slot, iteration) -> data position
    trainer.log(f"fault tolerance: slot {t.slot} joined at iteration {step} "
                f"({'healed from a live peer' if t.heals else 'no heal needed'}); live slots {list(t.live)}")


def realign(trainer) -> None:
    """After an iteration: a replica that fell behind and healed in the middle of one of its own syncs
    continues from the healed inner step (data position and learning-rate schedule with it) and joins
    the sync the others wait in there, contributing nothing."""
    step = trainer.sync.transport.take_healed_step()
    if step is not None and step != trainer.iteration:
        assert step > trainer.iteration, (step, trainer.iteration)  # a heal only moves forward
        trainer.sync.skip_to(step)  # (τ > 0: its own voided sync still in flight is dropped)
        trainer.scheduler.step(increment=step - trainer.iteration)
        trainer.iteration = step
        trainer.batches.consumed_samples = step * trainer.global_batch_size
        trainer.log(f"fault tolerance: slot {trainer.sync.transport.slot} healed from a live peer; continues at "
                    f"iteration {step}")
    t: TorchFTReplicas = trainer.sync.transport
    if t.take_rejoin():
        # healed while behind: the others wait in the sync due at this step (another quorum); take part in it
        # contributing nothing (model = θ(t)), as a joiner does
        due = [f.index for f in trainer.sync.fragments if f.due(trainer.iteration)]
        if len(due) == 1:
            t.observe_next()
            trainer.sync.join_sync(due[0])
        # else (the end of training syncs several fragments at the last step): the others go on without it
        # after the lighthouse's join timeout
