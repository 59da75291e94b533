"""Reference tests: the authors' published training code, transcribed as the specification, against ours.

Each ``authors_*`` function below is an independent, plain transcription of what the authors' code does (read from
zibojia/RSLAD ``rslad_loss.py`` / ``resnet18_rslad_cifar10.py``, yaodongyu/TRADES ``trades.py`` /
``train_trades_cifar10.py``, goldblum/AdversarialRobustnessDistillation ``main.py`` and the IAD-I script), written
without any rslad-edge code. The tests give ours and theirs the same student, teacher, batch and random-start noise
and compare x' and the parameter gradients of one step. These pin behaviour that a restatement of our own constants
could not: the unclamped random start, the BN mode of each attack, which logits each term uses, every reduction.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rslad_edge.attacks import pgd
from rslad_edge.distill.config import DistillConfig, resolve_config
from rslad_edge.distill.ddp import DistInfo
from rslad_edge.distill.schedules import step_lr
from rslad_edge.distill.trainer import _build, craft_adversarial, train_step
from rslad_edge.models import create_model, save_checkpoint
from rslad_edge.models.folding import BatchNormFoldedView

EPS, STEP, STEPS = 8 / 255, 2 / 255, 3


def training_attack(*args, **kwargs):
    """The training attack as the trainer calls it: PGD with the authors' unclamped random start."""
    return pgd(*args, **kwargs, clamp_start=False)

# ------------------------------------------------------------------------------------ the authors' code, transcribed


def authors_rslad_inner_max(model, teacher_logits, x_natural, start_noise, step_size, epsilon, perturb_steps):
    """RSLAD ``rslad_inner_loss``: eval mode, start x + 0.001·N (not clamped), ascend the summed KL to the teacher's
    clean probabilities, sign step, project onto the eps-ball, clamp to [0, 1]."""
    model.eval()
    x_adv = x_natural.detach() + start_noise
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            kl_sum = torch.sum(F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_logits, dim=1),
                                        reduction="none"))
        grad = torch.autograd.grad(kl_sum, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0)


def authors_rslad_outer_loss(adv_logits, nat_logits, teacher_logits):
    """RSLAD's training script: ``kl_loss(a, b) = -a·b + log(b + 1e-5)·b`` averaged over batch x classes."""

    def elementwise_kl(log_probs, probs):
        return -log_probs * probs + torch.log(probs + 1e-5) * probs

    target = F.softmax(teacher_logits.detach(), dim=1)
    kl_adv = torch.mean(elementwise_kl(F.log_softmax(adv_logits, dim=1), target))
    kl_nat = torch.mean(elementwise_kl(F.log_softmax(nat_logits, dim=1), target))
    return 5 / 6.0 * kl_adv + 1 / 6.0 * kl_nat


def authors_trades_inner_max(model, x_natural, start_noise, step_size, epsilon, perturb_steps):
    """TRADES ``trades_loss`` (the attack half): eval mode, the KL to the model's own clean prediction (recomputed
    every step, constant in eval mode), summed; start x + 0.001·N, not clamped."""
    model.eval()
    x_adv = x_natural.detach() + start_noise
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            kl_sum = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1),
                              reduction="sum")
        grad = torch.autograd.grad(kl_sum, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0)


def authors_trades_outer_loss(model, x_natural, x_adv, y, beta):
    """TRADES ``trades_loss`` (the loss half): train mode, CE on x plus beta/B times the summed KL; the clean
    distribution is a second forward of x and is not detached."""
    batch_size = len(x_natural)
    loss_natural = F.cross_entropy(model(x_natural), y)
    loss_robust = (1.0 / batch_size) * F.kl_div(F.log_softmax(model(x_adv), dim=1),
                                                F.softmax(model(x_natural), dim=1), reduction="sum")
    return loss_natural + beta * loss_robust


def authors_attack_pgd(basic_net, inputs, targets, start_noise, step_size, epsilon, num_steps):
    """ARD's and IAD's ``AttackPGD.forward``: in whatever mode the net is (train, in their loops), start
    x + U(-eps, eps) (not clamped), ascend the summed CE; returns (the net's logits on x', x')."""
    x = inputs.detach() + start_noise
    for _ in range(num_steps):
        x.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(basic_net(x), targets, reduction="sum")
        grad = torch.autograd.grad(loss, [x])[0]
        x = x.detach() + step_size * torch.sign(grad.detach())
        x = torch.min(torch.max(x, inputs - epsilon), inputs + epsilon)
        x = torch.clamp(x, 0.0, 1.0)
    return basic_net(x), x


def authors_ard_loss(outputs, teacher_outputs, basic_outputs, targets, alpha, temp):
    """ARD ``main.py``: ``nn.KLDivLoss()`` (mean over batch x classes) times alpha·T², plus (1 − alpha)·CE(S(x))."""
    kl_mean = F.kl_div(F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1),
                       reduction="none").mean()  # nn.KLDivLoss()'s default: the mean over every element
    return alpha * temp * temp * kl_mean + (1.0 - alpha) * F.cross_entropy(basic_outputs, targets)


def authors_iad_loss(outputs, teacher_outputs, clean_outputs, guide, targets, epoch, *, begin, alpha, temp, beta):
    """IAD-I: the ARD term per sample summed / B; from 0-based ``epoch >= begin`` also KL(S(x) ‖ S(x')) per sample
    weighted by 1 − P_T(y | x')^beta (a constant), summed / B; plus (1 − alpha)·CE(S(x))."""
    batch = len(outputs)
    kl_teacher = F.kl_div(F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1),
                          reduction="none").sum(dim=1)
    loss = alpha * temp * temp * (1 / batch) * torch.sum(kl_teacher)
    if epoch >= begin:
        trust = torch.ones(batch)
        for i in range(batch):
            trust[i] = F.softmax(guide, dim=1)[i][targets[i].item()].pow(beta).item()
        kl_self = F.kl_div(F.log_softmax(outputs, dim=1), F.softmax(clean_outputs, dim=1),
                           reduction="none").sum(dim=1)
        loss = loss + alpha * (1 / batch) * torch.sum(kl_self.mul(1 - trust))
    return loss + (1.0 - alpha) * F.cross_entropy(clean_outputs, targets)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(1)
    teacher = create_model("smallcnn-wide")
    with torch.no_grad():
        teacher.linear.weight.mul_(30)  # soft labels far from uniform, as a trained teacher's are
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    return save_checkpoint(path, teacher, "smallcnn-wide", num_classes=10, input_size=(32, 32))


def batch_with_saturated_pixels(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with black and white rows (real images have them): where the unclamped start matters."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=generator)
    x[:, :, :6] = 0.0
    x[:, :, -6:] = 1.0
    return x, torch.randint(0, 10, (n,), generator=generator)


def built_run(tmp_path, teacher_path, method: str, **overrides):
    values = dict(
        out=str(tmp_path / "run"), student="smallcnn", teacher=str(teacher_path), method=method, dataset="shapes",
        batch_size=16, train_subset=16, val_n=16, attack_steps=STEPS, step_size=STEP, eps=EPS, precision="fp32",
        device="cpu", preset="smoke",
    )
    return _build(DistillConfig(**{**values, **overrides}), DistInfo())


def start_noise(method: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The first draw of a generator seeded ``seed``: what our attack adds to x before its first step."""
    generator = torch.Generator().manual_seed(seed)
    if method in ("rslad", "trades"):
        return 0.001 * torch.randn(x.shape, generator=generator)
    return torch.empty_like(x).uniform_(-EPS, EPS, generator=generator)


def parameter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Equal up to float rounding (the two sum the same terms in another order): a wrong reduction, a detached or
    missing term, another BN mode would be off by a large fraction of the gradient."""
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() <= 1e-4 * theirs[name].abs().max(), name


def attacking_the_student_itself(run):
    """The run with its eval-mode attack on the student rather than on its BN-folded view. The fold is exact up to
    rounding, but where an input gradient is ~0 its sign follows rounding, so a bitwise comparison of x' with the
    authors' loop needs the same arithmetic; test_bn_folded_attack_... checks the fold itself."""
    return dataclasses.replace(run, student_eval_view=run.student)


# ------------------------------------------------------------------------------------ x'


def test_rslad_training_attack_gives_the_authors_x_adv_from_the_same_noise():
    torch.manual_seed(0)
    student, teacher = create_model("smallcnn").eval(), create_model("smallcnn-wide").eval()
    x, _ = batch_with_saturated_pixels()
    with torch.no_grad():
        teacher_logits = teacher(x)
    theirs = authors_rslad_inner_max(copy.deepcopy(student), teacher_logits, x, start_noise("rslad", x, 7), STEP, EPS,
                                     STEPS)
    kwargs = dict(eps=EPS, step_size=STEP, steps=STEPS, loss="kl", random_start="normal",
                  target_probs=F.softmax(teacher_logits, dim=1))
    ours = training_attack(student, x, None, **kwargs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, theirs)
    # Evaluation PGD clamps its start to [0, 1]; on saturated pixels that changes x' (so training: clamp_start=False).
    assert not torch.equal(pgd(student, x, None, **kwargs, generator=torch.Generator().manual_seed(7)), theirs)


def test_trades_training_attack_gives_the_authors_x_adv_from_the_same_noise():
    torch.manual_seed(0)
    student = create_model("smallcnn").eval()
    x, _ = batch_with_saturated_pixels()
    theirs = authors_trades_inner_max(copy.deepcopy(student), x, start_noise("trades", x, 7), 0.007, EPS, STEPS)
    with torch.no_grad():
        own_clean_probs = F.softmax(student(x), dim=1)
    ours = training_attack(student, x, None, eps=EPS, step_size=0.007, steps=STEPS, loss="kl", random_start="normal",
                           target_probs=own_clean_probs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, theirs)


def test_ard_training_attack_gives_the_authors_x_adv_in_train_mode_from_the_same_noise():
    torch.manual_seed(0)
    student = create_model("smallcnn").train()
    reference = copy.deepcopy(student)
    x, y = batch_with_saturated_pixels()
    _, theirs = authors_attack_pgd(reference, x, y, start_noise("ard", x, 7), STEP, EPS, STEPS)
    ours = training_attack(student, x, y, eps=EPS, step_size=STEP, steps=STEPS, loss="ce", random_start="uniform",
                           generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------------------ one step: the same gradients


def test_rslad_step_has_the_authors_gradients_at_the_authors_scale(tmp_path, teacher_path):
    run = attacking_the_student_itself(built_run(tmp_path, teacher_path, "rslad", loss_scale="authors"))
    reference = copy.deepcopy(run.student)
    x, y = batch_with_saturated_pixels()
    train_step(run, x, y, 1, torch.Generator().manual_seed(5))

    with torch.no_grad():
        teacher_logits = run.teacher(x)
    x_adv = authors_rslad_inner_max(reference, teacher_logits, x, start_noise("rslad", x, 5), STEP, EPS, STEPS)
    adv_logits = reference(x_adv)  # train mode, then the clean batch: the authors' order
    nat_logits = reference(x)
    authors_rslad_outer_loss(adv_logits, nat_logits, teacher_logits).backward()
    assert_same_grads(parameter_grads(run.student), parameter_grads(reference))
    for name, buffer in reference.named_buffers():  # the same forwards in the same BN modes: the same statistics
        assert torch.allclose(run.student.get_buffer(name), buffer, rtol=1e-5, atol=1e-7), name


def test_trades_step_has_the_authors_gradients(tmp_path, teacher_path):
    run = attacking_the_student_itself(built_run(tmp_path, teacher_path, "trades", step_size=0.007))
    reference = copy.deepcopy(run.student)
    x, y = batch_with_saturated_pixels()
    train_step(run, x, y, 1, torch.Generator().manual_seed(5))

    x_adv = authors_trades_inner_max(reference, x, start_noise("trades", x, 5), 0.007, EPS, STEPS)
    authors_trades_outer_loss(reference, x, x_adv, y, beta=6.0).backward()
    assert_same_grads(parameter_grads(run.student), parameter_grads(reference))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_ard_step_has_the_authors_gradients_and_batchnorm_statistics(tmp_path, teacher_path, alpha):
    run = built_run(tmp_path, teacher_path, "ard", alpha=alpha, loss_scale="authors")
    reference = copy.deepcopy(run.student).train()
    x, y = batch_with_saturated_pixels()
    train_step(run, x, y, 1, torch.Generator().manual_seed(5))

    outputs, _ = authors_attack_pgd(reference, x, y, start_noise("ard", x, 5), STEP, EPS, STEPS)
    with torch.no_grad():
        teacher_outputs = run.teacher(x)
    basic_outputs = reference(x)
    authors_ard_loss(outputs, teacher_outputs, basic_outputs, y, alpha=alpha, temp=30.0).backward()
    assert_same_grads(parameter_grads(run.student), parameter_grads(reference))
    # Train-mode attack: every attack forward moved the running statistics, in ours as in theirs.
    for name, buffer in reference.named_buffers():
        assert torch.allclose(run.student.get_buffer(name), buffer, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("epoch", [60, 61])  # ours 1-based: 61 is their 0-based 60, the first introspecting epoch
def test_iad_step_has_the_authors_gradients_before_and_after_introspection_begins(tmp_path, teacher_path, epoch):
    run = built_run(tmp_path, teacher_path, "iad")
    reference = copy.deepcopy(run.student).train()
    x, y = batch_with_saturated_pixels()
    step = train_step(run, x, y, epoch, torch.Generator().manual_seed(5))
    assert ("introspection" in step.terms) == (epoch == 61)

    outputs, x_adv = authors_attack_pgd(reference, x, y, start_noise("iad", x, 5), STEP, EPS, STEPS)
    with torch.no_grad():
        teacher_outputs, guide = run.teacher(x), run.teacher(x_adv)
    clean_outputs = reference(x)
    authors_iad_loss(outputs, teacher_outputs, clean_outputs, guide, y, epoch - 1, begin=60, alpha=1.0, temp=1.0,
                     beta=0.1).backward()
    assert_same_grads(parameter_grads(run.student), parameter_grads(reference))


def test_bn_folded_attack_crafts_the_x_adv_of_the_eval_mode_student_but_for_rounding_ties(tmp_path, teacher_path):
    run = built_run(tmp_path, teacher_path, "rslad")
    assert isinstance(run.student_eval_view, BatchNormFoldedView)  # the fast path the trainer takes
    x, y = batch_with_saturated_pixels()
    with torch.no_grad():
        teacher_clean = run.teacher(x)
    folded = craft_adversarial(run, x, y, teacher_clean, torch.Generator().manual_seed(5))
    plain = craft_adversarial(attacking_the_student_itself(run), x, y, teacher_clean, torch.Generator().manual_seed(5))
    assert (folded != plain).float().mean() < 0.01
    run.student.eval()
    with torch.no_grad():
        folded_kl, plain_kl = _kl(teacher_clean, run.student(folded)), _kl(teacher_clean, run.student(plain))
    assert folded_kl == pytest.approx(plain_kl, rel=0.01)


# ------------------------------------------------------------------------------------ the step's mechanics


def _linear_modes(module: torch.nn.Module, calls: list[bool]):
    return module.linear.register_forward_hook(lambda mod, args, out: calls.append(mod.training))


@pytest.mark.parametrize(
    "method,attack_modes,teacher_calls",
    [("rslad", [False] * STEPS, 1), ("trades", [False] * (STEPS + 1), 0), ("ard", [True] * STEPS, 1),
     ("iad", [True] * STEPS, 2), ("sat", [True] * STEPS, 0)],
)
def test_train_step_runs_each_attack_in_its_authors_bn_mode_and_the_outer_forwards_in_train_mode(
    tmp_path, teacher_path, method, attack_modes, teacher_calls
):
    run = built_run(tmp_path, teacher_path, method)
    student_modes, teacher_modes = [], []
    hooks = [_linear_modes(run.student, student_modes)]
    if run.teacher is not None:
        hooks.append(_linear_modes(run.teacher, teacher_modes))
    x, y = batch_with_saturated_pixels()
    train_step(run, x, y, 1, torch.Generator().manual_seed(5))
    for hook in hooks:
        hook.remove()
    outer = ["student_adv" in run.method.needs, "student_clean" in run.method.needs].count(True)
    # TRADES: one eval-mode forward of x for its own clean target, then the attack steps.
    assert student_modes == attack_modes + [True] * outer
    # RSLAD never queries the teacher at x'; IAD does (its trust weights), once.
    assert len(teacher_modes) == teacher_calls and not any(teacher_modes)


@pytest.mark.parametrize("method,untouched", [("rslad", True), ("trades", True), ("ard", False), ("sat", False)])
def test_eval_mode_attacks_leave_the_batchnorm_statistics_untouched(tmp_path, teacher_path, method, untouched):
    run = built_run(tmp_path, teacher_path, method)
    before = {name: buffer.clone() for name, buffer in run.student.named_buffers()}
    x, y = batch_with_saturated_pixels()
    teacher_clean = run.teacher(x) if run.teacher is not None else None
    craft_adversarial(run, x, y, teacher_clean, torch.Generator().manual_seed(5))
    same = all(torch.equal(before[name], buffer) for name, buffer in run.student.named_buffers())
    assert same == untouched


def _kl(target_logits: torch.Tensor, logits: torch.Tensor) -> float:
    return F.kl_div(F.log_softmax(logits, 1), F.softmax(target_logits, 1), reduction="batchmean").item()


def test_rslad_attack_raises_the_kl_between_teacher_and_student_above_its_clean_value(tmp_path, teacher_path):
    run = built_run(tmp_path, teacher_path, "rslad")
    x, y = batch_with_saturated_pixels()
    with torch.no_grad():
        teacher_clean = run.teacher(x)
    x_adv = craft_adversarial(run, x, y, teacher_clean, torch.Generator().manual_seed(5))
    run.student.eval()
    random_corner = (x + EPS * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(9)).mul(2).sub(1))
    with torch.no_grad():
        clean, adversarial = _kl(teacher_clean, run.student(x)), _kl(teacher_clean, run.student(x_adv))
        random = _kl(teacher_clean, run.student(random_corner.clamp(0, 1)))
    # A no-op attack (x' = the start, x + 0.001·N) would leave the KL where it is; a random corner of the eps-ball
    # barely moves it (an untrained student is smooth); the attack must do far better than that.
    assert adversarial - clean > 5 * abs(random - clean) > 0
    assert (x_adv - x).abs().max() <= EPS + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1


@pytest.mark.parametrize("method", ["sat", "ard", "iad"])
def test_ce_attacks_raise_the_students_cross_entropy(tmp_path, teacher_path, method):
    run = built_run(tmp_path, teacher_path, method)
    x, y = batch_with_saturated_pixels()
    x_adv = craft_adversarial(run, x, y, run.teacher(x) if run.teacher else None, torch.Generator().manual_seed(5))
    probe = copy.deepcopy(run.student).train()  # the attack's BN mode, on a copy: its statistics are not ours
    with torch.no_grad():
        assert F.cross_entropy(probe(x_adv), y) > F.cross_entropy(probe(x), y) + 0.05


# ------------------------------------------------------------------------------------ schedules


def authors_rslad_lrs(epochs: int = 300, lr: float = 0.1) -> list[float]:
    """RSLAD's loop: epochs 1..300, and *after* epoch 215, 260 and 285 the lr is multiplied by 0.1."""
    lrs = []
    for epoch in range(1, epochs + 1):
        lrs.append(lr)
        if epoch in [215, 260, 285]:
            lr *= 0.1
    return lrs


def authors_ard_iad_lrs(epochs: int = 200, lr: float = 0.1, schedule=(100, 150), factor: float = 0.1) -> list[float]:
    """ARD's and IAD's loop: 0-based epochs; ``adjust_learning_rate(optimizer, epoch, lr)`` multiplies its *local*
    ``lr`` (always the initial 0.1) and sets it, so 150 sets 0.01 again."""
    current, lrs = lr, []
    for epoch in range(epochs):
        if epoch in schedule:
            current = lr * factor
        lrs.append(current)
    return lrs


def authors_trades_lrs(epochs: int = 76, lr: float = 0.1) -> list[float]:
    """TRADES' loop: 1-based epochs, lr x0.1 from epoch 75, x0.01 from 90, x0.001 from 100."""
    lrs = []
    for epoch in range(1, epochs + 1):
        lrs.append(lr * (0.1 if epoch >= 75 else 1) * (0.1 if epoch >= 90 else 1) * (0.1 if epoch >= 100 else 1))
    return lrs


@pytest.mark.parametrize(
    "method,authors",
    [("rslad", authors_rslad_lrs()), ("ard", authors_ard_iad_lrs()), ("iad", authors_ard_iad_lrs()),
     ("trades", authors_trades_lrs())],
)
def test_paper_preset_runs_each_methods_schedule_as_its_authors_code_runs_it(method, authors):
    cfg = resolve_config("paper", cli_values={"method": method})
    ours = [step_lr(epoch, cfg.lr, cfg.milestones, cfg.lr_gamma) for epoch in range(1, cfg.epochs + 1)]
    assert ours == pytest.approx(authors, rel=1e-9)
