"""The stage 2 losses: focal (Lin et al. 2017), batch-hard triplet (Hermans et al. 2017) and distillation
from stage 1's soft labels. All are computed in float32, whatever the autocast precision of the model."""
import torch
import torch.nn.functional as F


def focal_loss(logits, targets, gamma=2.0, alpha=None):
    """Mean of -alpha_t * (1 - p_t)^gamma * log(p_t) over the batch; gamma=0 without alpha is cross-entropy.
    alpha: optional per-class weights, indexed by the target class (e.g. [spoof, live])."""
    log_pt = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    loss = -((1 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)[targets]
    return loss.mean()


def batch_hard_triplet_loss(embeddings, labels, margin=0.3):
    """For each anchor, the farthest same-class and the nearest other-class sample of the batch, on
    L2-normalised embeddings: mean of relu(d(a, p_hardest) - d(a, n_hardest) + margin) over the anchors
    that have both. A batch with no such anchor gives 0 (with a gradient of zeros), never NaN."""
    normalised = F.normalize(embeddings.float(), dim=1)
    # |a - b|^2 = 2 - 2 a.b on the unit sphere; the clamp keeps sqrt's gradient finite at distance 0
    distances = (2 - 2 * normalised @ normalised.T).clamp_min(1e-12).sqrt()
    same_class = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positives, negatives = same_class & not_self, ~same_class
    hardest_positive = distances.masked_fill(~positives, float("-inf")).amax(dim=1)
    hardest_negative = distances.masked_fill(~negatives, float("inf")).amin(dim=1)
    valid = positives.any(dim=1) & negatives.any(dim=1)
    if not valid.any():
        return normalised.sum() * 0
    return F.relu(hardest_positive[valid] - hardest_negative[valid] + margin).mean()


def distillation_loss(student_logits, teacher_probs, temperature=1.0):
    """KL(teacher || student) at temperature T, scaled by T^2, averaged over the batch.

    The teacher is given as probabilities. For two classes p^(1/T), renormalised, equals softmax(logit / T),
    so the soft labels need not store logits."""
    teacher = teacher_probs.float().clamp_min(1e-8) ** (1 / temperature)
    teacher = teacher / teacher.sum(dim=1, keepdim=True)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * temperature ** 2


def stage2_loss(logits, embeddings, labels, teacher_probs, *, focal_weight=1.0, triplet_weight=0.5,
                kd_weight=1.0, focal_gamma=2.0, focal_alpha=None, triplet_margin=0.3, kd_temperature=1.0):
    """Total = focal_weight * focal + triplet_weight * triplet + kd_weight * kd.
    Returns the total and each part (detached) for logging."""
    parts = {
        "focal": focal_loss(logits, labels, focal_gamma, focal_alpha),
        "triplet": batch_hard_triplet_loss(embeddings, labels, triplet_margin),
        "kd": distillation_loss(logits, teacher_probs, kd_temperature),
    }
    total = focal_weight * parts["focal"] + triplet_weight * parts["triplet"] + kd_weight * parts["kd"]
    return total, {name: value.detach() for name, value in parts.items()}
