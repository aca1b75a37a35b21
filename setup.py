from setuptools import find_packages, setup

setup(
    name="lns_megatron",
    version="0.1.0",
    description="LayerNorm Scaling (The Curse of Depth in LLMs, 2025) for GPT pretraining on NVIDIA megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lns_megatron", "lns_megatron.*"]),
    install_requires=[
        # On a CPU-only machine install torch==2.13.0 first: a bare torch pulls CUDA wheels.
        "torch>=2.6",
        # CI tests 0.16.1 (the newest release for Python 3.11) and 0.19.2 (Python 3.12); 0.17+ need Python 3.12.
        "megatron-core>=0.16.1,<0.20",
        "triton; python_version >= '3.12'",  # megatron-core 0.18+ imports it from the pipeline schedules
        "numpy",
        "psutil",  # megatron's dist_checkpointing writer needs it
        "tensorboard",
        "datasets",
        "tokenizers",
        "sentencepiece",
        "tiktoken",
        "tqdm",
        "zstandard",
        "pyarrow",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "transformers>=5.0", "accelerate>=1.0", "deepspeed>=0.16"],
        "te": ["transformer-engine[pytorch]>=2.9,<2.12"],
        # Export, LNS on Hugging Face models, fine-tuning (lns_megatron.hf).
        "hf": ["transformers>=5.0", "accelerate>=1.0"],
        "deepspeed": ["transformers>=5.0", "accelerate>=1.0", "deepspeed>=0.16"],
    },
    entry_points={"console_scripts": ["lns-pretrain=lns_megatron.pretrain:main"]},
)
