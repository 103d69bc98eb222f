"""iama.integrations.verl_loss: the "iama" policy loss against verl 0.9's own "vanilla" loss."""

from __future__ import annotations

import pytest
import torch

from iama.integrations.verl_loss import LOSS_AGG_MODES, VerlPolicyLoss, register_policy_loss

pytestmark = pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning",
                                        "ignore:Ray state API:DeprecationWarning")

# verl's policy losses the benchmark runs
LOSSES = ("vanilla", "gspo", "cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "geo_mean", "kl_cov", "clip_cov",
          "dro", "bypass_mode")
GLOBAL_INFO = {"dp_size": 2, "batch_num_tokens": 300, "global_batch_size": 30, "loss_scale_factor": 64}


@pytest.fixture(scope="module")
def verl_algos():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def _actor_config(**overrides):
    from verl.workers.config import FSDPActorConfig

    kw = dict(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=4,
              clip_ratio_high=0.28, clip_ratio_c=1.6)
    return FSDPActorConfig(**dict(kw, **overrides))


def _batch(bs: int = 12, T: int = 17, seed: int = 0, dtype=torch.float64, per_token: bool = False):
    """verl-like micro-batch: ratios spread widely (both clips and the dual clip act), responses of
    0 to T tokens, one advantage per response broadcast over its mask (verl's outcome estimators)
    or, ``per_token``, one per token (GAE's), and importance weights of rollout correction."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(bs, T, generator=g, dtype=torch.float64) * 0.5 - 2
    old = logp + torch.randn(bs, T, generator=g, dtype=torch.float64) * 0.6
    lengths = torch.randint(0, T + 1, (bs,), generator=g)
    lengths[0] = 0
    mask = torch.arange(T) < lengths[:, None]
    if per_token:
        adv = torch.randn(bs, T, generator=g, dtype=torch.float64) * mask
    else:
        adv = torch.randn(bs, generator=g, dtype=torch.float64)[:, None] * mask
    weights = torch.rand(bs, T, generator=g, dtype=torch.float64) + 0.5
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask, weights.to(dtype)


def _assert_float32_close(loss32, grad32, loss, grad, name: str = "") -> None:
    """A float32 loss and gradient within 64 float32 ulps (of the loss, at least 1, and of the
    largest gradient entry) of the float64 or verl float32 ones."""
    eps = torch.finfo(torch.float32).eps
    assert abs(float(loss32) - float(loss)) <= 64 * eps * max(abs(float(loss)), 1.0), name
    assert float((grad32.double() - grad.double()).abs().max()) <= 64 * eps * float(grad.abs().max()), name


def _run(fn, old, logp, adv, mask, mode, config, weights):
    x = logp.clone().requires_grad_(True)
    loss, metrics = fn(old, x, adv, mask, mode, config, weights)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "rollout-is"])
@pytest.mark.parametrize("per_token", [False, True], ids=["outcome", "gae"])
def test_equals_verl_vanilla(verl_algos, mode: str, info: dict, with_weights: bool, per_token: bool) -> None:
    """float64, reference backend: verl's own loss and gradient to rounding, its metrics to its
    1e-8 masked-mean epsilon (unweighted case)."""
    logp, old, adv, mask, weights = _batch(per_token=per_token)
    config = _actor_config()
    config.global_batch_info.update(info)
    w = weights if with_weights else None
    want_loss, want_grad, want_metrics = _run(verl_algos.compute_policy_loss_vanilla, old, logp, adv, mask,
                                              mode, config, w)
    loss, grad, metrics = _run(VerlPolicyLoss(impl="reference"), old, logp, adv, mask, mode, config, w)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert set(metrics) == set(want_metrics)
    assert want_metrics["actor/pg_clipfrac_lower"] > 0.02 and want_metrics["actor/pg_clipfrac"] > 0.05
    if not with_weights:  # weighted, ours are means weighted by the loss weights (documented)
        for key, value in want_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "rollout-is"])
@pytest.mark.parametrize("per_token", [False, True], ids=["outcome", "gae"])
def test_equals_verl_gspo(verl_algos, mode: str, info: dict, with_weights: bool, per_token: bool) -> None:
    """ratio_level="sequence" against verl's own "gspo" (GSPO-token) in float64: loss and gradient
    to rounding, its metrics (pg_clipfrac_lower 0: no dual clip) in the unweighted case."""
    logp, old, adv, mask, weights = _batch(per_token=per_token)
    logp = logp + torch.linspace(-0.4, 0.4, logp.shape[0], dtype=logp.dtype)[:, None]  # clipped rows
    config = _actor_config()
    config.global_batch_info.update(info)
    w = weights if with_weights else None
    want_loss, want_grad, want_metrics = _run(verl_algos.compute_policy_loss_gspo, old, logp, adv, mask,
                                              mode, config, w)
    loss, grad, metrics = _run(VerlPolicyLoss(impl="reference", ratio_level="sequence"), old, logp, adv,
                               mask, mode, config, w)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert set(metrics) == set(want_metrics)
    assert want_metrics["actor/pg_clipfrac"] > 0.05 and metrics["actor/pg_clipfrac_lower"] == 0.0
    if not with_weights:
        for key, value in want_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
    # the CPU kernel in float32 against verl in float64
    loss32, grad32, _ = _run(VerlPolicyLoss(impl="cpu", ratio_level="sequence"), old.float(), logp.float(),
                             adv.float(), mask.long(), mode, config, None if w is None else w.float())
    _assert_float32_close(loss32, grad32, loss, grad)


@pytest.mark.parametrize("surrogate", ["cispo", "sapo", "gpg"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "rollout-is"])
@pytest.mark.parametrize("per_token", [False, True], ids=["outcome", "gae"])
def test_equals_verl_cispo_sapo_and_gpg(verl_algos, surrogate: str, mode: str, info: dict, with_weights: bool,
                                    per_token: bool) -> None:
    """surrogate="cispo"/"sapo"/"gpg" against verl's own "cispo", "sapo" and "gpg" in float64 (SAPO
    with temperatures off verl's defaults; verl aggregates it seq-mean-token-mean whatever the
    mode; GPG has no ratio and no metrics): loss and gradient to rounding, metrics in the
    unweighted case; and the CPU kernel in float32."""
    logp, old, adv, mask, weights = _batch(per_token=per_token)
    config = _actor_config(tau_pos=1.5, tau_neg=0.7)
    config.global_batch_info.update(info)
    w = weights if with_weights else None
    verl_fn = getattr(verl_algos, f"compute_policy_loss_{surrogate}")
    want_loss, want_grad, want_metrics = _run(verl_fn, old, logp, adv, mask, mode, config, w)
    ours = VerlPolicyLoss(impl="reference", surrogate=surrogate)
    loss, grad, metrics = _run(ours, old, logp, adv, mask, mode, config, w)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert set(metrics) == set(want_metrics)
    assert metrics.get("actor/pg_clipfrac_lower", 0.0) == 0.0
    if surrogate == "cispo":
        assert want_metrics["actor/pg_clipfrac"] > 0.05
    if not with_weights:
        for key, value in want_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
    loss32, grad32, _ = _run(VerlPolicyLoss(impl="cpu", surrogate=surrogate), old.float(), logp.float(),
                             adv.float(), mask.long(), mode, config, None if w is None else w.float())
    _assert_float32_close(loss32, grad32, loss, grad)


@pytest.mark.parametrize("surrogate", ["dppo_tv", "dppo_kl"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "rollout-is"])
@pytest.mark.parametrize("per_token", [False, True], ids=["outcome", "gae"])
def test_equals_verl_dppo(verl_algos, surrogate: str, mode: str, info: dict, with_weights: bool,
                          per_token: bool) -> None:
    """surrogate="dppo_tv"/"dppo_kl" against verl's own "dppo_tv" and "dppo_kl" in float64, on
    log-probs near 0 (token probabilities up to 0.9, so that both sides of the trust region bind)
    and a weight cap of 1.6 that truncates: loss and gradient to rounding, the metrics in the
    unweighted case; and the CPU kernel in float32."""
    logp, old, adv, mask, weights = _batch(per_token=per_token, seed=5)
    near = (logp * 0.25 + 0.4).clamp(max=-0.02)  # log-probs about -0.1 (p about 0.9)
    logp, old = near, (near + 0.8 * (old - logp)).clamp(max=-0.02)
    config = _actor_config()
    config.global_batch_info.update(info)
    w = weights if with_weights else None
    verl_fn = getattr(verl_algos, f"compute_policy_loss_{surrogate}")
    want_loss, want_grad, want_metrics = _run(verl_fn, old, logp, adv, mask, mode, config, w)
    loss, grad, metrics = _run(VerlPolicyLoss(impl="reference", surrogate=surrogate), old, logp, adv, mask,
                               mode, config, w)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert set(metrics) == set(want_metrics)
    assert want_metrics["actor/pg_clipfrac"] > 0.05 and want_metrics["actor/pg_clipfrac_lower"] > 0.02
    if not with_weights:
        for key, value in want_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
    for impl in ("cpu", "reference"):  # float32 (the C++ templated row; the reference's rounding)
        loss32, grad32, _ = _run(VerlPolicyLoss(impl=impl, surrogate=surrogate), old.float(), logp.float(),
                                 adv.float(), mask.long(), mode, config, None if w is None else w.float())
        _assert_float32_close(loss32, grad32, loss, grad, impl)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("info", [{}, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "rollout-is"])
@pytest.mark.parametrize("per_token", [False, True], ids=["outcome", "gae"])
@pytest.mark.parametrize("low", [0.4, 1.5])
def test_equals_verl_geo_mean(verl_algos, mode: str, info: dict, with_weights: bool, per_token: bool,
                              low: float) -> None:
    """surrogate="gmpo" against verl's own "geo_mean" (GMPO) in float64: loss and gradient to
    verl's 1e-8 in its means (whatever the mode and the global counts: verl's is the local mean),
    ppo_kl exactly, the clip fractions at most verl's (theirs count every token outside the range
    by the sign of its advantage); and the CPU kernel in float32."""
    logp, old, adv, mask, weights = _batch(per_token=per_token, seed=7)
    config = _actor_config(clip_ratio_low=low, clip_ratio_high=0.4)
    config.global_batch_info.update(info)
    w = weights if with_weights else None
    want_loss, want_grad, want_metrics = _run(verl_algos.compute_policy_loss_geo_mean, old, logp, adv, mask,
                                              mode, config, w)
    loss, grad, metrics = _run(VerlPolicyLoss(impl="reference", surrogate="gmpo"), old, logp, adv, mask,
                               mode, config, w)
    torch.testing.assert_close(loss, want_loss, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-7, atol=1e-12)
    assert float(grad.abs().max()) > 1e-3
    assert set(metrics) == set(want_metrics)
    assert metrics["actor/ppo_kl"] == pytest.approx(want_metrics["actor/ppo_kl"], rel=1e-7, abs=1e-12)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
        assert 0.0 <= metrics[key] <= want_metrics[key] + 1e-12, key
    assert metrics["actor/pg_clipfrac"] > 0.05
    assert (metrics["actor/pg_clipfrac_lower"] > 0.02) == (low < 1)  # log-ratios below -1.5 are rare
    for impl in ("cpu", "reference"):
        loss32, grad32, _ = _run(VerlPolicyLoss(impl=impl, surrogate="gmpo"), old.float(), logp.float(),
                                 adv.float(), mask.long(), mode, config, None if w is None else w.float())
        _assert_float32_close(loss32, grad32, loss, grad, impl)


def _policy_config(info: dict, **policy):
    """verl's actor config with these ``policy_loss`` options and ``global_batch_info``."""
    from verl.workers.config import PolicyLossConfig

    config = _actor_config(policy_loss=PolicyLossConfig(**policy))
    config.global_batch_info.update(info)
    return config


def _kl_cov_config(ratio: float, coef: float, info: dict):
    return _policy_config(info, loss_mode="kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=coef)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "rollout-is"])
@pytest.mark.parametrize("per_token", [False, True], ids=["outcome", "gae"])
def test_equals_verl_kl_cov(verl_algos, mode: str, info: dict, with_weights: bool, per_token: bool) -> None:
    """surrogate="kl_cov" against verl's own "kl_cov" in float64 (5 % of the tokens penalised, so
    that the selection matters): loss and gradient to rounding, ppo_kl to verl's 1e-8; and the CPU
    kernel in float32 (its selection on the same float32 values as verl's)."""
    logp, old, adv, mask, weights = _batch(per_token=per_token, seed=9)
    config = _kl_cov_config(0.05, 0.5, info)
    w = weights if with_weights else None
    want_loss, want_grad, want_metrics = _run(verl_algos.compute_policy_loss_kl_cov, old, logp, adv, mask,
                                              mode, config, w)
    loss, grad, metrics = _run(VerlPolicyLoss(impl="reference", surrogate="kl_cov"), old, logp, adv, mask,
                               mode, config, w)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert set(metrics) == set(want_metrics) == {"actor/ppo_kl"}
    assert metrics["actor/ppo_kl"] == pytest.approx(want_metrics["actor/ppo_kl"], rel=1e-7)
    # the penalty acts: without it the loss is verl's ratio term alone
    plain, _, _ = _run(VerlPolicyLoss(impl="reference", surrogate="kl_cov"), old, logp, adv, mask, mode,
                       _kl_cov_config(0.05, 0.0, info), w)
    assert abs(float(plain - loss)) > 1e-4
    w32 = None if w is None else w.float()
    want32, want_grad32, _ = _run(verl_algos.compute_policy_loss_kl_cov, old.float(), logp.float(),
                                  adv.float(), mask, mode, config, w32)
    for impl in ("cpu", "reference"):
        loss32, grad32, _ = _run(VerlPolicyLoss(impl=impl, surrogate="kl_cov"), old.float(), logp.float(),
                                 adv.float(), mask, mode, config, w32)
        _assert_float32_close(loss32, grad32, want32, want_grad32, impl)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "rollout-is"])
@pytest.mark.parametrize("per_token", [False, True], ids=["outcome", "gae"])
def test_equals_verl_clip_cov(verl_algos, mode: str, info: dict, with_weights: bool, per_token: bool) -> None:
    """surrogate="clip_cov" against verl's own "clip_cov" in float64, each from the same seed (its
    random draw of the tokens taken out: 10 % of them, among those with a centred product in
    (0.05, 5)): loss and gradient to rounding, its metrics in the unweighted case; the draw
    matters (another seed, another loss); and the CPU kernel in float32."""
    from verl.workers.config import PolicyLossConfig

    logp, old, adv, mask, weights = _batch(per_token=per_token, seed=11)
    policy = PolicyLossConfig(loss_mode="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.05, clip_cov_ub=5.0)
    config = _actor_config(policy_loss=policy)
    config.global_batch_info.update(info)
    w = weights if with_weights else None

    def seeded(fn, seed=0, dtype=torch.float64):
        torch.manual_seed(seed)
        cast = (lambda t: t) if dtype == torch.float64 else (lambda t: t.float())
        return _run(fn, cast(old), cast(logp), cast(adv), mask, mode, config, None if w is None else cast(w))

    want_loss, want_grad, want_metrics = seeded(verl_algos.compute_policy_loss_clip_cov)
    loss, grad, metrics = seeded(VerlPolicyLoss(impl="reference", surrogate="clip_cov"))
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert set(metrics) == set(want_metrics)
    assert want_metrics["actor/pg_clipfrac"] > 0.02  # tokens were taken out
    if not with_weights:
        for key, value in want_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
    other, _, _ = seeded(VerlPolicyLoss(impl="reference", surrogate="clip_cov"), seed=1)
    assert abs(float(other - loss)) > 1e-6
    want32, want_grad32, _ = seeded(verl_algos.compute_policy_loss_clip_cov, dtype=torch.float32)
    for impl in ("cpu", "reference"):
        loss32, grad32, _ = seeded(VerlPolicyLoss(impl=impl, surrogate="clip_cov"), dtype=torch.float32)
        _assert_float32_close(loss32, grad32, want32, want_grad32, impl)


@pytest.mark.parametrize("loss_mode", ["kl_cov", "clip_cov"])
@pytest.mark.parametrize("selection", ["cpu", "device"])
def test_cov_selections_on_every_path_equal_verl(verl_algos, monkeypatch: pytest.MonkeyPatch, loss_mode: str,
                                                 selection: str) -> None:
    """The selections of "kl_cov" and "clip_cov" by the C++ ops in float64 (impl="cpu"), and by
    verl's arithmetic in PyTorch (the path for tensors off the CPU, forced here): verl's loss and
    gradient to rounding."""
    from iama.integrations import verl_loss

    if selection == "device":
        monkeypatch.setattr(verl_loss, "_selection_impl", lambda impl, log_prob: None)
    logp, old, adv, mask, _ = _batch(per_token=True, seed=13)
    if loss_mode == "kl_cov":
        config = _kl_cov_config(0.05, 0.5, {})
    else:
        config = _policy_config({}, loss_mode="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.05,
                                clip_cov_ub=5.0)
    verl_fn = getattr(verl_algos, f"compute_policy_loss_{loss_mode}")
    torch.manual_seed(0)
    want_loss, want_grad, _ = _run(verl_fn, old, logp, adv, mask, "token-mean", config, None)
    torch.manual_seed(0)
    loss, grad, _ = _run(VerlPolicyLoss(impl="cpu", surrogate=loss_mode), old, logp, adv, mask, "token-mean",
                         config, None)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)


@pytest.mark.interpreter
@pytest.mark.parametrize("loss_mode", ["kl_cov", "clip_cov"])
def test_cov_selections_by_triton_equal_verl_in_float32(verl_algos, monkeypatch: pytest.MonkeyPatch,
                                                         loss_mode: str) -> None:
    """The selections by the Triton ops (what ``auto`` runs on CUDA; the interpreter here) in
    float32: verl's own float32 loss and gradient to float32 rounding (the same tokens)."""
    pytest.importorskip("triton")
    from iama.integrations import verl_loss
    from iama_kernels._triton_backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is not set")
    monkeypatch.setattr(verl_loss, "_selection_impl", lambda impl, log_prob: "triton")
    logp, old, adv, mask, _ = (t.float() for t in _batch(per_token=True, seed=13))
    mask = mask.bool()
    if loss_mode == "kl_cov":
        config = _kl_cov_config(0.05, 0.5, {})
    else:
        config = _policy_config({}, loss_mode="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.05,
                                clip_cov_ub=5.0)
    torch.manual_seed(0)
    want_loss, want_grad, _ = _run(getattr(verl_algos, f"compute_policy_loss_{loss_mode}"), old, logp, adv,
                                   mask, "token-mean", config, None)
    torch.manual_seed(0)
    loss, grad, _ = _run(VerlPolicyLoss(impl="reference", surrogate=loss_mode), old, logp, adv, mask,
                         "token-mean", config, None)
    _assert_float32_close(loss, grad, want_loss, want_grad, loss_mode)
    torch.manual_seed(1)  # another draw of Clip-Cov's tokens (KL-Cov: the same tokens)
    other, _, _ = _run(VerlPolicyLoss(impl="reference", surrogate=loss_mode), old, logp, adv, mask,
                       "token-mean", config, None)
    assert (abs(float(other - loss)) > 1e-6) == (loss_mode == "clip_cov")


def test_selection_impl_follows_the_kernels_impl() -> None:
    from iama.integrations.verl_loss import _selection_impl

    x = torch.zeros(2, 3)
    assert _selection_impl("auto", x) == "auto" and _selection_impl("reference", x) == "reference"
    assert _selection_impl("triton", x) == "triton"
    assert _selection_impl("auto", x.to("meta")) is None  # verl's arithmetic off CPU and CUDA


def _bypass_config(loss_type: str, rollout_is, rollout_rs, info: dict):
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    thresholds = {None: None, "token_k1": "0.7_1.4", "seq_mean_k3": 0.3, "token_k2,seq_max_k2": "0.5,1.0"}
    correction = RolloutCorrectionConfig(rollout_is=rollout_is, rollout_is_threshold=1.5,
                                         rollout_rs=rollout_rs, rollout_rs_threshold=thresholds[rollout_rs],
                                         loss_type=loss_type)
    return _policy_config(info, loss_mode="bypass_mode", rollout_correction=correction)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
@pytest.mark.parametrize("rollout_is", [None, "token", "sequence"])
@pytest.mark.parametrize("rollout_rs", [None, "token_k1", "seq_mean_k3", "token_k2,seq_max_k2"])
def test_equals_verl_bypass_mode(verl_algos, mode: str, info: dict, loss_type: str, rollout_is,
                                 rollout_rs) -> None:
    """"bypass" against verl's own "bypass_mode" in float64 (verl's rollout correction: truncated
    IS weights at token or sequence level, rejection by token or sequence divergences; then PPO's
    clip or REINFORCE): loss and gradient to rounding, every metric (verl's rollout_corr/ ones
    included) to verl's float32 fractions; the correction acts; and the CPU kernel in float32."""
    logp, old, adv, mask, _ = _batch(per_token=True, seed=17)
    config = _bypass_config(loss_type, rollout_is, rollout_rs, info)
    verl_fn = verl_algos.compute_policy_loss_bypass_mode
    want_loss, want_grad, want_metrics = _run(verl_fn, old, logp, adv, mask, mode, config, None)
    ours = VerlPolicyLoss(impl="reference", surrogate="bypass")
    loss, grad, metrics = _run(ours, old, logp, adv, mask, mode, config, None)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert set(metrics) == set(want_metrics) and any(k.startswith("rollout_corr/") for k in metrics)
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
    # the rollout correction acts: the plain loss of the same kind differs
    plain_fn = (verl_algos.compute_policy_loss_vanilla if loss_type == "ppo_clip"
                else verl_algos.compute_policy_loss_gpg)
    plain, _, _ = _run(plain_fn, old, logp, adv, mask, mode, _policy_config(info), None)
    if rollout_rs is not None or (loss_type == "reinforce" and rollout_is is not None):
        assert abs(float(plain - loss)) > 1e-6
    want32, want_grad32, _ = _run(verl_fn, old.float(), logp.float(), adv.float(), mask, mode, config, None)
    loss32, grad32, _ = _run(VerlPolicyLoss(impl="cpu", surrogate="bypass"), old.float(), logp.float(),
                             adv.float(), mask, mode, config, None)
    _assert_float32_close(loss32, grad32, want32, want_grad32)


def test_bypass_mode_needs_its_config(verl_algos) -> None:
    logp, old, adv, mask, _ = _batch(seed=2)
    ours = VerlPolicyLoss(surrogate="bypass")
    with pytest.raises(ValueError, match=r"rollout_correction\.loss_type must be one of"):
        _run(ours, old, logp, adv, mask, "token-mean", _bypass_config("ppo", None, None, {}), None)
    with pytest.raises(ValueError, match=r"policy_loss\.rollout_correction is required"):
        _run(ours, old, logp, adv, mask, "token-mean", {"policy_loss": {"rollout_correction": None}}, None)
    with pytest.raises(ValueError, match="token-level ratios"):
        VerlPolicyLoss(ratio_level="sequence", surrogate="bypass")


def _dro_config(beta, info: dict):
    return _policy_config(info, loss_mode="dro", dro_beta=beta)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "rollout-is"])
@pytest.mark.parametrize("per_token", [False, True], ids=["outcome", "gae"])
def test_equals_verl_dro(verl_algos, mode: str, info: dict, with_weights: bool, per_token: bool) -> None:
    """surrogate="dro" (the kernel's k2 KL term to old_log_prob) against verl's own "dro" in float64:
    loss and gradient to rounding, ppo_kl in the unweighted case; the penalty acts (another
    dro_beta, another loss); and the CPU kernel in float32."""
    logp, old, adv, mask, weights = _batch(per_token=per_token, seed=11)
    config = _dro_config(0.7, info)
    w = weights if with_weights else None
    want_loss, want_grad, want_metrics = _run(verl_algos.compute_policy_loss_dro, old, logp, adv, mask, mode,
                                              config, w)
    loss, grad, metrics = _run(VerlPolicyLoss(impl="reference", surrogate="dro"), old, logp, adv, mask, mode,
                               config, w)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)
    assert set(metrics) == set(want_metrics) == {"actor/ppo_kl"}
    if not with_weights:
        assert metrics["actor/ppo_kl"] == pytest.approx(want_metrics["actor/ppo_kl"], rel=1e-12)
    other, _, _ = _run(VerlPolicyLoss(impl="reference", surrogate="dro"), old, logp, adv, mask, mode,
                       _dro_config(0.1, info), w)
    assert abs(float(other - loss)) > 1e-3
    for impl in ("cpu", "reference"):
        loss32, grad32, _ = _run(VerlPolicyLoss(impl=impl, surrogate="dro"), old.float(), logp.float(),
                                 adv.float(), mask.long(), mode, config, None if w is None else w.float())
        _assert_float32_close(loss32, grad32, loss, grad, impl)


@pytest.mark.parametrize("beta", [None, 0.0, -1.0])
def test_dro_beta_must_be_positive(verl_algos, beta) -> None:
    logp, old, adv, mask, _ = _batch(bs=3, T=5)
    with pytest.raises(ValueError, match=r"policy_loss\.dro_beta must be a positive value"):
        VerlPolicyLoss(surrogate="dro")(old, logp, adv, mask, "token-mean", _dro_config(beta, {}))


def test_clip_cov_ratio_must_be_positive(verl_algos) -> None:
    from verl.workers.config import PolicyLossConfig

    logp, old, adv, mask, _ = _batch()
    config = _actor_config(policy_loss=PolicyLossConfig(loss_mode="clip_cov", clip_cov_ratio=0.0))
    with pytest.raises(ValueError, match=r"policy_loss\.clip_cov_ratio must be > 0"):
        VerlPolicyLoss(impl="reference", surrogate="clip_cov")(old, logp, adv, mask, "token-mean", config)


def test_kl_cov_ratio_must_be_positive(verl_algos) -> None:
    logp, old, adv, mask, _ = _batch()
    config = _kl_cov_config(-0.1, 0.5, {})
    with pytest.raises(ValueError, match=r"policy_loss\.kl_cov_ratio must be > 0"):
        VerlPolicyLoss(impl="reference", surrogate="kl_cov")(old, logp, adv, mask, "token-mean", config)


@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
def test_cispo_and_sapo_take_what_verl_takes(verl_algos, surrogate: str) -> None:
    """clip_ratio_low > 1 (no lower bound on CISPO's weight) and a clip_ratio_c that only verl's
    "vanilla" would refuse; and SAPO's saturated gate (a log-ratio past float32's exp range, a
    large temperature) has a finite gradient, as verl's clamped one."""
    logp, old, adv, mask, _ = _batch(seed=3)
    config = _actor_config(clip_ratio_low=10.0, clip_ratio_high=4.0, tau_neg=100.0, clip_ratio_c=1.0)
    logp, old = logp.float(), old.float()
    old[2, :3] = logp[2, :3] - 95.0  # ratio e**95: inf in float32
    old[3, :3] = logp[3, :3] + 5.0  # ratio e**-5 with tau 100: the gate's exp overflows
    want_loss, want_grad, _ = _run(getattr(verl_algos, f"compute_policy_loss_{surrogate}"), old, logp,
                                   adv.float(), mask, "token-mean", config, None)
    for impl in ("reference", "cpu"):
        loss, grad, _ = _run(VerlPolicyLoss(impl=impl, surrogate=surrogate), old, logp, adv.float(), mask,
                             "token-mean", config, None)
        assert torch.isfinite(grad).all() and torch.isfinite(loss)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
        if surrogate == "cispo":  # SAPO's loss value sees the unclamped ratio (documented)
            torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)


TENSOR_INFO = {"dp_size": 2, "batch_num_tokens": torch.tensor(700), "global_batch_size": torch.tensor(40)}


@pytest.mark.parametrize("impl", ["cpu", "reference"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("info", [{}, TENSOR_INFO], ids=["local", "global-tensors"])
def test_float32_backends_match_verl(verl_algos, impl: str, mode: str, info: dict) -> None:
    """float32 inputs (verl's usual log-probs), an int64 mask, verl's counts as plain numbers or as
    tensors: every backend against verl computed in float64."""
    logp, old, adv, mask, _ = _batch(bs=16, T=70, seed=1)
    config = _actor_config(clip_ratio_c=2.0)
    config.global_batch_info.update(info)
    want_loss, want_grad, _ = _run(verl_algos.compute_policy_loss_vanilla, old, logp, adv, mask, mode,
                                   config, None)
    loss, grad, _ = _run(VerlPolicyLoss(impl=impl), old.float(), logp.float(), adv.float(), mask.long(),
                         mode, config, None)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    scale = float(want_grad.abs().max())
    assert abs(float(loss) - float(want_loss)) <= 64 * eps * max(abs(float(want_loss)), 1.0)
    assert float((grad.double() - want_grad).abs().max()) <= 16 * eps * scale


def test_padding_under_the_mask_is_not_read() -> None:
    """Advantages and log-probs past a response's end may hold anything (here NaN)."""
    logp, old, adv, mask, _ = _batch(per_token=True)
    cfg = {"clip_ratio": 0.2}
    want, _ = VerlPolicyLoss(impl="reference")(old, logp, adv, mask, "token-mean", cfg)
    nan = torch.tensor(float("nan"), dtype=logp.dtype)
    got, _ = VerlPolicyLoss()(torch.where(mask, old, nan), torch.where(mask, logp, nan),
                              torch.where(mask, adv, nan), mask, "token-mean", cfg)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_bad_arguments_name_themselves() -> None:
    logp, old, adv, mask, _ = _batch()
    fn = VerlPolicyLoss()
    cfg = {"clip_ratio": 0.2}
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        fn(old, logp, adv, mask, "mean", cfg)
    with pytest.raises(ValueError, match=r"config \(verl's actor config, .*\) is required"):
        fn(old, logp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match=r"clip_ratio_c \(the dual clip\) must be > 1"):
        fn(old, logp, adv, mask, "token-mean", {"clip_ratio": 0.2, "clip_ratio_c": 1.0})
    with pytest.raises(ValueError, match=r"advantages must be \[bs, T\]"):
        fn(old, logp, adv[:, :3], mask, "token-mean", cfg)
    bad = adv.clone()
    bad[1, 0] = float("inf")
    assert bool(mask[1, 0])
    with pytest.raises(ValueError, match=r"finite, got inf at \(sequence, token\) \(1, 0\)"):
        fn(old, logp, bad, mask, "token-mean", cfg)
    with pytest.raises(TypeError, match=r"response_mask must be a torch\.Tensor"):
        fn(old, logp, adv, mask.tolist(), "token-mean", cfg)
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        fn(old, logp, adv, mask, "token-mean", dict(cfg, global_batch_info={"dp_size": 2}))
    with pytest.raises(ValueError, match="global_batch_size is required"):
        fn(old, logp, adv, mask, "seq-mean-token-sum", dict(cfg, global_batch_info={"dp_size": 2}))
    with pytest.raises(ValueError, match="impl must be one of"):
        VerlPolicyLoss(impl="gpu")


def test_empty_batch_gives_zero(verl_algos) -> None:
    logp, old, adv, mask, _ = _batch(bs=3, T=5)
    mask = torch.zeros_like(mask)
    x = logp.clone().requires_grad_(True)
    loss, metrics = VerlPolicyLoss()(old, x, adv * 0, mask, "token-mean", _actor_config())
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    assert metrics["actor/pg_clipfrac"] == 0.0


def test_import_verl_registers_the_policy_loss(verl_algos) -> None:
    fn = verl_algos.get_policy_loss_fn("iama")
    assert isinstance(fn, VerlPolicyLoss) and fn.impl == "auto"
    assert register_policy_loss() is fn  # same options: a no-op
    custom = register_policy_loss("iama_test_reference", impl="reference")
    assert register_policy_loss("iama_test_reference", impl="reference") is custom
    assert verl_algos.get_policy_loss_fn("iama_test_reference") is custom
    with pytest.raises(ValueError, match="already has a policy loss named 'iama_test_reference'"):
        register_policy_loss("iama_test_reference", impl="cpu")
    with pytest.raises(ValueError, match="already has a policy loss named 'vanilla'"):
        register_policy_loss("vanilla")
    gspo = verl_algos.get_policy_loss_fn("iama_gspo")
    assert gspo == VerlPolicyLoss("auto", "sequence") and gspo != fn
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        VerlPolicyLoss(ratio_level="seq")
    for name, surrogate in (("iama_cispo", "cispo"), ("iama_sapo", "sapo"), ("iama_gpg", "gpg"),
                            ("iama_dppo_tv", "dppo_tv"), ("iama_dppo_kl", "dppo_kl"), ("iama_dro", "dro")):
        assert verl_algos.get_policy_loss_fn(name) == VerlPolicyLoss("auto", "token", surrogate)
    with pytest.raises(ValueError, match="surrogate must be one of"):
        VerlPolicyLoss(surrogate="ppo")
    with pytest.raises(ValueError, match="verl's 'sapo' loss has token-level ratios"):
        VerlPolicyLoss(ratio_level="sequence", surrogate="sapo")


def test_called_through_the_registry_as_verl_calls_it(verl_algos) -> None:
    """The keyword call of verl's actor loss (workers/utils/losses.py::ppo_loss): the registered
    "iama" and "vanilla" give the same loss, gradient and metric keys on float32 inputs."""
    logp, old, adv, mask, weights = _batch(bs=8, T=9, seed=2, dtype=torch.float32)
    results = {}
    for mode in ("vanilla", "iama"):
        config = _actor_config()
        config.global_batch_info.update({"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
                                         "loss_scale_factor": None})
        x = logp.clone().requires_grad_(True)
        loss, metrics = verl_algos.get_policy_loss_fn(mode)(
            old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
            config=config, rollout_is_weights=weights)
        (grad,) = torch.autograd.grad(loss, x)
        results[mode] = (loss.detach(), grad, set(metrics))
    torch.testing.assert_close(results["iama"][0], results["vanilla"][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results["iama"][1], results["vanilla"][1], rtol=1e-5, atol=1e-8)
    assert results["iama"][2] == results["vanilla"][2]


def test_the_loss_benchmark_runs(verl_algos, capsys, benchmark_script) -> None:
    """benchmarks/verl_loss.py at a tiny size (it checks iama's gradient against verl's)."""
    module = benchmark_script("verl_loss")
    assert module.main(["--shapes", "5x9,3x16", "--modes", "token-mean", "--rounds", "3", "--no-write",
                        "--losses", ",".join(LOSSES)]) == 0
    table = capsys.readouterr().out.split("x base")[-1]
    for loss in LOSSES:  # verl and iama rows
        rows = [line.split() for line in table.splitlines() if line.startswith(f"verl {loss} loss")]
        assert sorted(row[4] for row in rows) == ["iama", "iama", "verl", "verl"], rows
    # --alone: a third row per shape, iama's call timed without verl's between
    assert module.main(["--shapes", "5x9", "--modes", "token-mean", "--rounds", "2", "--no-write",
                        "--losses", "dppo_tv", "--alone"]) == 0
    table = capsys.readouterr().out.split("x base")[-1]
    rows = [line.split() for line in table.splitlines() if line.startswith("verl dppo_tv loss")]
    assert sorted(" ".join(row[4:6]) for row in rows) == ["iama S=5", "iama alone", "verl S=5"], rows
