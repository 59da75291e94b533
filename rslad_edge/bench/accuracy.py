"""The accuracy column: clean and robust accuracy of an artifact, as verify measured it, matched by sha256.

Where the figures come from, in this order (never from a glob of a verify folder):

- the typed results a caller passes (the pipeline hands bench its verify entries: :func:`accuracies_from_record`);
- ``--verify-json FILE``: a verify JSON names the artifact it measured and its sha256;
- the run record (``run.json``) of the pipeline run that holds the artifact (``<run>/student.pt``,
  ``<run>/export/x.onnx``): one named file, read only if it exists.

A result is matched to an artifact by sha256 only, so a result for an older export of the same file name is never
shown next to the new file's latency (it is reported as stale instead).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rslad_edge.errors import RsladEdgeError
from rslad_edge.record import RECORD_FILE, RunRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accuracy:
    clean_acc: float | None
    robust_acc: float | None  # worst case over attacks (verify's per-sample worst case when it has one)
    source: str  # the verify JSON or run record it came from


@dataclass
class Accuracies:
    """sha256 -> Accuracy, and what a reader should know about what could not be matched."""

    by_sha256: dict[str, Accuracy] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def accuracies_from_record(record: RunRecord) -> Accuracies:
    """Every artifact the record's verify stage measured."""
    return Accuracies({entry.artifact_sha256: Accuracy(entry.clean_acc, entry.worst_case_acc, str(entry.json_path))
                       for entry in record.verify})


def _verify_json_records(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable verify result %s: %s", path, exc)
        return []
    items = data if isinstance(data, list) else data.get("results", [data]) if isinstance(data, dict) else []
    return [r for r in items if isinstance(r, dict) and "sha256" in r]


def _accuracy(record: dict[str, Any], source: Path) -> Accuracy:
    robust = record.get("worst_case_acc")
    if robust is None:
        per_attack = record.get("robust_acc")
        if isinstance(per_attack, dict) and per_attack:
            robust = min(float(v) for v in per_attack.values())
        elif isinstance(per_attack, (int, float)):
            robust = float(per_attack)
    clean = record.get("clean_acc")
    return Accuracy(float(clean) if clean is not None else None, float(robust) if robust is not None else None,
                    str(source))


def run_record_path(artifact: Path) -> Path:
    """Where the record of the pipeline run holding ``artifact`` would be: ``<run>/run.json`` for
    ``<run>/export/x.onnx`` and ``<run>/student.pt``."""
    artifact = Path(artifact).resolve()
    run = artifact.parent.parent if artifact.parent.name == "export" else artifact.parent
    return run / RECORD_FILE


def find_accuracies(artifacts: Sequence[tuple[Path, str]], verify_jsons: Iterable[Path] = ()) -> Accuracies:
    """The accuracies of the ``(path, sha256)`` artifacts from ``--verify-json`` files and the artifacts' run
    records, with warnings (a stale result, an unreadable record, a file that matches nothing)."""
    wanted = {sha: Path(path) for path, sha in artifacts}
    found: dict[str, Accuracy] = {}
    warnings: list[str] = []
    for json_path in (Path(p) for p in verify_jsons):
        if not json_path.is_file():
            warnings.append(f"--verify-json {json_path} does not exist")
            continue
        matched = [r for r in _verify_json_records(json_path) if r["sha256"] in wanted]
        for record in matched:
            found.setdefault(record["sha256"], _accuracy(record, json_path))
        if not matched:
            warnings.append(f"--verify-json {json_path} is for none of these artifacts (no sha256 matches)")

    names = {path.name: sha for sha, path in wanted.items()}
    for record_path in dict.fromkeys(run_record_path(path) for path in wanted.values()):
        if not record_path.is_file():
            continue
        try:
            record = RunRecord.load(record_path.parent)
        except RsladEdgeError as exc:
            warnings.append(f"no accuracies from {record_path}: {exc}")
            continue
        for sha, accuracy in accuracies_from_record(record).by_sha256.items():
            if sha in wanted:
                found.setdefault(sha, accuracy)
        for artifact in record.artifacts:
            if artifact.name in names and artifact.sha256 != names[artifact.name] and names[artifact.name] not in found:
                warnings.append(f"{record_path} has verify results for an older '{artifact.name}' (sha256 differs): "
                                "verify it again to show its accuracy")
    return Accuracies(found, list(dict.fromkeys(warnings)))
