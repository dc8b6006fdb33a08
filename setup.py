from setuptools import find_packages, setup

setup(
    name="kdlib",
    version="0.1.0",
    description="Offline teacher-logit cache for knowledge distillation (FKD-style consistent function matching)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kdlib", "kdlib.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.26",
        "zarr>=3.0.8,<4",
        "webdataset>=0.2.100",
        "accelerate>=1.0",
        "click>=8.1",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6",
        "pillow>=10",
        "fsspec>=2024.12",
    ],
    extras_require={"test": ["pytest>=8"], "plot": ["matplotlib>=3.7"], "timm": ["timm>=1.0"]},
    entry_points={"console_scripts": ["kdlib=kdlib.cli:main"]},
)
