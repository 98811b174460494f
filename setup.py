"""megaclip: train giant CLIP models with tensor, pipeline and ZeRO data parallelism."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megaclip",
    version="0.1.0",
    description="Train giant CLIP models with TP x PP x ZeRO-DP (megatron-core + DeepSpeed)",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megaclip", "megaclip.*"]),
    package_data={
        "megaclip": [
            "config/presets/*.yaml",
            "bench/models/*.yaml",
            "tokenizer/*.gz",
            "scaling/data/*.csv",
        ]
    },
    include_package_data=True,
    # A range, not a pin: GPU users keep the CUDA torch they already have.
    # scripts/install.sh pins the torch build that CPU machines install from local disk.
    install_requires=[
        "torch>=2.4,<2.16",
        "deepspeed>=0.16,<0.20",
        "megatron-core>=0.12,<0.18",
        "sentencepiece>=0.2",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.60",
        "regex>=2022.1",  # CLIP BPE pre-tokenizer (Unicode classes); ids match open_clip
        "ftfy>=6.1",  # caption clean-up exactly as open_clip does it
        "safetensors>=0.4",
        "pillow>=9",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "pytest-timeout>=2.3",  # a hung test fails with its traceback instead of stalling CI
            "open_clip_torch>=2.24",
            "scikit-learn>=1.3",
            "transformers>=4.40,<6",  # HF CLIPModel export/import tests
            "clip-benchmark>=1.6,<2",  # CLIP_benchmark agreement test
            "requests>=2.28",  # imported by clip-benchmark, which does not declare it
            "webdataset>=0.2",  # benchmarks/data_throughput.py: open_clip's data pipeline
        ],
        # remote shards: s3://, gs://, hf:// ... through fsspec (http(s) and pipe: need nothing)
        "remote": ["fsspec>=2023.1", "s3fs>=2023.1"],
        # Hugging Face transformers: verify exports (`convert --to hf --verify`), load them.
        "hf": ["transformers>=4.40,<6"],
        "demo": ["scikit-learn>=1.3", "pillow>=9"],
        # ruff pinned: format output differs between releases; import-linter: `lint-imports`
        # checks the package layering in pyproject.toml
        "dev": ["ruff==0.17.6", "import-linter>=2.16,<3"],
        "plot": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["megaclip=megaclip.cli.main:main"]},
)
