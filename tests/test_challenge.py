"""challenge.py: a network's compute budget against the challenge's limit, and the rules a stage's settings break."""

import pytest
import timm

import challenge


@pytest.mark.parametrize(
    "model_name, params_m, gmacs, within",
    [
        # timm's model cards (huggingface.co/timm/resnet18.a1_in1k, /convnext_tiny.in12k_ft_in1k): params, GMACs at 224
        ("resnet18", 11.7, 1.8, "yes"),
        ("convnext_tiny", 28.6, 4.5, "as MACs only"),
    ],
)
def test_compute_budget_matches_timms_published_figures(model_name, params_m, gmacs, within):
    net = timm.create_model(model_name)  # the 1000-class head, as published
    budget = challenge.compute_budget(net, model_name, 224)
    assert budget["params_m"] == pytest.approx(params_m, rel=0.01)
    assert budget["gmacs"] == pytest.approx(gmacs, rel=0.03)
    assert budget["gflops"] == pytest.approx(2 * budget["gmacs"])
    assert budget["within_challenge_limit"] == within
    assert net.training  # the count leaves the model as it found it


def test_each_broken_rule_is_named():
    broken = challenge.rules_broken(pretrained=True, compute={"gflops": 47.8, "gmacs": 23.9}, teacher_pretrained=True)
    assert len(broken) == 3 and "pretrained weights" in broken[0] and "pretrained teacher" in broken[1]
    assert "47.8 GFLOPs (23.9 GMACs), over the 5 GFLOPs limit" in broken[2]
    assert challenge.rules_broken(pretrained=True) == [broken[0]]  # the teacher is not submitted: its GFLOPs are free
    assert challenge.rules_broken(pretrained=False, compute={"gflops": 5.0, "gmacs": 2.5}) == []  # the limit is in
    assert challenge.rules_broken(pretrained=False, compute={"gflops": 5.01, "gmacs": 2.5})
