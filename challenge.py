"""The WFAS challenge's rules for an entry: what a network costs per image against the single-model limit, and
which rules a stage's settings break (configs/challenge_stage*.json keep them all).
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

# The WFAS challenge accepts a single model of at most this many GFLOPs per image.
GFLOPS_LIMIT = 5.0


@torch.no_grad()
def compute_budget(net, model_name, img_size):
    """Parameters and multiply-accumulates (MACs) of one image's forward pass, counted by torch's FLOP counter
    (convolutions, matmuls and attention, as timm's published GMACs), against the challenge's limit."""
    training = net.training
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, img_size, img_size, device=next(net.parameters()).device))
    net.train(training)
    gflops = counter.get_total_flops() / 1e9  # the counter counts a multiply-accumulate as 2 FLOPs
    gmacs = gflops / 2
    limit = GFLOPS_LIMIT
    # "FLOPs" in papers and model cards are often MACs: say what holds under each reading
    if gflops <= limit:
        within = "yes"
        verdict = f"within the challenge's single-model limit of {limit:g} GFLOPs"
    elif gmacs <= limit:
        within = "as MACs only"
        verdict = (
            f"within the challenge's {limit:g} GFLOPs limit only if FLOPs are read "
            "as multiply-accumulates (as timm's tables do), over it at 2 FLOPs each"
        )
    else:
        within = "no"
        verdict = f"over the challenge's single-model limit of {limit:g} GFLOPs however FLOPs are counted"
    return {
        "model_name": model_name,
        "img_size": img_size,
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "gmacs": gmacs,
        "gflops": gflops,
        "within_challenge_limit": within,
        "challenge_limit": f"{model_name} at {img_size}x{img_size}: {gmacs:.3g} GMACs = {gflops:.3g} GFLOPs, "
        f"{verdict}.",
    }


def rules_broken(*, pretrained, compute=None, teacher_pretrained=False):
    """The challenge rules a stage's settings break, one phrase each (empty: a valid entry). The rules allow no
    extra data and no model pretrained on it, ImageNet included, and one model of at most GFLOPS_LIMIT: the
    student's compute is given, the teacher's is not (it is not submitted). A student also answers for the
    teacher that made its soft labels (teacher_pretrained)."""
    broken = []
    if pretrained:
        broken.append("the model starts from pretrained weights (--pretrained; --no-pretrained trains from scratch)")
    if teacher_pretrained:
        broken.append("its soft labels come from a pretrained teacher (stage 1 ran with --pretrained)")
    if compute is not None and compute["gflops"] > GFLOPS_LIMIT:
        broken.append(
            f"the student costs {compute['gflops']:.3g} GFLOPs ({compute['gmacs']:.3g} GMACs), over "
            f"the {GFLOPS_LIMIT:g} GFLOPs limit"
        )
    return broken
