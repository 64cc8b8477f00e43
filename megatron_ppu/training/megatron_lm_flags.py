"""Megatron-LM's GPT training flags at the tag that matches the installed megatron-core.

One generated table per Megatron-LM tag (``megatron_lm_flags_core_v0_16_1.py``,
``megatron_lm_flags_core_v0_19_0.py``: flag -> (dest, argument group, number of values,
Megatron-LM's default), written by ``python tools/flags_table.py megatron-lm``). The parser
follows the installed megatron-core (``megatron.core.package_info.__version__``): before 0.17
the ``core_v0.16.1`` table, from 0.17 on the ``core_v0.19.0`` table (the newest tag; 0.17 and
0.18 are read with it). :data:`MEGATRON_LM_TAG` and :data:`MEGATRON_LM_FLAGS` are the installed
version's; :func:`table` gives any tag's.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Dict, Tuple

#: The tags with a generated table, oldest first.
TAGS = ("core_v0.16.1", "core_v0.19.0")


def table(tag: str) -> Dict[str, tuple]:
    """``MEGATRON_LM_FLAGS`` of Megatron-LM at ``tag`` (one of :data:`TAGS`)."""
    if tag not in TAGS:
        raise ValueError(f"no Megatron-LM flag table for {tag!r}; the tables are {', '.join(TAGS)} "
                         "(generate one with tools/flags_table.py megatron-lm).")
    return importlib.import_module(f"{__name__}_{tag.replace('.', '_')}").MEGATRON_LM_FLAGS


def megatron_core_version() -> str:
    """``megatron.core.package_info.__version__`` of the installed megatron-core, read without
    importing ``megatron.core`` itself (its ``__init__`` imports the whole library)."""
    if "megatron.core.package_info" in sys.modules:
        return sys.modules["megatron.core.package_info"].__version__
    spec = importlib.util.find_spec("megatron.core")
    path = os.path.join(list(spec.submodule_search_locations)[0], "package_info.py")
    info = importlib.util.spec_from_file_location("_megatron_core_package_info", path)
    mod = importlib.util.module_from_spec(info)
    info.loader.exec_module(mod)
    return mod.__version__


def tag_for_version(version: str) -> str:
    """The table's tag for a megatron-core version: < 0.17 -> core_v0.16.1, else core_v0.19.0."""
    major_minor: Tuple[int, int] = tuple(int("".join(c for c in x if c.isdigit()) or 0)
                                         for x in version.split(".")[:2])
    return "core_v0.16.1" if major_minor < (0, 17) else "core_v0.19.0"


MEGATRON_LM_TAG = tag_for_version(megatron_core_version())
MEGATRON_LM_FLAGS = table(MEGATRON_LM_TAG)
