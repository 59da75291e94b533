"""Versions of what produced a result: Python, rslad-edge and the packages a stage names.

Read from package metadata, so nothing is imported (importing torch or TensorRT only to learn its version would cost
seconds and can fail where the package is broken). Each stage keeps its own list next to its code, because what
matters differs: export records the exporters and runtimes that shaped the artifact, verify the attack
implementations, bench every runtime variant that might be installed.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata

from rslad_edge import __version__


def package_versions(packages: Iterable[str], *, skip_missing: bool = False) -> dict[str, str | None]:
    """``{"python", "rslad_edge", *packages}`` -> installed version, keyed by the distribution name as given.

    A package that is not installed maps to None, so a reader sees it was looked for and absent; with
    ``skip_missing`` it is left out instead, for lists of alternatives (``onnxruntime`` / ``onnxruntime-gpu``,
    ``tensorrt-cu12`` / ``tensorrt-cu13``) of which at most one is expected. ``rslad_edge`` is this code's own
    version, which is what ran even when the installed distribution is older or absent."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "rslad_edge": __version__}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            if not skip_missing:
                versions[package] = None
    return versions
