"""Version-gated runtime patches to megatron-core (installed as ``megatron_ppu.patches``).

Nothing is patched on import: call :func:`apply_cpu_patches` explicitly.
"""
from .cpu import SUPPORTED_MEGATRON_CORE, apply_cpu_patches

__all__ = ["apply_cpu_patches", "SUPPORTED_MEGATRON_CORE"]
