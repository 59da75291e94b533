"""Tests of rslad_edge.attacks on a tiny CNN trained in a second on synthetic 3x8x8 data (10 close prototypes)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rslad_edge.attacks import (
    ATTACK_PRESETS,
    AttackSpec,
    accuracy,
    adversarial_examples,
    attack_loss,
    autoattack,
    cw_margin_loss,
    evaluate_attack,
    fgsm,
    get_attack,
    parse_eps,
    pgd,
    robust_correct,
    run_white_box,
    square,
)
from rslad_edge.errors import ConfigError

EPS = 8 / 255
TOLERANCE = 1e-6  # float32 rounding of x ± eps
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small CNN at ~98 % clean accuracy whose classes are close enough for an 8/255 attack to matter."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    prototypes = (0.5 + 0.05 * torch.randn(NUM_CLASSES, 3, 8, 8, generator=generator)).clamp(0, 1)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        images = (prototypes[labels] + 0.15 * torch.randn(n, 3, 8, 8, generator=generator)).clamp(0, 1)
        return images, labels

    x_train, y_train = sample(1024)
    x_test, y_test = sample(128)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, NUM_CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        batch = torch.randint(0, x_train.shape[0], (128,), generator=generator)
        loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    assert accuracy(model, x_test, y_test) > 0.9
    return model, x_test, y_test


def clean_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.softmax(model(x), dim=1)


def assert_in_ball_and_range(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= eps + TOLERANCE
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


# eps parsing ------------------------------------------------------------------------------------------------------


def test_parse_eps_accepts_fraction_decimal_and_number() -> None:
    assert parse_eps("8/255") == 8 / 255
    assert parse_eps(" 2 / 255.0 ") == 2 / 255
    assert parse_eps("0.031") == 0.031
    assert parse_eps(0.031) == 0.031
    assert parse_eps(np.float32(0.5)) == 0.5
    assert parse_eps("0") == 0.0


@pytest.mark.parametrize("bad", ["8", 8, "16/1", "-0.1", -1.0, "eight", "8/0", "nan", "8/255/2"])
def test_parse_eps_rejects_values_outside_pixel_units(bad: str | float) -> None:
    with pytest.raises(ConfigError) as error:
        parse_eps(bad)
    assert "8/255" in str(error.value)


def test_parse_eps_names_the_flag_at_fault() -> None:
    with pytest.raises(ConfigError, match="--step-size 2/255"):
        parse_eps("2", name="--step-size")


# PGD --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("random_start", ["uniform", "normal", "none"])
@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
def test_pgd_stays_inside_eps_ball_and_pixel_range(trained, loss: str, random_start: str) -> None:
    model, x, y = trained
    # Push inputs to the borders of [0, 1] so that the clamp is exercised too.
    x = torch.where(x > 0.55, torch.ones_like(x), torch.where(x < 0.45, torch.zeros_like(x), x))
    target_probs = clean_probs(model, x) if loss == "kl" else None
    x_adv = pgd(
        model, x, y, eps=EPS, step_size=2 / 255, steps=5, loss=loss, random_start=random_start,
        target_probs=target_probs, generator=torch.Generator().manual_seed(0),
    )
    assert_in_ball_and_range(x_adv, x, EPS)
    assert (x_adv != x).any()


def test_pgd_leaves_parameter_grads_untouched(trained) -> None:
    model, x, y = trained
    first_layer = model[0]
    marker = torch.full_like(first_layer.weight, 7.0)
    first_layer.weight.grad = marker.clone()  # e.g. gradients accumulated by the training step
    try:
        for loss in ("ce", "cw"):
            pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=3, loss=loss)
        pgd(model, x, None, eps=EPS, step_size=2 / 255, steps=3, loss="kl", target_probs=clean_probs(model, x))
        assert torch.equal(first_layer.weight.grad, marker)
        assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    finally:
        first_layer.weight.grad = None


def test_pgd_lowers_accuracy_more_than_random_noise_of_same_eps(trained) -> None:
    model, x, y = trained
    clean_accuracy = accuracy(model, x, y)
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise_accuracy = accuracy(model, (x + EPS * signs).clamp(0, 1), y)
    x_adv = pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    adversarial_accuracy = accuracy(model, x_adv, y)
    assert noise_accuracy > clean_accuracy - 0.1  # random corners of the ball barely matter
    assert adversarial_accuracy < clean_accuracy - 0.4  # the gradient direction does
    assert adversarial_accuracy < noise_accuracy - 0.4


@pytest.mark.parametrize("random_start", ["uniform", "normal", "none"])
def test_pgd_with_zero_eps_returns_x(trained, random_start: str) -> None:
    model, x, y = trained
    x_adv = pgd(model, x, y, eps=0.0, step_size=2 / 255, steps=3, random_start=random_start)
    assert torch.equal(x_adv, x)


def test_pgd_random_start_is_reproducible_with_a_generator(trained) -> None:
    model, x, y = trained

    def run(seed: int) -> torch.Tensor:
        return pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=2, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_kl_objective_is_flat_at_x_so_the_trades_start_is_needed_and_pgd_climbs_it(trained) -> None:
    """KL(p(x) || p(x')) is at its minimum at x' = x: loss and gradient there are ~0 (float noise only)."""
    model, x, _ = trained
    own_probs = clean_probs(model, x)

    def loss_and_grad_norm(point: torch.Tensor) -> tuple[float, float]:
        point = point.clone().requires_grad_(True)
        loss = attack_loss(model(point), None, "kl", target_probs=own_probs)
        (grad,) = torch.autograd.grad(loss, [point])
        return loss.item(), grad.abs().sum().item()

    loss_at_x, grad_at_x = loss_and_grad_norm(x)
    torch.manual_seed(0)
    loss_at_start, grad_at_start = loss_and_grad_norm((x + 0.001 * torch.randn_like(x)).clamp(0, 1))
    assert loss_at_x < 1e-5
    assert grad_at_start > 100 * grad_at_x  # off x the gradient has a direction, at x it is rounding noise

    x_adv = pgd(
        model, x, None, eps=EPS, step_size=2 / 255, steps=10, loss="kl", random_start="normal",
        target_probs=own_probs, generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        assert attack_loss(model(x_adv), None, "kl", target_probs=own_probs).item() > 1000 * max(loss_at_start, 1e-6)


def test_pgd_rejects_unknown_loss_and_start(trained) -> None:
    model, x, y = trained
    with pytest.raises(ConfigError, match="ce, kl, cw"):
        pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=1, loss="hinge")
    with pytest.raises(ConfigError, match="uniform, normal, none"):
        pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=1, random_start="gaussian")
    with pytest.raises(ConfigError, match="8/255"):
        pgd(model, x, y, eps=8, step_size=2 / 255, steps=1)


# CW loss and FGSM -------------------------------------------------------------------------------------------------


def test_cw_margin_matches_hand_computation_on_fixed_logits() -> None:
    logits = torch.tensor([[2.0, 5.0, 1.0], [3.0, -1.0, 0.5], [1.0, 0.0, 60.0]])
    labels = torch.tensor([1, 0, 0])
    # margins z_y - max_other: 5 - 2 = 3, 3 - 0.5 = 2.5, 1 - 60 = -59 (fooled by more than κ=50: clamped to 0)
    assert cw_margin_loss(logits, labels).item() == pytest.approx(-(3 + 50) - (2.5 + 50) - 0.0)
    assert cw_margin_loss(logits, labels, confidence=0.0).item() == pytest.approx(-3 - 2.5 - 0.0)
    assert cw_margin_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_fgsm_moves_every_unclamped_pixel_by_exactly_eps(trained) -> None:
    model, x, y = trained
    x_adv = fgsm(model, x, y, eps=EPS)
    step = x_adv - x
    unclamped = (x_adv > 0) & (x_adv < 1)
    assert unclamped.float().mean() > 0.9
    assert torch.allclose(step[unclamped].abs(), torch.full_like(step[unclamped], EPS), atol=TOLERANCE)
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


# presets ----------------------------------------------------------------------------------------------------------


def test_presets_follow_the_rslad_evaluation_protocol() -> None:
    sat, trades, cw = get_attack("pgd_sat"), get_attack("PGD-TRADES"), get_attack("cw")
    assert (sat.steps, sat.step_size, sat.loss, sat.random_start) == (20, 2 / 255, "ce", "uniform")
    assert (trades.steps, trades.step_size, trades.loss, trades.random_start) == (20, 0.003, "ce", "uniform")
    assert (cw.steps, cw.step_size, cw.loss, cw.random_start, cw.cw_confidence) == (20, 2 / 255, "cw", "uniform", 50.0)
    assert (get_attack("square").n_queries, get_attack("square").p_init) == (5000, 0.8)
    assert (get_attack("fgsm").kind, get_attack("autoattack").version) == ("fgsm", "standard")


def test_unknown_attack_name_lists_known_names_and_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as error:
        get_attack("pgd_sta")
    message = str(error.value)
    assert "'pgd_sat'" in message
    assert all(name in message for name in ATTACK_PRESETS)


def test_run_white_box_refuses_query_attacks(trained) -> None:
    model, x, y = trained
    with pytest.raises(ConfigError, match="not a white-box attack"):
        run_white_box(get_attack("square"), model, x, y, eps=EPS)


# robust_correct ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["fgsm", "pgd_trades", "cw", AttackSpec("square_20", "square", n_queries=20)])
def test_robust_correct_is_a_subset_of_clean_correct(trained, attack: str | AttackSpec) -> None:
    model, x, y = trained
    clean_correct = model(x).argmax(1) == y
    robust = robust_correct(model, x, y, attack, eps=EPS, batch_size=48, generator=torch.Generator().manual_seed(0))
    assert robust.dtype == torch.bool and robust.shape == (x.shape[0],)
    assert not (robust & ~clean_correct).any()
    assert robust.sum() < clean_correct.sum()


def test_robust_correct_gives_the_same_flags_when_attacking_every_sample(trained) -> None:
    model, x, y = trained
    only_correct = robust_correct(model, x, y, "fgsm", eps=EPS, batch_size=40)
    every_sample = robust_correct(model, x, y, "fgsm", eps=EPS, batch_size=40, only_correct=False)
    assert torch.equal(only_correct, every_sample)
    assert only_correct.float().mean().item() == pytest.approx(accuracy(model, fgsm(model, x, y, eps=EPS), y), abs=0.05)


def test_evaluate_attack_judges_with_the_given_predict_and_keeps_the_given_clean_flags(trained) -> None:
    model, x, y = trained
    clean_correct = model(x).argmax(1) == y
    clean_correct[:4] = False  # the caller's clean flags win: these samples are neither attacked nor robust
    judged: list[int] = []

    def judge_fooled_by_everything(images: torch.Tensor) -> torch.Tensor:
        judged.append(len(images))
        return torch.full((len(images),), -1)  # no label is -1: every attacked sample counts as fooled

    outcome = evaluate_attack(model, x, y, "fgsm", eps=EPS, batch_size=40, clean_correct=clean_correct,
                              predict=judge_fooled_by_everything)
    assert outcome.queries is None
    assert not outcome.robust_correct.any()  # fooled by the judge's verdict, not by the model's own
    assert sum(judged) == int(clean_correct.sum()) and max(judged) == 40  # the clean-correct ones, batch by batch
    with_model_judge = evaluate_attack(model, x, y, "fgsm", eps=EPS, batch_size=40, clean_correct=clean_correct)
    assert torch.equal(with_model_judge.robust_correct, robust_correct(model, x, y, "fgsm", eps=EPS) & clean_correct)


def test_evaluate_attack_reports_progress_in_images_and_square_queries_per_sample(trained) -> None:
    model, x, y = trained
    clean_correct = model(x).argmax(1) == y
    seen: list[tuple[int, int]] = []
    evaluate_attack(model, x, y, "fgsm", eps=EPS, batch_size=50, progress=lambda *done_total: seen.append(done_total))
    attacked = int(clean_correct.sum())
    assert seen == [(0, attacked)] + [(min(start + 50, attacked), attacked) for start in range(0, attacked, 50)]

    calls: list[int] = []

    def logits(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        with torch.no_grad():
            return model(images)

    square_20 = AttackSpec("square_20", "square", n_queries=20)
    outcome = evaluate_attack(logits, x, y, square_20, eps=EPS, batch_size=16, clean_correct=clean_correct)
    assert outcome.queries is not None and outcome.queries.shape == (x.shape[0],)
    assert (outcome.queries[~clean_correct] == 0).all() and (outcome.queries[clean_correct] >= 1).all()
    assert calls[0] == attacked  # every clean-correct sample in one call, whatever the batch size
    assert outcome.robust_correct.sum() < clean_correct.sum()


def test_adversarial_examples_match_the_attack_run_batch_by_batch(trained) -> None:
    model, x, y = trained
    crafted = adversarial_examples(model, x, y, "pgd_trades", eps=EPS, batch_size=50,
                                   generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    expected = torch.cat([run_white_box(get_attack("pgd_trades"), model, x[i : i + 50], y[i : i + 50], eps=EPS,
                                        generator=generator) for i in range(0, x.shape[0], 50)])
    assert torch.equal(crafted, expected)
    assert_in_ball_and_range(crafted, x, EPS)
    with pytest.raises(ConfigError, match="not a white-box attack"):
        adversarial_examples(model, x, y, "square", eps=EPS)


# Square -----------------------------------------------------------------------------------------------------------


class NumpyRunner:
    """Stands in for an ONNX Runtime session: numpy in, numpy out, no autograd anywhere."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        assert isinstance(images, np.ndarray) and images.dtype == np.float32
        self.calls += 1
        with torch.no_grad():
            return self.model(torch.from_numpy(images)).numpy()


def test_square_fools_a_numpy_backed_runner_within_the_eps_ball(trained) -> None:
    model, x, y = trained
    runner = NumpyRunner(model)
    progress_calls: list[tuple[int, int]] = []
    torch.manual_seed(123)
    expected_next_random = torch.rand(3)
    torch.manual_seed(123)

    x_adv, queries = square(
        lambda images: runner.predict(images.numpy()), x, y, eps=EPS, n_queries=100, seed=0,
        progress=lambda done, total: progress_calls.append((done, total)),
    )

    assert torch.equal(torch.rand(3), expected_next_random)  # the official code's reseeding did not leak
    assert_in_ball_and_range(x_adv, x, EPS)
    clean_correct = model(x).argmax(1) == y
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.05
    assert (queries[~clean_correct] == 0).all()  # misclassified samples are not attacked
    assert (queries[clean_correct] >= 1).all() and queries.max() <= 100 + 1
    fooled = (x_adv != x).flatten(1).any(1)
    assert (model(x_adv[fooled]).argmax(1) != y[fooled]).all()  # x_adv differs from x only where it fools
    assert progress_calls[-1] == (100, 100)
    assert runner.calls >= 100


def test_square_is_reproducible_for_a_seed(trained) -> None:
    model, x, y = trained
    first = square(model, x[:32], y[:32], eps=EPS, n_queries=30, seed=3)
    second = square(model, x[:32], y[:32], eps=EPS, n_queries=30, seed=3)
    assert torch.equal(first.x_adv, second.x_adv) and torch.equal(first.queries, second.queries)


@pytest.mark.parametrize(("schedule", "smallest_p"), [("budget", 0.8 / 512), ("paper", 0.8 / 2)])
def test_square_budget_schedule_reaches_the_small_squares_within_the_budget(trained, monkeypatch, schedule,
                                                                           smallest_p) -> None:
    from pyautoattack.square import SquareAttack

    model, x, y = trained
    chosen: list[float] = []
    original = SquareAttack.p_selection
    monkeypatch.setattr(SquareAttack, "p_selection", lambda self, it: chosen.append(original(self, it)) or chosen[-1])

    def never_fooled(images: torch.Tensor) -> torch.Tensor:  # so every image stays in every query
        assert len(images) == len(y)
        return F.one_hot(y, NUM_CLASSES).float() * 9.0

    square(never_fooled, x, y, eps=EPS, n_queries=20, seed=0, schedule=schedule)
    # "paper": the schedule of 10,000 queries, so 20 queries never get past its second step;
    # "budget": the same steps compressed into the 20 queries, down to the smallest square.
    assert len(chosen) == 20 and min(chosen) == pytest.approx(smallest_p)


def test_square_runs_its_tensor_work_on_one_torch_thread_and_restores_the_count(trained) -> None:
    model, x, y = trained
    before = torch.get_num_threads()
    seen: list[int] = []

    def predict(images: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return model(images)

    torch.set_num_threads(2)
    try:
        square(predict, x[:16], y[:16], eps=EPS, n_queries=5, seed=0)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_square_refuses_an_unknown_schedule(trained) -> None:
    model, x, y = trained
    with pytest.raises(ConfigError, match="--square-schedule must be one of budget, paper"):
        square(model, x, y, eps=EPS, schedule="fast")


# autocast ---------------------------------------------------------------------------------------------------------


def test_attacks_under_bf16_autocast_use_float32_loss_and_return_float32_in_ball(trained) -> None:
    model, x, y = trained
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        assert attack_loss(model(x), y, "ce").dtype == torch.float32
        assert attack_loss(model(x), None, "kl", target_probs=clean_probs(model, x)).dtype == torch.float32
        x_pgd = pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=10, generator=torch.Generator().manual_seed(0))
        x_cw = run_white_box(get_attack("cw"), model, x, y, eps=EPS, generator=torch.Generator().manual_seed(0))
        x_fgsm = fgsm(model, x, y, eps=EPS)
    # Also when the logits are bf16 outside autocast (a model cast with .bfloat16(), a bf16 engine's output).
    with torch.no_grad():
        bf16_logits = model(x).bfloat16()
    for loss in ("ce", "kl", "cw"):
        objective = attack_loss(bf16_logits, y, loss, target_probs=clean_probs(model, x).bfloat16())
        assert objective.dtype == torch.float32
    for x_adv in (x_pgd, x_cw, x_fgsm):
        assert_in_ball_and_range(x_adv, x, EPS)
    assert accuracy(model, x_pgd, y) < accuracy(model, x, y) - 0.4


# AutoAttack -------------------------------------------------------------------------------------------------------


def test_autoattack_wrapper_breaks_a_weak_model_in_ball_and_logs_to_file(trained, tmp_path) -> None:
    model, x, y = trained
    log_path = tmp_path / "autoattack.log"
    eps = 0.1  # large enough that APGD-CE breaks every point and the other three attacks are skipped (fast)
    torch.manual_seed(7)
    expected_next_random = torch.rand(2)
    torch.manual_seed(7)
    x_adv = autoattack(model, x[:32], y[:32], eps=eps, batch_size=32, log_path=log_path)
    assert torch.equal(torch.rand(2), expected_next_random)
    assert_in_ball_and_range(x_adv, x[:32], eps)
    assert accuracy(model, x_adv, y[:32]) < 0.1
    assert "apgd-ce" in log_path.read_text()


def test_autoattack_apgd_version_runs_only_apgd_ce_and_apgd_t_with_the_standard_settings(trained, tmp_path) -> None:
    model, x, y = trained
    log_path = tmp_path / "autoattack.log"
    x_adv = autoattack(model, x[:32], y[:32], eps=EPS, version="apgd", batch_size=32, log_path=log_path)
    assert_in_ball_and_range(x_adv, x[:32], EPS)
    log = log_path.read_text()
    assert "using custom version including apgd-ce, apgd-t" in log and "fab" not in log and "square" not in log
    assert accuracy(model, x_adv, y[:32]) < accuracy(model, x[:32], y[:32])


def test_autoattack_without_the_package_says_how_to_install_it(trained, monkeypatch) -> None:
    model, x, y = trained
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes `import pyautoattack` raise ImportError
    with pytest.raises(ConfigError, match="pip install pyautoattack"):
        autoattack(model, x, y, eps=EPS)
    monkeypatch.setitem(sys.modules, "pyautoattack.square", None)
    with pytest.raises(ConfigError, match="pip install pyautoattack"):
        square(model, x, y, eps=EPS, n_queries=10)
