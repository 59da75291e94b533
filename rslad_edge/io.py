"""Small file helpers every stage shares: atomic writes and content hashes (each file version hashed once)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rslad_edge.errors import ConfigError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place.

    A crash or Ctrl-C mid-write leaves the previous file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


_SHA256_CACHE: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The file's sha256, computed once per process per file version: the stages of a pipeline (export's source,
    verify, bench, the run record) all ask for it, and a checkpoint or engine can be hundreds of MB. The cache key
    is the resolved path, size, mtime and inode, so a rewritten file (always a new inode: writes are atomic
    renames) is hashed again."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(resolved, "rb") as f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def read_yaml_mapping(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """A user's YAML file as a dict, read with ``yaml.safe_load`` (data, never code); errors name ``flag``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} '{path}' must hold a mapping of option: value")
    return data
