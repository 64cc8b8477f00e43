"""benchmarks/study_table.py: the multi-seed table's arithmetic on a hand-built results tree."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import study_table as T  # noqa: E402

ARGV = ["--micro-batch-size", "4", "--global-batch-size", "16"]


def _write(root, folder, name, label, ppl):
    os.makedirs(root / folder, exist_ok=True)
    (root / folder / f"{name}.json").write_text(json.dumps(
        {"label": label, "final_ppl": ppl, "argv": ARGV, "evals": [{"iteration": 600, "loss": 1.0}]}))


@pytest.mark.timeout(120)
def test_paired_ratio_mean_and_half_range(tmp_path):
    _write(tmp_path, "s1", "streaming_diloco", "Streaming DiLoCo", 100.0)
    _write(tmp_path, "s2", "streaming_diloco", "Streaming DiLoCo", 200.0)
    _write(tmp_path, "s1", "ppu_mlp2", "PPU 1/2 MLPs", 150.0)
    _write(tmp_path, "s2", "ppu_mlp2", "PPU 1/2 MLPs", 220.0)
    _write(tmp_path, "rem_s2", "ppu_mlp4_damped", "PPU 1/4 MLPs, owner damping 1", 300.0)
    _write(tmp_path, "s3", "ppu_mlp4", "PPU 1/4 MLPs", 400.0)  # no reference run of seed 3
    (tmp_path / "s1" / "ppu_mlp4.partial.json").write_text("{}")  # a run in progress is not read
    rows = {r["method"]: r for r in T.summarise(T.load_runs(str(tmp_path)))}
    assert list(rows)[0] == "streaming_diloco"
    p = rows["ppu_mlp2"]
    assert p["seeds"] == [1, 2] and p["ppl"] == [150.0, 220.0] and p["replicas"] == [4]
    assert p["ppl_mean"] == pytest.approx(185.0) and p["ppl_half_range"] == pytest.approx(35.0)
    # paired by seed: 150/100 and 220/200, not mean(ppu)/mean(streaming) = 185/150
    assert p["ratio"] == pytest.approx([1.5, 1.1]) and p["ratio_mean"] == pytest.approx(1.3)
    assert rows["ppu_mlp4_damped"]["ratio"] == pytest.approx([1.5])
    assert rows["ppu_mlp4"]["ratio"] == [None] and rows["ppu_mlp4"]["ratio_mean"] is None
    md = T.to_markdown(list(rows.values()), "x")
    assert "| PPU 1/2 MLPs | 1, 2 | 150.0, 220.0 | 185.0 ± 35.0 | 1.500, 1.100 | 1.300 |" in md


@pytest.mark.timeout(120)
def test_a_seed_in_two_folders_is_refused(tmp_path):
    _write(tmp_path, "s1", "ppu_mlp2", "PPU 1/2 MLPs", 150.0)
    _write(tmp_path, "rem_s1", "ppu_mlp2", "PPU 1/2 MLPs", 151.0)
    with pytest.raises(ValueError, match="seed 1 is in two result folders"):
        T.load_runs(str(tmp_path))


@pytest.mark.timeout(120)
def test_merge_summary_by_fragment_and_part(tmp_path):
    trace = [{"iteration": it, "fragment": f, "local": loc, "plain_merge": pm, "outer_step": out, "gain": loc - out}
             for it, f, loc, pm, out in [(2, 0, 5.0, 4.0, 6.0), (3, 1, 3.0, 3.5, 2.0), (5, 0, 4.0, 3.0, 3.0),
                                         (8, 0, 2.0, 2.5, 2.5)]]
    os.makedirs(tmp_path / "s7")
    (tmp_path / "s7" / "ppu_mlp4_diag.json").write_text(json.dumps(
        {"label": "x", "final_ppl": 1.0, "argv": ARGV, "evals": [], "iterations": 9, "merge_trace": trace}))
    rows = T.merge_summary(T.load_runs(str(tmp_path)), parts=3)
    got = {(r["fragment"], r["iterations"]): (r["syncs"], r["merge"], r["gain"], r["positive"]) for r in rows}
    # iterations 1-3, 4-6, 7-9; fragment 0: syncs at 2 (merge +1, gain -1), 5 (+1, +1), 8 (-0.5, -0.5)
    assert got == {(0, (1, 3)): (1, 1.0, -1.0, 0), (0, (4, 6)): (1, 1.0, 1.0, 1), (0, (7, 9)): (1, -0.5, -0.5, 0),
                   (1, (1, 3)): (1, -0.5, 1.0, 1)}, got
