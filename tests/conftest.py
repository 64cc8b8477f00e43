"""Fixtures and helpers shared by the test files (a test module imports helpers from here or
from ``megatron_ppu.testing``, never from another test module).

``tiny_data``: a small real dataset made with the project's own tools (a SentencePiece
tokenizer trained on 40 documents of the embedded corpus, then Megatron ``.bin/.idx``),
built once per test module. ``data_flags(tiny_data)``: the trainer flags that read it.
``MODEL`` / ``TINY``: a tiny GPT's trainer flags (``TINY`` on mock data); ``_train_worker``: a
multi-rank worker that runs ``pretrain_gpt_ppu`` argv lists (``run_ranks(n,
"tests.conftest:_train_worker", {"runs": [...]})``), ``_logger``: its logger rank's result;
``_make_trainer``: a built ``Trainer`` in a worker; ``_dist_opt_fp32``: the fp32 values the
distributed optimizer's shard masters hold. The plain-PyTorch reference of the DiLoCo / PPU outer
loop (Algorithm 1): ``_reference_algorithm1``, ``_reference_inner_step``, ``_ref_owned_mask``,
``_ref_fragments``.

Markers: ``slow`` (registered in pytest.ini): the long multi-rank runs; ``-m "not slow"`` leaves
them out. At the end of a session the suite fails if a process it started is still alive
(``_no_leaked_processes``).
"""
import os
import sys
import time
import uuid

import pytest
import torch

from tests.harness import REPO


# Every process the suite starts inherits these two variables (subprocess, multiprocessing spawn and
# fork, torchrun): at the end of the session any process that carries this session's id is a leak,
# also after its parent died and it was reparented to init (then it is no descendant of pytest).
_SESSION_ENV, _TEST_ENV = "PPU_TEST_SESSION", "PPU_TEST_NODEID"
LEAK_GRACE_S = 20.0  # how long a process may take to exit after the last test


def _session_processes(session_id):
    """Live processes (other than this one) whose environment carries ``session_id``."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            env = p.environ()
            if env.get(_SESSION_ENV) == session_id and p.status() != psutil.STATUS_ZOMBIE:
                out.append((p, env.get(_TEST_ENV, "?"), f"(parent {p.ppid()}) " + " ".join(p.cmdline())[:200]))
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
    return out


SLOW_TIMEOUT_S = 900  # a test with a time bound this long or longer is a long multi-rank run: "slow"


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test whose ``@pytest.mark.timeout`` is :data:`SLOW_TIMEOUT_S` or more (the
    long multi-rank runs), so that the marker follows the bounds; ``@pytest.mark.slow`` also works.
    Mark ``ft_jobs`` every test of a ``tests/test_fault_tolerance*.py`` module (torchft replica jobs:
    processes that mostly wait on heartbeats and quorums; ``scripts/test.sh`` runs them beside the rest)."""
    for item in items:
        bound = item.get_closest_marker("timeout")
        if bound is not None and bound.args and bound.args[0] >= SLOW_TIMEOUT_S:
            item.add_marker(pytest.mark.slow)
        if item.path.name.startswith("test_fault_tolerance"):
            item.add_marker(pytest.mark.ft_jobs)


def pytest_runtest_setup(item):
    os.environ[_TEST_ENV] = item.nodeid  # the test a leaked process came from (read back from its environment)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_processes():
    """Fail the session if a process it started (subprocess, rank, multiprocessing worker, resource
    tracker, ...) is still alive :data:`LEAK_GRACE_S` seconds after the last test; kill each by its PID."""
    import psutil

    session_id = os.environ[_SESSION_ENV] = uuid.uuid4().hex
    yield
    os.environ[_TEST_ENV] = "session teardown"
    deadline = time.monotonic() + LEAK_GRACE_S
    left = _session_processes(session_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _session_processes(session_id)
    if not left:
        return
    for p, _, _ in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    lines = [f"pid {p.pid} {cmd}, started by {test}" for p, test, cmd in left]
    pytest.fail(f"{len(left)} process(es) started by the test suite outlived it by {LEAK_GRACE_S:.0f} s "
                "(killed now):\n" + "\n".join(lines), pytrace=False)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small real dataset made with the project's own tools (tokenizer + preprocessing)."""
    sys.path.insert(0, str(REPO / "tools"))
    from megatron_ppu.data.default_corpus import write_default_corpus_jsonl

    import preprocess_data
    import train_tokenizer

    d = tmp_path_factory.mktemp("tiny-data")
    jsonl = d / "corpus.jsonl"
    write_default_corpus_jsonl(str(jsonl), max_documents=40)
    train_tokenizer.main(["--input", str(jsonl), "--output-prefix", str(d / "tok"), "--vocab-size", "500"])
    preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(d / "tiny"), "--tokenizer-type",
                          "GPTSentencePieceTokenizer", "--tokenizer-model", str(d / "tok.model"), "--append-eod"])
    prefix = str(d / "tiny_text_document")
    assert os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
    return {"prefix": prefix, "model": str(d / "tok.model"), "dir": d}


def data_flags(tiny):
    """The trainer flags that train on ``tiny`` (the ``tiny_data`` fixture's value)."""
    return ["--data-path", tiny["prefix"], "--tokenizer-type", "GPTSentencePieceTokenizer",
            "--tokenizer-model", tiny["model"], "--data-cache-path", str(tiny["dir"] / "cache"), "--split", "90,10,0"]


MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "2", "--eval-iters", "2",
         "--log-interval", "4", "--eval-interval", "100"]
TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "64",
        "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-3",
        "--eval-iters", "1", "--eval-interval", "100", "--log-interval", "100",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "1234"]


def _train_worker(rank, world_size, runs):
    """Run each argv in turn in this process group; return losses, final evaluation, the
    synchroniser's counters and the trainable element count."""
    import torch.distributed as dist

    from megatron_ppu.training.loop import run

    out = []
    for argv in runs:
        t = run(argv)
        out.append({"losses": list(t.losses), "eval": t.final_eval, "logger": dist.get_rank() == world_size - 1,
                    "syncs": t.sync.stats().get("syncs", 0), "sync_stats": t.sync.stats(),
                    "trainable_numel": sum(p.numel() for p in t.model.parameters() if p.requires_grad)})
    return out


def _logger(results):
    return next(r for r in results if r[0]["logger"])


def _make_trainer(argv):
    """Parse ``argv``, initialise torch.distributed (already up in a harness worker) and build the Trainer."""
    from megatron_ppu.training.arguments import parse_args
    from megatron_ppu.training.loop import Trainer, init_distributed

    args = parse_args(argv)
    init_distributed()
    return Trainer.from_args(args)


def _dist_opt_fp32(t):
    """Full fp32 value of every trainable model parameter, from the distributed optimizer's shard
    masters (Megatron's own maps), summed over the inner-DP ranks (each element on one rank)."""
    import torch.distributed as dist

    vals, shards = {}, []
    for opt in t.optimizer.chained_optimizers:
        for g16, g32 in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
            for p, m in zip(g16, g32):
                r = opt._get_model_param_range_map(p)["param"]
                shards.append((p, m, r.start, r.end))
    by_id = {id(p): (m, s, e) for p, m, s, e in shards}
    for name, p in t.model.named_parameters():
        if not p.requires_grad:
            continue
        flat = torch.zeros(p.numel(), dtype=torch.float32)
        if id(p) in by_id:
            m, s, e = by_id[id(p)]
            flat[s:e] = m.detach().float()
        dist.all_reduce(flat, group=t.layout.inner_dp_group)
        vals[name] = flat.view(p.shape)
    return vals, by_id


# --------------------------------------- reference implementation of Algorithm 1 (plain PyTorch)
def _ref_owned_mask(name, shape, n, N, cfg):
    """Independent statement of which elements replica slice n trains (paper §2.2.1)."""
    mask = torch.ones(shape, dtype=torch.bool)
    F = cfg.ffn_hidden_size
    f = F // N
    if name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias"):
        mask[:] = False
        mask[n * f:(n + 1) * f] = True
        if cfg.gated_linear_unit:
            mask[F + n * f:F + (n + 1) * f] = True
    elif name.endswith("mlp.linear_fc2.weight"):
        mask[:] = False
        mask[:, n * f:(n + 1) * f] = True
    elif ("linear_qkv.weight" in name or "linear_qkv.bias" in name) and cfg._ppu_heads:
        groups = cfg.num_query_groups or cfg.num_attention_heads
        rows = shape[0] // groups * (groups // N)
        mask[:] = False
        mask[n * rows:(n + 1) * rows] = True
    return mask


def _ref_fragments(names, F):
    if F == 1:
        return [list(names)]
    layer = {n: int(n.split("decoder.layers.")[1].split(".")[0]) for n in names if "decoder.layers." in n}
    others = [n for n in names if n not in layer]
    nl = len(set(layer.values()))
    groups = F - 1
    sizes = [nl // groups + (1 if g < nl % groups else 0) for g in range(groups)]
    bounds = [sum(sizes[:g]) for g in range(groups + 1)]
    return [others] + [[n for n in names if n in layer and bounds[g] <= layer[n] < bounds[g + 1]] for g in range(groups)]


def _reference_algorithm1(cfg, K, N, H, F, steps, lr, wd, outer_lr, mu, seed, final_sync=False):
    """K replicas simulated in one process with plain torch: masked AdamW inner steps,
    count-normalised delta averaging, torch-semantics Nesterov outer SGD per fragment.
    ``final_sync``: after the last step, every fragment with steps since its last sync gets one
    more (shorter) round's outer step, as at the end of training."""
    from tests import gpt_utils as G

    model = G.build_gpt(cfg, None, seed=seed)
    names = [n for n, _ in model.named_parameters()]
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = [{n: _ref_owned_mask(n, theta0[n].shape, k % N, N, cfg) for n in names} for k in range(K)]
    count = {n: sum(masks[k][n].to(torch.float32) for k in range(K)) for n in names}
    reps = []
    for k in range(K):
        params = {n: theta0[n].clone().requires_grad_(True) for n in names}
        groups = [{"params": [params[n] for n in names if not (params[n].dim() == 1 or n.endswith(".bias"))], "weight_decay": wd},
                  {"params": [params[n] for n in names if params[n].dim() == 1 or n.endswith(".bias")], "weight_decay": 0.0}]
        reps.append((params, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)))
    frags = _ref_fragments(names, F)
    snaps = [{n: theta0[n].clone() for n in fr} for fr in frags]
    bufs = [dict() for _ in frags]
    last_sync = [0 for _ in frags]
    for s in range(1, steps + 1):
        _reference_inner_step(model, reps, masks, s)
        for f in range(len(frags)):
            offset = ((f + 1) * H // len(frags)) % H
            due = s % H == offset
            if not due and not (final_sync and s == steps and last_sync[f] < s):
                continue
            last_sync[f] = s
            for n in frags[f]:
                delta = sum((reps[k][0][n].detach() - snaps[f][n]) * masks[k][n] for k in range(K)) / count[n]
                g = -delta
                bufs[f][n] = g.clone() if n not in bufs[f] else mu * bufs[f][n] + g
                snaps[f][n] = snaps[f][n] - outer_lr * (g + mu * bufs[f][n])
                for params, _ in reps:
                    with torch.no_grad():
                        params[n].copy_(snaps[f][n])
    return [{n: p.detach() for n, p in params.items()} for params, _ in reps]


def _reference_inner_step(model, reps, masks, s):
    """Inner step ``s`` of every reference replica k (Algorithm 1, lines 8-10): the shared plain
    model computes the gradient at replica k's values on its batch of step s; plain AdamW steps
    replica k's copy with the gradient zeroed on frozen elements, and only its owned elements move."""
    from tests import gpt_utils as G

    for k, (params, opt) in enumerate(reps):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
        model.zero_grad(set_to_none=True)
        b = G.batch(seed=1000 * k + s)[0]
        model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().mean().backward()
        before = {n: params[n].detach().clone() for n in params}
        for n, p in model.named_parameters():
            params[n].grad = p.grad * masks[k][n]  # g[i] = 0 on frozen elements (line 9)
        opt.step()
        with torch.no_grad():  # line 10: only I_k^train is updated
            for n in params:
                params[n].copy_(torch.where(masks[k][n], params[n], before[n]))
