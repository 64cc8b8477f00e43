"""scripts/gpu_check.sh: refuses cleanly without CUDA; every trainer run it makes parses with the trainer's parser."""
import json
import subprocess
import sys

import pytest
import torch

from tests.harness import REPO


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_without_cuda_says_so_and_runs_nothing(tmp_path):
    p = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=str(REPO), capture_output=True, text=True, timeout=100,
                       env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert p.returncode == 3, (p.returncode, p.stdout, p.stderr)
    assert "no CUDA device" in p.stderr and "Nothing was run" in p.stderr
    assert list(tmp_path.iterdir()) == []  # no results, no logs


@pytest.mark.timeout(120)
def test_gpu_check_runs_parse_with_the_trainer_parser():
    from megatron_ppu.training.arguments import parse_args

    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--print-commands"], cwd=str(REPO),
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert {"nccl-bf16", "resume-c", "ppu2-2ranks", "tp2-sp", "pp2", "ft-kill-heal", "memory-ppu4-heads"} <= set(plan)
    for name, run in plan.items():
        args = parse_args(run["argv"])  # raises ValueError on an unknown or inconsistent flag
        tp, pp = args.parallel.tensor_model_parallel_size, args.parallel.pipeline_model_parallel_size
        assert run["nproc"] % (tp * pp) == 0, name


@pytest.mark.timeout(60)
def test_distributed_backend_flag_selects_the_backends_torch_serves():
    """--distributed-backend gloo (several ranks on one GPU) must serve CUDA tensors through gloo; the
    default on CUDA serves CUDA tensors through NCCL and host tensors through gloo (torch's own parser)."""
    from torch.distributed.distributed_c10d import BackendConfig

    from megatron_ppu.comm import process_group_backend
    from megatron_ppu.training.arguments import parse_args

    served = lambda s: {d: str(b) for d, b in BackendConfig(s).get_device_backend_map().items()}  # noqa: E731
    assert served(process_group_backend("cuda", "nccl")) == {"cpu": "gloo", "cuda": "nccl"}
    assert served(process_group_backend("cuda", "gloo")) == {"cpu": "gloo", "cuda": "gloo"}
    assert served(process_group_backend("cpu", "nccl")) == {"cpu": "gloo", "cuda": "gloo"}
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "2", "--mock-data", "--vocab-size", "128"]
    assert parse_args(base).parallel.distributed_backend == "nccl"
    assert parse_args(base + ["--distributed-backend", "gloo"]).parallel.distributed_backend == "gloo"
    with pytest.raises((ValueError, SystemExit)):
        parse_args(base + ["--distributed-backend", "mpi"])
