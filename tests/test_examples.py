"""The example launch scripts pass only flags that pretrain_gpt_ppu.py accepts."""
import os
import subprocess
import sys

import pytest

from tests.harness import REPO

STUB = r'''
import sys
from megatron_ppu.training.arguments import parse_args
argv = sys.argv[1:]
i = argv.index("pretrain_gpt_ppu.py")
a = parse_args(argv[i + 1:])
print(a.model.num_layers, a.model.hidden_size, a.training.global_batch_size, a.ppu.num_slices,
      a.diloco.local_steps, a.diloco.streaming_fragments, a.diloco.outer_lr)
'''


@pytest.mark.timeout(300)
def test_paper_1p3b_script_flags_parse(tmp_path):
    stub = tmp_path / "torchrun_stub.sh"
    (tmp_path / "stub.py").write_text(STUB)
    stub.write_text(f"#!/usr/bin/env bash\nexec {sys.executable} {tmp_path / 'stub.py'} \"$@\"\n")
    stub.chmod(0o755)
    env = dict(os.environ, TORCHRUN=str(stub), NODE_RANK="0", MASTER_ADDR="node0", DATA_PATH="corpus_text_document",
               TOKENIZER_MODEL="tok.model", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    r = subprocess.run(["bash", str(REPO / "examples" / "pretrain_gpt_1.3b_32nodes_ppu.sh")], env=env,
                       capture_output=True, text=True, timeout=250)
    assert r.returncode == 0, r.stderr[-3000:]
    # GPT-3 XL, global batch 512, 1/4 MLPs, H=100, 8 layer groups + embeddings, outer lr 0.4
    assert r.stdout.split() == ["24", "2048", "512", "4", "100", "9", "0.4"]
