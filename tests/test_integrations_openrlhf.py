"""iama.integrations.openrlhf.PolicyLoss against OpenRLHF's own PolicyLoss (openrlhf 0.11.2).

Oracle: OpenRLHF's ``openrlhf/models/loss.py`` itself, run in float64 on the same inputs: the loss,
its gradient in ``log_probs`` (autograd through OpenRLHF's arithmetic) and the four metrics, over
both loss types, both aggregations, the dual clip, OpenRLHF's global normalisers and every form of
its train/rollout correction, on masks with empty rows and an odd T. OpenRLHF's package
``__init__`` imports its actor (DeepSpeed, flash-attn, transformers' models), so only its loss
module is loaded (:func:`iama.integrations.openrlhf.openrlhf_loss_module`).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from iama.integrations.openrlhf import PolicyLoss, openrlhf_loss_module

F64 = torch.float64


@pytest.fixture(scope="module")
def openrlhf_loss() -> types.ModuleType:
    try:
        return openrlhf_loss_module()
    except ImportError:
        pytest.skip("openrlhf is not installed")


def _batch(seed: int, S: int = 7, T: int = 13, per_token: bool = True, one_sign: bool = False,
           spread: float = 0.4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (S,), generator=g)
    lengths[2] = 0  # an empty response
    mask = torch.arange(T) < lengths[:, None]
    old = -torch.rand(S, T, generator=g, dtype=F64) * 3 - 0.05
    new = old + spread * torch.randn(S, T, generator=g, dtype=F64)
    rollout = old + 0.3 * torch.randn(S, T, generator=g, dtype=F64)
    # Log-probs stay below 0 (the divergence gates read probabilities).
    new, rollout = new.clamp(max=-1e-3), rollout.clamp(max=-1e-3)
    row = torch.randn(S, 1, generator=g, dtype=F64)
    if per_token:
        adv = row + 0.5 * torch.randn(S, T, generator=g, dtype=F64)
        if one_sign:
            adv = row.sign() * adv.abs()
    else:
        adv = row.expand(S, T).clone()
    return {"log_probs": new, "old_log_probs": old, "advantages": adv, "action_mask": mask,
            "rollout_log_probs": rollout}


def _run(loss_fn, batch: dict[str, torch.Tensor], **kwargs) -> tuple[list, torch.Tensor]:
    logp = batch["log_probs"].clone().requires_grad_()
    out = loss_fn(logp, batch["old_log_probs"], batch["advantages"], action_mask=batch["action_mask"],
                  rollout_log_probs=batch["rollout_log_probs"], **kwargs)
    (grad,) = torch.autograd.grad(out[0], logp)
    return list(out), grad


def _compare(theirs_fn, ours_fn, batch, exact_metrics: bool = True, rtol: float = 1e-12, **kwargs) -> None:
    theirs, grad_theirs = _run(theirs_fn, batch, **kwargs)
    ours, grad_ours = _run(ours_fn, batch, **kwargs)
    torch.testing.assert_close(ours[0], theirs[0], rtol=rtol, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=rtol, atol=1e-14)
    # OpenRLHF takes its shares (clip_ratio, is_filter_ratio) of float32 flags: to float32's rounding.
    share = {"rtol": 3e-7, "atol": 0.0}
    if exact_metrics:
        torch.testing.assert_close(ours[1].to(F64), theirs[1].to(F64), **share)
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-12, atol=1e-14)  # ppo_kl
    if theirs[3] is None:
        assert ours[3] is None and ours[4] is None
    else:
        torch.testing.assert_close(ours[3], theirs[3], rtol=1e-12, atol=1e-14)  # vllm_kl
        torch.testing.assert_close(ours[4].to(F64), theirs[4].to(F64), **share)


# Local counts; global ones as numbers; and as OpenRLHF's actor passes them, 0-dim float32 tensors.
NORMALISERS = [{}, {"dp_size": 2, "batch_num_tokens": 75.0, "global_batch_size": 11.0},
               {"dp_size": 3, "batch_num_tokens": torch.tensor(91.0),
                "global_batch_size": torch.tensor(13.0)}]


@pytest.mark.parametrize("impl", ["cpu", "reference"])
@pytest.mark.parametrize("normalisers", NORMALISERS, ids=["local", "global", "global-tensors"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_ppo_matches_openrlhf(openrlhf_loss, impl, normalisers, dual_clip, token_level_loss) -> None:
    kwargs = {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "dual_clip": dual_clip,
              "token_level_loss": token_level_loss}
    theirs = openrlhf_loss.PolicyLoss(**kwargs)
    ours = PolicyLoss(**kwargs, impl=impl)
    for seed in range(3):
        batch = _batch(seed, spread=1.2)  # ratios far outside the clip range, both signs of A
        _compare(theirs, ours, batch, **normalisers)


CORRECTIONS = [
    ("token", "mask", "ratio", (0.75, 1.3)),
    ("token", "clip", "ratio", (0.8, 1.3)),
    ("seq", "mask", "ratio", (0.9, 1.1)),
    ("token", "mask", "binary_kl", (0.0, 0.01)),
    ("seq", "mask", "binary_kl", (0.0, 0.01)),
    ("token", "mask", "tv", (0.0, 0.05)),
    ("seq", "mask", "tv", (-1.0, 0.05)),
]


@pytest.mark.parametrize("normalisers", NORMALISERS, ids=["local", "global", "global-tensors"])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("correction", CORRECTIONS, ids=lambda c: "-".join(map(str, c[:3])))
def test_ppo_rollout_correction_matches_openrlhf(openrlhf_loss, correction, token_level_loss,
                                                 normalisers) -> None:
    level, mode, gating, threshold = correction
    kwargs = {"dual_clip": 2.5, "token_level_loss": token_level_loss, "is_correction_level": level,
              "is_correction_mode": mode, "is_correction_gating": gating,
              "is_correction_threshold": threshold}
    theirs = openrlhf_loss.PolicyLoss(**kwargs)
    ours = PolicyLoss(**kwargs, impl="cpu")
    for seed in range(2):
        batch = _batch(10 + seed, spread=0.8)
        # Both sides of each gate: the correction's coefficients are neither all 0 nor all kept.
        _, _, _, _, filtered = theirs(batch["log_probs"], batch["old_log_probs"], batch["advantages"],
                                      batch["action_mask"], batch["rollout_log_probs"])
        assert 0 < float(filtered) < 1
        # The metrics are weighted by the correction's coefficients (see the module's note).
        _compare(theirs, ours, batch, exact_metrics=False, **normalisers)


def test_rollout_correction_metrics_are_weighted_by_the_coefficients(openrlhf_loss) -> None:
    batch = _batch(20, spread=0.8)
    ours = PolicyLoss(is_correction_level="token", is_correction_threshold=(0.5, 2.0), impl="cpu")
    out = ours(batch["log_probs"], batch["old_log_probs"], batch["advantages"], batch["action_mask"],
               batch["rollout_log_probs"])
    m = batch["action_mask"].to(F64)
    is_ratio = (batch["old_log_probs"] - batch["rollout_log_probs"]).exp()
    w = torch.where((is_ratio >= 0.5) & (is_ratio <= 2.0), is_ratio, 0.0) * m
    lr = batch["log_probs"] - batch["old_log_probs"]
    ratio, A = lr.exp(), batch["advantages"]
    clipped = ratio.clamp(0.8, 1.2) * A < ratio * A
    torch.testing.assert_close(out[1], (clipped * w).sum() / w.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out[2], -(lr * w).sum() / w.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("normalisers", NORMALISERS, ids=["local", "global", "global-tensors"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("advantages", ["outcome", "per_token_one_sign"])
@pytest.mark.parametrize("correcting", [False, True])
def test_gspo_matches_openrlhf(openrlhf_loss, correcting, advantages, dual_clip, normalisers) -> None:
    kwargs = {"policy_loss_type": "gspo", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4, "dual_clip": dual_clip,
              "token_level_loss": True}  # GSPO aggregates per sequence whatever this says
    if correcting:
        kwargs["is_correction_level"] = "token"
    theirs = openrlhf_loss.PolicyLoss(**kwargs)
    ours = PolicyLoss(**kwargs, impl="cpu")
    assert ours.token_level_loss is False
    for seed in range(3):
        batch = _batch(30 + seed, per_token=advantages != "outcome", one_sign=True, spread=0.002)
        _compare(theirs, ours, batch, **normalisers)  # GSPO has no correction weights: exact metrics


def test_gspo_with_mixed_sign_advantages_differs_as_documented(openrlhf_loss) -> None:
    # OpenRLHF clips each token of a sequence by its own advantage's sign; the kernel is given the
    # sequence's mean advantage. Both agree once every row's advantages share a sign.
    batch = _batch(40, per_token=True, one_sign=False, spread=0.002)
    theirs = openrlhf_loss.PolicyLoss(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4)
    ours = PolicyLoss(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4, impl="cpu")
    assert not torch.allclose(_run(theirs, batch)[1], _run(ours, batch)[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_log_probs_match_openrlhf_in_float64(openrlhf_loss, dtype) -> None:
    batch = _batch(50, S=9, T=37, spread=0.6)
    low = {**batch, **{k: batch[k].to(dtype) for k in ("log_probs", "old_log_probs")}}
    rounded = {**batch, **{k: low[k].to(F64) for k in ("log_probs", "old_log_probs")}}
    kwargs = {"dual_clip": 3.0, "token_level_loss": False}
    ours, grad_ours = _run(PolicyLoss(**kwargs, impl="cpu"), low)
    theirs, grad_theirs = _run(openrlhf_loss.PolicyLoss(**kwargs), rounded)
    # float32 arithmetic on the same rounded inputs: the loss to float32's rounding, the gradient
    # to that of its dtype (it is stored in the log-probs' dtype).
    torch.testing.assert_close(ours[0].to(F64), theirs[0], rtol=1e-5, atol=1e-7)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(grad_ours.to(F64), grad_theirs, rtol=tol, atol=tol * 1e-3)


def test_from_openrlhf_copies_the_settings(openrlhf_loss) -> None:
    theirs = openrlhf_loss.PolicyLoss(clip_eps_low=0.1, clip_eps_high=0.3, dual_clip=4.0,
                                      token_level_loss=False, is_correction_level="seq",
                                      is_correction_gating="tv", is_correction_threshold=[0.0, 0.01])
    ours = PolicyLoss.from_openrlhf(theirs, impl="reference")
    assert (ours.clip_eps_low, ours.clip_eps_high, ours.dual_clip) == (0.1, 0.3, 4.0)
    assert not ours.token_level_loss and ours.is_correction_level == "seq"
    assert (ours.is_correction_gating, ours.is_correction_threshold) == ("tv", (0.0, 0.01))
    _compare(theirs, ours, _batch(60, spread=0.5), exact_metrics=False)
    assert "policy_loss_type='ppo'" in repr(ours)


def test_no_mask_and_an_empty_batch() -> None:
    batch = _batch(70)
    ours = PolicyLoss(impl="cpu")
    full = ours(batch["log_probs"], batch["old_log_probs"], batch["advantages"])
    ones = ours(batch["log_probs"], batch["old_log_probs"], batch["advantages"],
                torch.ones_like(batch["action_mask"]))
    torch.testing.assert_close(full[0], ones[0], rtol=0, atol=0)
    logp = batch["log_probs"].clone().requires_grad_()
    for token_level_loss in (True, False):
        empty = PolicyLoss(token_level_loss=token_level_loss, impl="cpu")(
            logp, batch["old_log_probs"], batch["advantages"], torch.zeros_like(batch["action_mask"]))
        assert float(empty[0].detach()) == 0.0
        (grad,) = torch.autograd.grad(empty[0], logp)
        assert torch.all(grad == 0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="policy_loss_type"):
        PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match=r"dual_clip must be > 1\.0"):
        PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="is_correction_mode='clip' requires"):
        PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError, match="upper bound only"):
        PolicyLoss(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.5, 5.0))
    with pytest.raises(ValueError, match="is_correction_threshold must be two numbers"):
        PolicyLoss(is_correction_threshold=(1.0,))
    with pytest.raises(ValueError, match="impl"):
        PolicyLoss(impl="fast")
    batch = _batch(80)
    loss = PolicyLoss(is_correction_level="token", impl="cpu")
    with pytest.raises(ValueError, match="needs rollout_log_probs"):
        loss(batch["log_probs"], batch["old_log_probs"], batch["advantages"], batch["action_mask"])
    with pytest.raises(ValueError, match="old_log_probs must be"):
        loss(batch["log_probs"], batch["old_log_probs"][:, :-1], batch["advantages"], batch["action_mask"])
    with pytest.raises(TypeError, match=r"log_probs must be a torch\.Tensor"):
        loss(batch["log_probs"].tolist(), batch["old_log_probs"], batch["advantages"])
    with pytest.raises(ValueError, match="batch_num_tokens must be > 0"):
        PolicyLoss(impl="cpu")(batch["log_probs"], batch["old_log_probs"], batch["advantages"],
                               batch["action_mask"], batch_num_tokens=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
def test_triton_backend_matches_openrlhf_in_float32(openrlhf_loss, policy_loss_type) -> None:
    """What ``auto`` runs on CUDA (the interpreter here), float32 inputs: OpenRLHF in float64 on
    the same inputs, to float32's rounding."""
    pytest.importorskip("triton")
    from iama_kernels._triton_backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is not set")
    kwargs = {"policy_loss_type": policy_loss_type, "dual_clip": 3.0, "is_correction_level": "token",
              "is_correction_threshold": (0.75, 1.3)}
    if policy_loss_type == "gspo":
        kwargs.update(clip_eps_low=3e-4, clip_eps_high=4e-4)
    batch = _batch(90, S=5, T=9, per_token=policy_loss_type == "ppo", one_sign=True,
                   spread=0.002 if policy_loss_type == "gspo" else 0.8)
    low = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    ours, grad_ours = _run(PolicyLoss(**kwargs, impl="triton"), low)
    theirs, grad_theirs = _run(openrlhf_loss.PolicyLoss(**kwargs),
                               {k: v.to(F64) if v.is_floating_point() else v for k, v in low.items()})
    torch.testing.assert_close(ours[0].to(F64), theirs[0], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad_ours.to(F64), grad_theirs, rtol=2e-6, atol=1e-8)


def test_loading_openrlhf_leaves_sys_modules_as_it_was(openrlhf_loss) -> None:
    before = {k: sys.modules.get(k) for k in ("openrlhf.models", "openrlhf.models.loss", "deepspeed")}
    module = openrlhf_loss_module()
    assert hasattr(module, "PolicyLoss") and hasattr(module, "aggregate_loss")
    assert {k: sys.modules.get(k) for k in before} == before


def test_the_benchmark_runs(openrlhf_loss, capsys, benchmark_script) -> None:
    """benchmarks/openrlhf_loss.py at a tiny size (it checks the gradients equal OpenRLHF's)."""
    module = benchmark_script("openrlhf_loss")
    assert module.main(["--shapes", "3x5,4x9", "--rounds", "2", "--no-write"]) == 0
    table = capsys.readouterr().out
    assert table.count("openrlhf gspo (fwd+bwd)") == 4  # both rows at both shapes


@pytest.mark.parametrize("correction", [None, ("token", "mask", "ratio", (0.75, 1.3)),
                                        ("seq", "mask", "tv", (0.0, 0.05))],
                         ids=["plain", "token-correction", "seq-correction"])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_ppo_with_a_float_mask_matches_openrlhf(openrlhf_loss, token_level_loss, correction) -> None:
    """OpenRLHF multiplies by the mask's values (a weight per token): so does the kernel."""
    kwargs: dict = {"dual_clip": 3.0, "token_level_loss": token_level_loss}
    if correction is not None:
        level, mode, gating, threshold = correction
        kwargs.update(is_correction_level=level, is_correction_mode=mode, is_correction_gating=gating,
                      is_correction_threshold=threshold)
    batch = _batch(100, spread=0.8)
    g = torch.Generator().manual_seed(101)
    mask = batch["action_mask"]
    batch["action_mask"] = mask * (0.1 + 0.9 * torch.rand(mask.shape, generator=g, dtype=F64))
    # A sequence's total plus OpenRLHF's 1e-8 (which a float64 total keeps): 1e-8 / total, total >= 0.1.
    _compare(openrlhf_loss.PolicyLoss(**kwargs), PolicyLoss(**kwargs, impl="cpu"), batch,
             exact_metrics=correction is None, rtol=1e-12 if token_level_loss else 2e-7)


@pytest.mark.parametrize("kwargs", [{"token_level_loss": True}, {"token_level_loss": False},
                                    {"is_correction_level": "seq", "is_correction_threshold": (0.9, 1.1)},
                                    {"policy_loss_type": "gspo", "clip_eps_low": 3e-4,
                                     "clip_eps_high": 4e-4}],
                         ids=["token", "sequence", "seq-correction", "gspo"])
def test_non_contiguous_inputs_match_openrlhf(openrlhf_loss, kwargs) -> None:
    """Every [bs, T] input a strided view (every other column of a wider batch)."""
    wide = _batch(110, T=26, spread=0.002 if kwargs.get("policy_loss_type") == "gspo" else 0.8,
                  one_sign=True)
    batch = {k: v[:, ::2] for k, v in wide.items()}
    assert not batch["log_probs"].is_contiguous() and not batch["action_mask"].is_contiguous()
    _compare(openrlhf_loss.PolicyLoss(**kwargs), PolicyLoss(**kwargs, impl="cpu"), batch,
             exact_metrics="is_correction_level" not in kwargs)


GPU_CASES = [{"dual_clip": 3.0, "token_level_loss": True}, {"dual_clip": 3.0, "token_level_loss": False},
             {"is_correction_level": "token", "is_correction_threshold": (0.75, 1.3)},
             {"is_correction_level": "seq", "is_correction_gating": "binary_kl",
              "is_correction_threshold": (0.0, 0.01), "token_level_loss": False},
             {"policy_loss_type": "gspo", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4, "dual_clip": 3.0}]


def _float32_against_the_float64_reference(kwargs: dict, device: torch.device, impl: str) -> None:
    """float32 inputs on ``device`` (OpenRLHF's count tensors there too) against the same class in
    float64 on the CPU's reference backend: the loss to float32 rounding, the gradient to 1e-6 of
    its scale, the metrics to 1e-6."""
    gspo = kwargs.get("policy_loss_type") == "gspo"
    batch = _batch(120, S=64, T=301, per_token=not gspo, one_sign=True, spread=0.002 if gspo else 0.8)
    tokens = float(batch["action_mask"].sum()) * 1.5
    normalisers = {"dp_size": 2, "batch_num_tokens": tokens, "global_batch_size": 80.0}
    low = {k: (v.float() if v.is_floating_point() else v).to(device) for k, v in batch.items()}
    on_device = {**normalisers, "batch_num_tokens": torch.tensor(tokens, device=device),
                 "global_batch_size": torch.tensor(80.0, device=device)}
    ours, grad = _run(PolicyLoss(**kwargs, impl=impl), low, **on_device)
    high = {k: v.cpu().double() if v.is_floating_point() else v.cpu() for k, v in low.items()}
    want, want_grad = _run(PolicyLoss(**kwargs, impl="reference"), high, **normalisers)
    torch.testing.assert_close(ours[0].double().cpu(), want[0], rtol=2e-5, atol=1e-7)
    scale = float(want_grad.abs().max())
    torch.testing.assert_close(grad.double().cpu(), want_grad, rtol=1e-4, atol=1e-6 * scale)
    for k in (1, 2, 3, 4):
        if want[k] is None:
            assert ours[k] is None
        else:
            torch.testing.assert_close(ours[k].double().cpu(), want[k].double(), rtol=1e-4, atol=1e-6)


GPU_IDS = ["ppo-token", "ppo-sequence", "token-correction", "seq-correction", "gspo"]


@pytest.mark.parametrize("kwargs", GPU_CASES, ids=GPU_IDS)
def test_float32_on_the_cpu_matches_the_float64_reference(kwargs) -> None:
    _float32_against_the_float64_reference(kwargs, torch.device("cpu"), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", GPU_CASES, ids=GPU_IDS)
def test_on_cuda_matches_the_float64_reference(kwargs) -> None:
    """What OpenRLHF runs: the Triton kernel on a CUDA device (OpenRLHF need not be installed)."""
    _float32_against_the_float64_reference(kwargs, torch.device("cuda"), "auto")


def test_binary_kl_keeps_the_tokens_openrlhf_rounds_below_zero(openrlhf_loss) -> None:
    """float32 log-probs of nearly equal policies: OpenRLHF's binary KL falls below its lower
    bound of 0 for a share of the tokens and drops them; ours holds it at 0 and keeps them (the
    module's note)."""
    batch = _batch(130, S=16, T=64, spread=0.3)
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    batch["rollout_log_probs"] = batch["old_log_probs"] + 1e-4 * torch.randn(
        batch["old_log_probs"].shape, generator=torch.Generator().manual_seed(131))
    kwargs = {"is_correction_level": "token", "is_correction_gating": "binary_kl",
              "is_correction_threshold": (0.0, 0.01)}
    theirs, _ = _run(openrlhf_loss.PolicyLoss(**kwargs), batch)
    ours, _ = _run(PolicyLoss(**kwargs, impl="cpu"), batch)
    assert float(theirs[4]) > 0.1 and float(ours[4]) == 0.0
