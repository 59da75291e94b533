"""Acceptance on real data (slow, minutes on a CPU): verify's ``pgd_sat`` on the shared robust teacher agrees with a
plain PGD-20 written here from the paper's description, not from ``rslad_edge.attacks``; and the teacher's int8
export, attacked through its differentiable twin, is as vulnerable to PGD as the checkpoint.

Needs ``../shared`` (the teacher, and the CIFAR-10 JPEG archive when ``/tmp/rslad-data/cifar10`` is not unpacked);
skips without it. Run with ``pytest -m slow tests/test_verify_acceptance.py``.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow

UNPACKED = Path("/tmp/rslad-data/cifar10")
TEACHER = Path("models/resnet18-cifar10-fastat.pt")
N = 500  # the model card's PGD-20 sample: the first 500 of rng(0).permutation(10000)[:1000] = subset(test, 500, 0)
EPS, STEP, STEPS = 8 / 255, 2 / 255, 20
CARD_PGD20 = 0.408  # resnet18-cifar10-fastat.json: pgd20_acc_500_seed0
AGREEMENT = 0.03  # 3 points: twin and transfer within this of the checkpoint


@pytest.fixture(scope="module", autouse=True)
def threads_within_affinity():
    """No more torch threads than the cores this process may use (``taskset -c 1 pytest ...`` runs on one core)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(previous, len(os.sched_getaffinity(0)))))
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def cifar10_root(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image-folder CIFAR-10: the unpacked copy if present, else the test split unpacked from ../shared."""
    if (UNPACKED / "test").is_dir():
        return UNPACKED
    archive_path = shared_dir / "data" / "cifar10-jpeg.tar.gz"
    if not archive_path.is_file():
        pytest.skip(f"{archive_path} is not present")
    target = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive_path) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("cifar10/test/")]
        archive.extractall(target, members=members, filter="data")
    return target / "cifar10"


def plain_pgd20_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """Madry's PGD-20 as the papers state it: uniform start in the eps-ball, 20 signed steps of 2/255 on the mean
    cross-entropy, projection onto the ball and [0, 1] after each; (N,) bool, correct on the adversarial image."""
    generator = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * EPS
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(STEPS):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, [delta])
        delta = (delta.detach() + STEP * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():
        return model(x + delta).argmax(dim=1) == y


def test_pgd_sat_on_the_shared_teacher_agrees_with_an_independent_pgd20(shared_dir, cifar10_root):
    from rslad_edge.data import load_dataset, subset, to_float
    from rslad_edge.runtime import load_runner
    from rslad_edge.verify import verify

    runner = load_runner(shared_dir / TEACHER, "cpu", arch="resnet18")
    test = subset(load_dataset("imagefolder", cifar10_root, "test"), N, seed=0)
    x, y = to_float(test.images), test.labels

    report = verify(runner, x, y, attacks=["pgd_sat"], eps=EPS, batch_size=100, seed=0)
    ours = report.robust_acc["pgd_sat"]

    model = runner.model
    clean_correct = report.artifact.clean_correct
    independent_correct = torch.cat([
        plain_pgd20_correct(model, x[start : start + 100], y[start : start + 100], seed=1 + start)
        for start in range(0, N, 100)
    ])
    independent = float((independent_correct & clean_correct).float().mean())
    print(f"teacher, {N} seeded CIFAR-10 test images: clean {report.clean_acc:.3f}, verify pgd_sat {ours:.3f}, "
          f"independent PGD-20 {independent:.3f}, card {CARD_PGD20:.3f}, verify took {report.seconds:.0f} s")
    assert abs(ours - independent) <= AGREEMENT
    assert abs(ours - CARD_PGD20) <= AGREEMENT


@pytest.mark.parametrize("target", ["cpu", "trt"])
def test_int8_teacher_faces_white_box_through_its_twin_as_strong_as_on_the_checkpoint(shared_dir, cifar10_root,
                                                                                        tmp_path, target):
    """Acceptance: the shared teacher exported to int8 (--target cpu: U8S8; --target trt: S8S8
    symmetric, the Q/DQ graph TensorRT builds from, judged here by ONNX Runtime's CPU provider since no TensorRT runs
    on this machine), verified on 200 test images: the twin agrees with the artifact, and PGD_SAT crafted on the twin
    (judged by ONNX Runtime) is no weaker than the transfer PGD from the checkpoint and within 3 points of the
    checkpoint's own PGD_SAT on the same images."""
    from rslad_edge.data import load_dataset, subset, to_float
    from rslad_edge.export import ExportConfig, export
    from rslad_edge.runtime import load_runner
    from rslad_edge.verify import verify

    teacher = shared_dir / TEACHER
    exported = export(ExportConfig(checkpoint=teacher, arch="resnet18", precision="int8", target=target,
                                   dataset="imagefolder", data_root=str(cifar10_root), out=tmp_path))
    test = subset(load_dataset("imagefolder", cifar10_root, "test"), 200, seed=0)
    report = verify(load_runner(exported.onnx_path, "cpu", spinning=False), to_float(test.images), test.labels,
                    reference=load_runner(teacher, "cpu", arch="resnet18"), attacks="pgd_sat,transfer_pgd",
                    eps=EPS, batch_size=100, seed=0)
    twin_pgd, transfer_pgd = report.robust_acc["pgd_sat"], report.robust_acc["transfer_pgd"]
    checkpoint_pgd = report.accuracy("pgd_sat", reference=True)
    print(f"int8 teacher (--target {target}), 200 images: twin agreement {report.artifact.twin.agreement:.3f}, "
          f"twin PGD {twin_pgd:.3f}, "
          f"transfer PGD {transfer_pgd:.3f}, checkpoint PGD_SAT {checkpoint_pgd:.3f}")
    assert report.artifact.twin.trusted
    assert twin_pgd <= transfer_pgd
    assert abs(twin_pgd - checkpoint_pgd) <= AGREEMENT
