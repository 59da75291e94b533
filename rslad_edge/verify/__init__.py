"""Verify: robust accuracy of any artifact, on the artifact itself, next to the PyTorch model it came from.

    report = verify(load_runner("student.int8.onnx"), x, y, reference=load_runner("student.pt"))
    report.robust_acc, report.worst_case_acc, report.drop_pp("square"); report.check_gate(2.0)

White-box attacks on every artifact (an exported one through its differentiable twin, judged by its own runtime),
transfer (crafted on the reference / sources), divergence (float vs artifact) and Square (queries only); per-sample
worst case; sanity checks for gradient masking and for the twin's agreement; a ``--max-drop`` gate.
"""

from rslad_edge.verify.core import ProgressFn, verify
from rslad_edge.verify.report import DivergenceStats, ModelResult, QueryStats, VerifyReport
from rslad_edge.verify.run import VerifyConfig, load_verify_images, verify_artifact
from rslad_edge.verify.suite import (
    CHECKPOINT_DEFAULT_ATTACKS,
    DEFAULT_ATTACKS,
    EXPORTED_DEFAULT_ATTACKS,
    VERIFY_ATTACKS,
    VerifyAttack,
    checkpoint_attacks,
    default_attack_names,
    parse_attacks,
)
from rslad_edge.verify.targets import ArtifactInfo, Model, as_model

__all__ = [
    "CHECKPOINT_DEFAULT_ATTACKS",
    "DEFAULT_ATTACKS",
    "EXPORTED_DEFAULT_ATTACKS",
    "VERIFY_ATTACKS",
    "ArtifactInfo",
    "DivergenceStats",
    "Model",
    "ModelResult",
    "ProgressFn",
    "QueryStats",
    "VerifyAttack",
    "VerifyConfig",
    "VerifyReport",
    "as_model",
    "checkpoint_attacks",
    "default_attack_names",
    "load_verify_images",
    "parse_attacks",
    "verify",
    "verify_artifact",
]
