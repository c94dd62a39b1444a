"""The losses of both stages: cross-entropy for the stage 1 teacher; focal (Lin et al. 2017), batch-hard triplet
(Hermans et al. 2017) and distillation from stage 1's soft labels for the stage 2 student. All are computed in
float32, whatever the autocast precision of the model.

A new stage 2 term is one function here, one entry in stage2_loss's `terms` and STAGE2_TERMS, and one
`--<name>_weight` flag in train_stage2.py: the script's logs, summary.csv and trackers follow the parts.

Each takes optional per-sample weights (1 = use, 0 = leave out, e.g. an image that could not be decoded),
so that leaving samples out needs no boolean indexing, which would make the CPU wait for the device."""

import torch
import torch.nn.functional as F


def weighted_mean(values, weights=None):
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1)


def cross_entropy(logits, targets, weights=None):
    """The stage 1 loss: mean cross-entropy over the samples whose weight is 1."""
    return weighted_mean(F.cross_entropy(logits.float(), targets, reduction="none"), weights)


def focal_loss(logits, targets, gamma=2.0, alpha=None, weights=None):
    """Mean of -alpha_t * (1 - p_t)^gamma * log(p_t) over the batch; gamma=0 without alpha is cross-entropy.
    alpha: optional per-class weights, indexed by the target class (e.g. [spoof, live])."""
    log_pt = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    # 1 - p_t from expm1 keeps its precision for confident samples; the floor keeps the gradient of x^gamma
    # finite at x = 0 for gamma < 1 (its derivative is infinite there, and inf * 0 is NaN)
    one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(torch.float32).tiny)
    loss = -(one_minus_pt**gamma) * log_pt
    if alpha is not None:
        loss = loss * torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)[targets]
    return weighted_mean(loss, weights)


def batch_hard_triplet_loss(embeddings, labels, margin=0.3, weights=None):
    """For each anchor, the farthest same-class and the nearest other-class sample of the batch, on
    L2-normalised embeddings: mean of relu(d(a, p_hardest) - d(a, n_hardest) + margin) over the anchors
    that have both. A batch with no such anchor gives 0 (with a gradient of zeros), never NaN."""
    normalised = F.normalize(embeddings.float(), dim=1)
    # |a - b|^2 = 2 - 2 a.b on the unit sphere; the clamp keeps sqrt's gradient finite at distance 0
    distances = (2 - 2 * normalised @ normalised.T).clamp_min(1e-12).sqrt()
    usable = torch.ones_like(labels, dtype=torch.bool) if weights is None else weights > 0
    pair = usable[:, None] & usable[None, :]
    same_class = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positives = same_class & not_self & pair
    negatives = ~same_class & pair
    # distances lie in [0, 2]: 0 and 4 stand for "no such sample" without infinities in the graph
    hardest_positive = distances.masked_fill(~positives, 0).amax(dim=1)
    hardest_negative = distances.masked_fill(~negatives, 4).amin(dim=1)
    has_both = (positives.any(dim=1) & negatives.any(dim=1)).float()
    return weighted_mean(F.relu(hardest_positive - hardest_negative + margin), has_both)


def distillation_loss(student_logits, teacher_probs, temperature=1.0, weights=None):
    """KL(teacher || student) at temperature T, scaled by T^2, averaged over the batch.

    The teacher is given as probabilities: log(p) are its logits up to a constant, so log_softmax(log(p) / T)
    is exactly its softened distribution. Computed in float64 with a floor far below float32's smallest
    value, so that confident teachers (p_spoof = 1e-20, say) keep their exact softened probabilities."""
    teacher_logits = teacher_probs.double().clamp_min(1e-300).log()
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1).float()
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_sample = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=1)
    return weighted_mean(per_sample, weights) * temperature**2


# the stage 2 terms, in the order the logs show them; each has a --<name>_weight flag in train_stage2.py
STAGE2_TERMS = ("focal", "triplet", "kd")


def stage2_loss(
    logits,
    embeddings,
    labels,
    teacher_probs,
    term_weights,
    *,
    weights=None,
    focal_gamma=2.0,
    focal_alpha=None,
    triplet_margin=0.3,
    kd_temperature=1.0,
):
    """Total = sum of term_weights[name] * term, over the samples whose weight is 1. term_weights: a weight for
    each of STAGE2_TERMS, e.g. {"focal": 1.0, "triplet": 0.5, "kd": 1.0}. Returns the total and each part
    (detached) for logging; a term of weight 0 is still computed and logged."""
    terms = {
        "focal": lambda: focal_loss(logits, labels, gamma=focal_gamma, alpha=focal_alpha, weights=weights),
        "triplet": lambda: batch_hard_triplet_loss(embeddings, labels, margin=triplet_margin, weights=weights),
        "kd": lambda: distillation_loss(logits, teacher_probs, temperature=kd_temperature, weights=weights),
    }
    if set(term_weights) != set(terms):
        raise ValueError(f"term_weights must weigh each of {sorted(terms)}, got {sorted(term_weights)}")
    parts = {name: terms[name]() for name in STAGE2_TERMS}
    total = sum(term_weights[name] * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}
