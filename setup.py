"""strata: five new language-model architectures as first-class Hugging Face citizens."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="strata",
    version="0.1.0",
    description="Hierarchical, recurrent and dynamic-expert language models for Hugging Face Transformers",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["strata", "strata.*"]),
    package_data={"strata": ["data/*.txt", "data/*.md", "tokenization/default/*"]},
    include_package_data=True,
    # Lower bounds: the APIs strata uses; upper bounds: the newest versions tested
    # (transformers 5.23.0, peft 0.21.2, torch 2.13.0, see docs/compatibility in README).
    install_requires=[
        "torch>=2.4,<=2.13.0",
        "transformers>=5.20,<5.24",
        "safetensors>=0.4,<0.9",
        "huggingface-hub>=1.0,<2.5",
        "accelerate>=1.0,<1.16",
        "peft>=0.17,<0.22",
        "tokenizers>=0.22,<0.24",
        "datasets>=3.0,<5.3",
        "jieba>=0.42,<0.43",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        "triton": ["triton>=3.0,<3.10"],
        "cuda": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
        "bench": ["matplotlib>=3.7"],
        "experiment": ["matplotlib>=3.7"],  # figures of `strata experiment`
        "onnx": ["onnx>=1.17,<1.24", "onnxscript>=0.5,<0.8", "onnxruntime>=1.20,<1.33"],
        "test": [
            "pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100", "matplotlib>=3.7", "psutil>=5.9",
            "onnx>=1.17,<1.24", "onnxscript>=0.5,<0.8", "onnxruntime>=1.20,<1.33",
            "triton>=3.0,<3.10",  # the Triton kernels' tests run on CPU under TRITON_INTERPRET=1
        ],
    },
    entry_points={"console_scripts": ["strata=strata.cli:main"]},
)
