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


# ------------------------------------------------------------------------------------------------------------------
# Each loss against a plain reference written here, one sample at a time in float64: values and gradients
# ------------------------------------------------------------------------------------------------------------------

# The losses compute in float32 whatever their input: values and gradients agree with a float64 reference to
# float32's precision (rel 1e-5 and abs 1e-6 leave room for sums over a batch of 12). gradcheck's finite differences
# step by 1e-3: its truncation error (~eps^2) and float32 rounding (~1e-7 / eps) both stay far under atol 1e-3.
CLOSE = {"rel": 1e-5, "abs": 1e-6}
GRADCHECK = {"eps": 1e-3, "atol": 1e-3, "rtol": 1e-2}


def batch(seed, n=12, dims=6):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, 2, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    embeddings = torch.randn(n, dims, generator=generator, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1] * (n // 2))[torch.randperm(n, generator=generator)]
    teacher = torch.softmax(torch.randn(n, 2, generator=generator, dtype=torch.float64) * 3, dim=1)
    weights = torch.ones(n, dtype=torch.float64)
    weights[torch.randperm(n, generator=generator)[:3]] = 0
    return logits, embeddings, labels, teacher, weights


def reference_cross_entropy(logits, labels, weights):
    total = 0
    kept = 0
    for z, label, weight in zip(logits, labels, weights):
        total = total - weight * torch.log(torch.exp(z[label]) / torch.exp(z).sum())
        kept = kept + weight
    return total / max(kept, 1)


def reference_focal(logits, labels, gamma, alpha, weights):
    total = 0
    kept = 0
    for z, label, weight in zip(logits, labels, weights):
        p_t = torch.exp(z[label]) / torch.exp(z).sum()
        term = -((1 - p_t) ** gamma) * torch.log(p_t)
        if alpha is not None:
            term = term * alpha[label]
        total = total + weight * term
        kept = kept + weight
    return total / max(kept, 1)


def reference_triplet(embeddings, labels, margin, weights):
    """For each usable anchor with a positive and a negative: the farthest positive, the nearest negative."""
    unit = [e / torch.sqrt((e * e).sum()) for e in embeddings]
    usable = [i for i in range(len(unit)) if weights[i] > 0]
    terms = []
    for a in usable:
        positives = [torch.sqrt(((unit[a] - unit[p]) ** 2).sum()) for p in usable if p != a and labels[p] == labels[a]]
        negatives = [torch.sqrt(((unit[a] - unit[n]) ** 2).sum()) for n in usable if labels[n] != labels[a]]
        if positives and negatives:
            terms.append(torch.relu(max(positives) - min(negatives) + margin))
    return sum(terms) / max(len(terms), 1)


def reference_distillation(student_logits, teacher_probs, temperature, weights):
    """T^2 * KL(teacher softened || student softened), the teacher softened as softmax(log p / T)."""
    total = 0
    kept = 0
    for z, p, weight in zip(student_logits, teacher_probs, weights):
        q = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
        s = torch.exp(z / temperature) / torch.exp(z / temperature).sum()
        total = total + weight * (q * (torch.log(q) - torch.log(s))).sum()
        kept = kept + weight
    return total / max(kept, 1) * temperature**2


def value_and_gradient(function, leaf):
    value = function()
    (gradient,) = torch.autograd.grad(value, leaf)
    return value.item(), gradient


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_against_the_reference(seed, weighted):
    logits, _, labels, _, weights = batch(seed)
    weights = weights if weighted else torch.ones_like(weights)
    value, gradient = value_and_gradient(lambda: losses.cross_entropy(logits, labels, weights), logits)
    expected, expected_gradient = value_and_gradient(lambda: reference_cross_entropy(logits, labels, weights), logits)
    assert value == pytest.approx(expected, **CLOSE)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-5, atol=1e-6)
    # by hand: (softmax - one-hot) * weight / kept images
    one_hot = F.one_hot(labels, 2).double()
    by_hand = (logits.detach().softmax(1) - one_hot) * weights[:, None] / weights.sum()
    assert torch.allclose(gradient, by_hand, rtol=1e-5, atol=1e-6)
    assert torch.autograd.gradcheck(lambda z: losses.cross_entropy(z, labels, weights), (logits,), **GRADCHECK)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("alpha", [None, (0.25, 0.75), (0.9, 0.3)])
def test_focal_against_the_reference(gamma, alpha):
    logits, _, labels, _, weights = batch(int(gamma * 10))
    value, gradient = value_and_gradient(lambda: focal_loss(logits, labels, gamma, alpha, weights), logits)
    expected, expected_gradient = value_and_gradient(
        lambda: reference_focal(logits, labels, gamma, alpha, weights), logits
    )
    assert value == pytest.approx(expected, **CLOSE)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-5, atol=1e-6)
    assert torch.autograd.gradcheck(lambda z: focal_loss(z, labels, gamma, alpha, weights), (logits,), **GRADCHECK)


@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_against_the_reference(margin, seed):
    _, embeddings, labels, _, weights = batch(seed)
    value, gradient = value_and_gradient(
        lambda: losses.batch_hard_triplet_loss(embeddings, labels, margin, weights), embeddings
    )
    expected, expected_gradient = value_and_gradient(
        lambda: reference_triplet(embeddings, labels, margin, weights), embeddings
    )
    assert value == pytest.approx(expected, **CLOSE)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-6)
    assert expected > 0  # random directions: the hinge is open, so the gradient says something
    assert torch.autograd.gradcheck(
        lambda e: losses.batch_hard_triplet_loss(e, labels, margin, weights), (embeddings,), **GRADCHECK
    )


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_distillation_against_the_reference(temperature):
    logits, _, _, teacher, weights = batch(int(temperature * 10))
    value, gradient = value_and_gradient(lambda: distillation_loss(logits, teacher, temperature, weights), logits)
    expected, expected_gradient = value_and_gradient(
        lambda: reference_distillation(logits, teacher, temperature, weights), logits
    )
    assert value == pytest.approx(expected, **CLOSE)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-5, atol=1e-6)
    # by hand: d/dz of T^2 KL(q || softmax(z / T)) is T (softmax(z / T) - q), averaged over the kept images
    softened_teacher = torch.softmax(teacher.log() / temperature, dim=1)
    by_hand = temperature * (torch.softmax(logits.detach() / temperature, 1) - softened_teacher)
    by_hand = by_hand * weights[:, None] / weights.sum()
    assert torch.allclose(gradient, by_hand, rtol=1e-5, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda z: distillation_loss(z, teacher, temperature, weights), (logits,), **GRADCHECK
    )


def test_stage2_loss_passes_each_setting_to_its_term():
    logits, embeddings, labels, teacher, weights = batch(3)
    term_weights = {"focal": 0.7, "triplet": 1.3, "kd": 0.4}
    total, parts = stage2_loss(
        logits,
        embeddings,
        labels,
        teacher,
        term_weights,
        weights=weights,
        focal_gamma=1.5,
        focal_alpha=(0.4, 0.6),
        triplet_margin=0.8,
        kd_temperature=3.0,
    )
    expected = {
        "focal": reference_focal(logits, labels, 1.5, (0.4, 0.6), weights),
        "triplet": reference_triplet(embeddings, labels, 0.8, weights),
        "kd": reference_distillation(logits, teacher, 3.0, weights),
    }
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value.item(), **CLOSE), name
    assert total.item() == pytest.approx(sum(term_weights[n] * v.item() for n, v in expected.items()), **CLOSE)
    assert not any(part.requires_grad for part in parts.values())  # the parts are for the log


def test_an_anchor_alone_in_its_class_has_no_positive_and_adds_no_term():
    _, embeddings, _, _, _ = batch(5, n=6)
    labels = torch.tensor([0, 1, 1, 1, 1, 1])  # anchor 0 has negatives but no positive
    weights = torch.ones(6, dtype=torch.float64)
    value = losses.batch_hard_triplet_loss(embeddings, labels, 1.5, weights).item()
    assert value == pytest.approx(reference_triplet(embeddings, labels, 1.5, weights).item(), **CLOSE)


def test_a_batch_with_one_usable_sample_weighs_it_whole():
    logits, _, labels, teacher, _ = batch(6, n=4)
    weights = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    expected = reference_cross_entropy(logits, labels, weights).item()
    assert losses.cross_entropy(logits, labels, weights).item() == pytest.approx(expected, **CLOSE)


def test_the_defaults_are_the_recipes_settings():
    """gamma 2 (Lin et al.), margin 0.3 (Hermans et al.), temperature 1: what a caller gets without naming them."""
    logits, embeddings, labels, teacher, _ = batch(7)
    ones = torch.ones(len(labels), dtype=torch.float64)
    _, parts = stage2_loss(logits, embeddings, labels, teacher, WEIGHTS)
    assert parts["focal"].item() == pytest.approx(reference_focal(logits, labels, 2.0, None, ones).item(), **CLOSE)
    assert parts["triplet"].item() == pytest.approx(reference_triplet(embeddings, labels, 0.3, ones).item(), **CLOSE)
    assert parts["kd"].item() == pytest.approx(reference_distillation(logits, teacher, 1.0, ones).item(), **CLOSE)
    assert distillation_loss(logits, teacher).item() == pytest.approx(parts["kd"].item(), **CLOSE)
