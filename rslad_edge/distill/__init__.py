"""The distill stage: RSLAD and the paper's baselines. ``distill_student(cfg) -> DistillResult`` (the student
checkpoint as a typed :class:`rslad_edge.record.Artifact`); ``train(cfg) -> student.pt`` is one training run."""

from rslad_edge.distill.config import DistillConfig, resolve_config, resume_config
from rslad_edge.distill.methods import METHODS
from rslad_edge.distill.progress import RichObserver
from rslad_edge.distill.run import DistillResult, distill_student
from rslad_edge.distill.trainer import train

__all__ = ["METHODS", "DistillConfig", "DistillResult", "RichObserver", "distill_student", "resolve_config",
           "resume_config", "train"]
