"""Builds enginepy (from enginepy/), enginepy.kernels (from kernels/) and the extension enginepy._C (from csrc/)."""
from setuptools import setup

setup(
    name="enginepy",
    version="0.1.0",
    description="A fast, faithful MusicGen inference engine",
    packages=["enginepy", "enginepy.kernels"],
    package_dir={"enginepy": "enginepy", "enginepy.kernels": "kernels"},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["enginepy=enginepy.cli:main"]},
)
