"""The shape of ``megatron_ppu/training/checkpointing/`` (issue 23 item 1): parts that each say what they
own, none over 600 lines, and none that knows the trainer (save and load work on a ``TrainingState``;
the trainer holds a ``Checkpointer`` and applies the position a load returns). The behaviour is
checked by the checkpoint tests (test_checkpoint_fs.py, test_megatron_checkpoints.py, ...)."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "megatron_ppu" / "training" / "checkpointing"
PARTS = {"__init__", "verdicts", "storage", "format", "sharding", "megatron_lm", "state", "save_load", "checkpointer"}


def _modules():
    return {f.stem: ast.parse(f.read_text()) for f in sorted(PACKAGE.glob("*.py"))}


def test_parts_have_docstrings_and_stay_small():
    mods = _modules()
    assert set(mods) == PARTS, sorted(mods)
    for name, tree in mods.items():
        doc = ast.get_docstring(tree)
        assert doc and len(doc.split()) >= 40, f"{name}.py: a module docstring saying what it owns"
        lines = len((PACKAGE / f"{name}.py").read_text().splitlines())
        assert lines <= 600, f"{name}.py has {lines} lines"


def test_no_part_knows_the_trainer():
    """No import of the training loop and no parameter or name ``trainer`` anywhere in the package."""
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert "loop" not in (node.module or "").split("."), f"{name}.py imports {node.module}"
            if isinstance(node, ast.arg):
                assert node.arg != "trainer", f"{name}.py: a function takes the trainer"
            if isinstance(node, ast.Name):
                assert node.id != "trainer", f"{name}.py line {node.lineno} uses the trainer"


def test_public_names_tests_and_modules_use():
    import megatron_ppu.training.checkpointing as C
    from megatron_ppu.training.checkpointing.megatron_lm import apply_checkpoint_args  # arguments.py
    from megatron_ppu.training.checkpointing.storage import copy_to_views, probe_views  # data.py

    for n in ("CheckpointError", "Checkpointer", "TrainingState", "RunShape", "Restored", "find_checkpoint",
              "resolve_checkpoint", "probe_views", "shard_state", "unshard_state", "load_megatron_lm_checkpoint"):
        assert hasattr(C, n), n
    assert C.apply_checkpoint_args is apply_checkpoint_args and C.probe_views is probe_views
    assert C.copy_to_views is copy_to_views
    assert issubclass(C.CheckpointError, ValueError)  # user errors are ValueErrors
    # the rank files pickle the replica skeleton's references under the name they had before the split
    assert C._TensorRef.__module__ == "megatron_ppu.training.checkpointing"
