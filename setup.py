"""graftfx: graft new operators into pretrained diffusion transformers through FX rewrites.

Three import names come from three folders: ``graftfx`` (the engine), ``graftfx.kernels``
(``kernels/``: Triton kernels beside their PyTorch references) and ``graftfx.rewrites``
(``rewrites/``: patterns, operators, rule files). There is never a top-level ``kernels``.
"""
import re

from setuptools import find_packages, setup


def _packages():
    pkgs = ["graftfx"] + [f"graftfx.{p}" for p in find_packages("graftfx")]
    for folder in ("kernels", "rewrites"):
        pkgs.append(f"graftfx.{folder}")
        pkgs += [f"graftfx.{folder}.{p}" for p in find_packages(folder)]
    return pkgs


setup(
    name="graftfx",
    version=re.search(r'__version__ = "(.+?)"', open("graftfx/_version.py").read()).group(1),
    description="Graft new operators into pretrained diffusion transformers via FX rewrites",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"graftfx.kernels": "kernels", "graftfx.rewrites": "rewrites"},
    package_data={
        "graftfx.rewrites": ["rules/*.toml", "studies/*.toml"],
        "graftfx": ["assets/*", "assets/**/*"],
    },
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "tomli>=2.0; python_version < '3.11'",
    ],
    extras_require={
        # transformers for the client zoo (tests/clients); timm's pure-Python needs, timm itself
        # comes from the "timm" extra or, in the dev set-up, without its torchvision (Makefile).
        "dev": ["pytest>=8", "pytest-xdist>=3", "transformers>=5.0", "pyyaml", "huggingface_hub"],
        "diffusers": ["diffusers>=0.30"],
        # timm requires torchvision; PyPI's torchvision for torch 2.13.0 is a CUDA build that does
        # not load against the CPU torch, so `make setup` installs timm with --no-deps instead.
        "timm": ["timm>=1.0"],
        "flash": ["flash-attn>=2.6"],
        "mamba": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
    },
    entry_points={"console_scripts": ["graftfx=graftfx.cli:main"]},
)
