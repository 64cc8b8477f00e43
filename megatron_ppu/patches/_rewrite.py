"""Re-compile a megatron-core function with a few literal substitutions.

Some CUDA assumptions in megatron-core are string literals in the middle of long
functions (``torch.zeros([], device="cuda")`` in the pipeline schedules, say).
Copying those functions into this project would fork them; instead we take the
installed function's own source, replace the exact literal, compile it in the
function's own module namespace and rebind every reference to the old function.
Every substitution must match exactly the number of times we expect, so a
megatron-core whose source differs fails loudly instead of being half-patched.
"""
from __future__ import annotations

import inspect
import sys
import textwrap
import types
from typing import Callable, Sequence, Tuple

Replacement = Tuple[str, str]


def _unwrap(obj):
    # functools.wraps / lru_cache keep the undecorated function in __wrapped__.
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def rewrite_function(owner, name: str, replacements: Sequence[Replacement], expected: int | None = None) -> Callable:
    """Replace ``owner.name`` (a module-level function or a class's method) by a
    re-compiled copy of its source with ``replacements`` applied.

    Args:
        owner: the module or class that defines the function.
        name: attribute name of the function on ``owner``.
        replacements: ``(old, new)`` pairs of literal source text.
        expected: total number of substitutions that must happen (default: at
            least one in all).

    Returns the new function. Raises ``RuntimeError`` if the source does not
    contain the expected text.
    """
    original = owner.__dict__[name]
    wrapper = type(original) if isinstance(original, (staticmethod, classmethod)) else None
    func = _unwrap(original.__func__ if wrapper else original)
    module = sys.modules[func.__module__]
    source = textwrap.dedent(inspect.getsource(func))
    total = 0
    for old, new in replacements:
        total += source.count(old)
        source = source.replace(old, new)
    if expected is None and total == 0:
        raise RuntimeError(
            f"megatron_ppu patch: {func.__module__}.{func.__qualname__} contains none of "
            f"{[old for old, _ in replacements]}; this megatron-core version is not the one "
            "the patch was written for."
        )
    if expected is not None and total != expected:
        raise RuntimeError(
            f"megatron_ppu patch: expected {expected} substitutions in "
            f"{func.__module__}.{func.__qualname__}, found {total}."
        )
    # Compile inside a factory so that zero-argument super() in a method finds
    # its __class__ cell.
    cls = owner if isinstance(owner, type) else None
    factory_src = "def __ppu_factory__(__class__):\n" + textwrap.indent(source, "    ")
    factory_src += f"\n    return {func.__name__}\n"
    namespace: dict = {}
    code = compile(factory_src, f"<megatron_ppu patch of {func.__module__}.{func.__qualname__}>", "exec")
    exec(code, module.__dict__, namespace)  # noqa: S102 - source is the installed megatron-core's own
    new = namespace["__ppu_factory__"](cls)
    new.__ppu_original__ = original
    if wrapper is not None:
        new = wrapper(new)
    setattr(owner, name, new)
    if cls is None:
        # Rebind `from module import name [as alias]` copies held by other megatron modules.
        for mod_name, mod in list(sys.modules.items()):
            if mod is owner or not isinstance(mod, types.ModuleType) or not mod_name.startswith("megatron."):
                continue
            for attr, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, attr, new)
    return new
