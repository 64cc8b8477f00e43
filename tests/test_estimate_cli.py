"""The README's cost-model commands (section "Cost model: `tools/estimate.py`"), run exactly as
written there: parsed out of README.md, so that the test follows the README. The estimate needs
the model, parallelism and method flags only (no --lr, --train-iters or data flag)."""
import re
import shlex
import subprocess
import sys

import pytest

from tests.harness import REPO


def readme_estimator_commands():
    """Every `python tools/estimate.py ...` command of the README's cost-model section (backslash
    continuations joined, trailing comments dropped), as argv lists."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^#+ Cost model[^\n]*\n(.*?)(?=^#)", text, re.S | re.M)
    assert section, "README.md has no 'Cost model' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    cmds = [shlex.split(ln, comments=True) for ln in lines if ln.strip().startswith("python tools/estimate.py")]
    assert cmds, "no tools/estimate.py command in the README's cost-model section"
    return cmds


def _run(argv):
    assert argv[0] == "python"
    r = subprocess.run([sys.executable] + argv[1:], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (argv, r.stderr[-3000:])
    return r.stdout


# The paper's 1.3B model by hand (Megatron GPT, learned absolute positions, biases, LayerNorm,
# tied output layer): per layer QKV 3h^2 + 3h, projection h^2 + h, fc1 4h^2 + 4h, fc2 4h^2 + h,
# two LayerNorms 4h, i.e. 12h^2 + 13h; embeddings vocab x h (32000 is already a multiple of 128)
# and seq x h positions; the final LayerNorm 2h.
H, L, V, S = 2048, 24, 32000, 1024
PARAMS_1P3B = L * (12 * H * H + 13 * H) + V * H + S * H + 2 * H
assert PARAMS_1P3B == 1_276_235_776


@pytest.mark.timeout(600)
def test_readme_estimator_commands_run_as_written_and_give_the_hand_derived_model():
    cmds = readme_estimator_commands()
    model_cmds = [c for c in cmds if "--num-layers" in c]
    assert model_cmds, "the README's cost-model section estimates no configuration"
    for argv in cmds:
        out = _run(argv)
        if "--paper-table" in argv:
            assert "Paper Table 1" in out
            continue
        flags = dict(zip(argv, argv[1:]))
        assert (int(flags["--num-layers"]), int(flags["--hidden-size"]), int(flags["--vocab-size"]),
                int(flags["--seq-length"])) == (L, H, V, S)  # the configuration the numbers below are for
        assert not {"--lr", "--train-iters", "--train-samples", "--mock-data", "--data-path"} & set(argv)
        total = float(re.search(r"^\s+total\s+([\d.]+) B", out, re.M).group(1))
        assert total == round(PARAMS_1P3B / 1e9, 4)  # 1.2762
        weights_gb = float(re.search(r"^\s+weights\s+([\d.]+)", out, re.M).group(1))
        assert weights_gb == round(2 * PARAMS_1P3B / 1e9, 3)  # --bf16: 2 bytes per parameter, TP = PP = 1
        tokens = int(re.search(r"FLOPs per step and replica \((\d+) tokens\)", out).group(1))
        assert tokens == int(flags["--micro-batch-size"]) * S  # global batch = micro-batch x DP over K = DP
