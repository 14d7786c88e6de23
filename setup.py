"""Packaging: `kernels/` is installed as the subpackage `fastsora.kernels`.

The mapping lives here (not only in pyproject.toml) so that editable and normal installs both resolve
`import fastsora.kernels` to the top-level `kernels/` folder.
"""
from setuptools import setup

setup(
    packages=[
        "fastsora",
        "fastsora.ops",
        "fastsora.nn",
        "fastsora.reference",
        "fastsora.cases",
        "fastsora.kernels",
    ],
    package_dir={"fastsora": "fastsora", "fastsora.kernels": "kernels"},
)
