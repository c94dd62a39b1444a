import math

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import distillation_loss, focal_loss, stage2_loss

WEIGHTS = {"focal": 1.0, "triplet": 0.5, "kd": 1.0}


def test_focal_with_gamma_0_is_cross_entropy():
    logits, targets = torch.randn(16, 2), torch.randint(0, 2, (16,))
    assert losses.focal_loss(logits, targets, gamma=0) == pytest.approx(F.cross_entropy(logits, targets).item())


def test_focal_by_hand_with_alpha():
    logits, targets = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1])  # p_live = 0.75
    expected = -(0.25**2) * math.log(0.75)
    assert losses.focal_loss(logits, targets, gamma=2).item() == pytest.approx(expected, rel=1e-5)
    assert losses.focal_loss(logits, targets, gamma=2, alpha=[0.3, 0.7]).item() == pytest.approx(
        0.7 * expected, rel=1e-5
    )


def test_focal_down_weights_easy_examples():
    easy, hard = torch.tensor([[0.0, 4.0]]), torch.tensor([[0.0, 0.5]])
    target = torch.tensor([1])
    ratio_focal = losses.focal_loss(easy, target) / losses.focal_loss(hard, target)
    ratio_ce = F.cross_entropy(easy, target) / F.cross_entropy(hard, target)
    assert ratio_focal < ratio_ce


def test_triplet_uses_hardest_positive_and_negative():
    # anchors on the unit circle; class 0 at angles 0 and 90 degrees, class 1 at 45 and 180 degrees
    angles = torch.tensor([0.0, 90.0, 45.0, 180.0]) * math.pi / 180
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1) * 5  # scale must not matter
    labels = torch.tensor([0, 0, 1, 1])

    def chord(degrees):
        return 2 * math.sin(math.radians(degrees) / 2)

    # anchor 0: positive at 90, negatives at 45 and 180 -> hardest negative 45
    # anchor 1: positive at 90 (from 0), negatives 45 and 90 (180 is 90 from 90) -> 45
    # anchor 2: positive at 135, negatives at 45 (both) -> 45
    # anchor 3: positive at 135, negatives at 90 (90) and 180 (0) -> 90
    expected = [
        max(chord(90) - chord(45) + 0.3, 0),
        max(chord(90) - chord(45) + 0.3, 0),
        max(chord(135) - chord(45) + 0.3, 0),
        max(chord(135) - chord(90) + 0.3, 0),
    ]
    loss = losses.batch_hard_triplet_loss(embeddings, labels, margin=0.3)
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-4)


def test_triplet_without_valid_triplets_is_zero_not_nan():
    embeddings = torch.randn(4, 8, requires_grad=True)
    loss = losses.batch_hard_triplet_loss(embeddings, torch.ones(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(embeddings.grad).all()
    one = torch.randn(1, 8, requires_grad=True)
    assert losses.batch_hard_triplet_loss(one, torch.tensor([0])).item() == 0


def test_triplet_gradient_is_finite_with_identical_embeddings():
    embeddings = torch.ones(4, 8, requires_grad=True)
    loss = losses.batch_hard_triplet_loss(embeddings, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.3, abs=1e-4) and torch.isfinite(embeddings.grad).all()


def test_kd_is_zero_when_student_matches_teacher():
    logits = torch.randn(8, 2)
    for temperature in (1.0, 2.0, 4.0):
        kd = losses.distillation_loss(logits, logits.softmax(-1), temperature)
        assert kd.item() == pytest.approx(0, abs=1e-6)


def test_kd_equals_kl_of_tempered_softmaxes_times_t_squared():
    student, teacher_logits, temperature = torch.randn(8, 2), torch.randn(8, 2), 3.0
    teacher_tempered = (teacher_logits / temperature).softmax(-1)
    expected = (teacher_tempered * (teacher_tempered.log() - (student / temperature).log_softmax(-1))).sum(1)
    kd = losses.distillation_loss(student, teacher_logits.softmax(-1), temperature)
    assert kd.item() == pytest.approx(expected.mean().item() * temperature**2, rel=1e-4)


def test_total_is_the_weighted_sum_of_its_parts():
    logits, embeddings = torch.randn(6, 2), torch.randn(6, 16)
    labels, teacher = torch.tensor([0, 1, 0, 1, 0, 1]), torch.rand(6, 2).softmax(-1)
    total, parts = losses.stage2_loss(logits, embeddings, labels, teacher, {"focal": 1.0, "triplet": 0.5, "kd": 2.0})
    assert set(parts) == {"focal", "triplet", "kd"}
    expected = parts["focal"].item() + 0.5 * parts["triplet"].item() + 2.0 * parts["kd"].item()
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert losses.focal_loss(logits, labels).item() == pytest.approx(parts["focal"].item())


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.999, 1.0, 2.0])
def test_focal_gradient_is_finite_for_every_gamma_when_a_sample_is_confidently_right(gamma):
    logits = torch.tensor([[-200.0, 200.0], [3.0, -1.0], [0.0, 0.0]], requires_grad=True)  # p_t = 1 for the first
    loss = focal_loss(logits, torch.tensor([1, 0, 1]), gamma=gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_is_exact_for_confident_teachers_at_any_temperature(temperature):
    teacher = torch.tensor([[1e-20, 1 - 1e-20], [1e-9, 1 - 1e-9], [0.3, 0.7]], dtype=torch.float64)
    # a student with the teacher's own logits (log p) matches it at every temperature: KD is 0
    student_logits = teacher.log().float()
    assert distillation_loss(student_logits, teacher.float(), temperature) == pytest.approx(0, abs=1e-6)
    # and against another student it equals the KL of the exactly softened distributions
    other = torch.tensor([[0.0, 5.0], [1.0, 2.0], [-1.0, 1.0]])
    soft_teacher = torch.softmax(teacher.log() / temperature, dim=1)
    log_student = torch.log_softmax(other.double() / temperature, dim=1)
    expected = (soft_teacher * (soft_teacher.log() - log_student)).sum(1).mean() * temperature**2
    assert distillation_loss(other, teacher.float(), temperature).item() == pytest.approx(expected.item(), rel=1e-4)


class HostSyncDetector(torch.overrides.TorchFunctionMode):
    """Records what would make the CPU wait for the device: reading a tensor's value, or indexing with a
    boolean mask (its result size depends on the values)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in ("__bool__", "item", "tolist", "nonzero", "any_", "__int__", "__float__"):
            self.syncs.append(name)
        if name == "__getitem__" and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],))
        ):
            self.syncs.append("boolean mask")
        return func(*args, **(kwargs or {}))


def test_weighted_out_samples_leave_the_loss_unchanged_without_a_host_sync():
    torch.manual_seed(0)
    logits, embeddings = torch.randn(8, 2), torch.randn(8, 16)
    labels, teacher = torch.tensor([0, 1] * 4), torch.softmax(torch.randn(8, 2), 1)
    weights = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1.0])  # two undecodable images
    with HostSyncDetector() as detector:
        total, parts = stage2_loss(logits, embeddings, labels, teacher, WEIGHTS, weights=weights)
    assert detector.syncs == []
    keep = weights.bool()
    expected, expected_parts = stage2_loss(logits[keep], embeddings[keep], labels[keep], teacher[keep], WEIGHTS)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    for name in parts:
        assert parts[name].item() == pytest.approx(expected_parts[name].item(), rel=1e-5, abs=1e-7)
    # nothing usable in the batch: zero, with a finite (zero) gradient
    logits.requires_grad_(True)
    total, _ = stage2_loss(logits, embeddings, labels, teacher, WEIGHTS, weights=torch.zeros(8))
    total.backward()
    assert total.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_stage1_cross_entropy_weighs_out_samples():
    logits, labels = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1])
    weights = torch.tensor([1, 1, 0, 1, 1, 0.0])
    keep = weights.bool()
    expected = F.cross_entropy(logits[keep], labels[keep]).item()
    assert losses.cross_entropy(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)
    assert losses.cross_entropy(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())


def test_stage2_loss_needs_a_weight_for_every_term():
    logits, embeddings = torch.randn(4, 2), torch.randn(4, 8)
    labels, teacher = torch.tensor([0, 1, 0, 1]), torch.rand(4, 2).softmax(-1)
    with pytest.raises(ValueError, match="each of"):
        losses.stage2_loss(logits, embeddings, labels, teacher, {"focal": 1.0})
