"""TRL's ``GRPOTrainer`` trained for an inference-aware objective: :class:`IAMAGRPOTrainer`.

TRL turns each completion's rewards into an advantage with a linear rule: a weighted sum of the
reward functions, centred (and scaled) per group. :class:`IAMAGRPOTrainer` keeps all the rest of
TRL (generation, vLLM, reward functions, reference model, loss, logging, distributed training)
and replaces that rule with the first variation of an :class:`~iama_kernels.Objective`: each
reward function is a criterion served through its transform (``Mean``, ``BestOfN(n)``,
``SoftBestOfN(tau)``), the criteria are combined by the objective's aggregator, and the result
is centred and scaled per group as TRL would (``args.scale_rewards``). With ``Mean`` criteria and
``WeightedSum(w)`` it gives TRL's own advantages with ``reward_weights=w``.

Needs ``trl`` (``pip install "iama[trl]"``); tested with trl 1.16. The advantages are computed
over the rewards TRL gathers from every process, so every process uses the same ``lambda``.

Example::

    from iama import BestOfN, Criterion, Objective
    from iama.integrations.trl import IAMAGRPOTrainer

    def helpful(completions, **kw): ...
    def concise(completions, **kw): ...

    objective = Objective([Criterion("helpful", BestOfN(4)), Criterion("concise", BestOfN(4))])
    trainer = IAMAGRPOTrainer(model, reward_funcs=[helpful, concise], args=GRPOConfig(...),
                              train_dataset=dataset, objective=objective)
    trainer.train()
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from iama_kernels import Objective, policy_loss, vespo_phi
from iama_kernels._checks import ESTIMATORS, RATIO_LEVELS, check_choice
from iama_kernels.advantages.reference import batch_values

from .flat import criterion_columns, flat_group_advantages

# TRL's loss type -> (iama loss_type, normaliser, surrogate): "accumulation" divides by the
# gradient accumulation steps (TRL's grpo, bnpo, dr_grpo, sapo, luspo); "items" rescales the token
# mean to TRL's DAPO normaliser (the generation batch's token count over one accumulation window;
# dapo, cispo, vespo). LUSPO's sum over each sequence's tokens, mean over sequences, is dr_grpo
# with max_completion_length=1. "vespo" is the kernel's surrogate="vespo" (each row's gamma weight
# from a pre-pass over its tokens, see IAMAGRPOTrainer._vespo_options).
_LOSS_TYPES = {"grpo": ("grpo", "accumulation", "clip"), "bnpo": ("token", "accumulation", "clip"),
               "dr_grpo": ("dr_grpo", "accumulation", "clip"), "dapo": ("token", "items", "clip"),
               "luspo": ("luspo", "accumulation", "clip"), "cispo": ("token", "items", "cispo"),
               "sapo": ("grpo", "accumulation", "sapo"), "vespo": ("token", "items", "vespo")}
# TRL clamps VESPO's rates from below at this (the kernel takes rates > 0).
_VESPO_MIN_LAMBDA = 1e-4
# Extra model inputs of TRL's log-prob function (vision-language models), passed on when present.
_MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                 "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                 "mm_token_type_ids", "image_position_ids")


class IAMAGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose advantages are the non-linear GRPO advantages of ``objective``.

    Args:
        *args, **kwargs: as for ``trl.GRPOTrainer``. ``args.reward_weights`` must be left unset
            (weights belong to the objective's aggregator, e.g. ``WeightedSum``) and
            ``args.multi_objective_aggregation`` at ``"sum_then_normalize"``;
            ``args.scale_rewards`` (``"group"``, ``"batch"`` or ``"none"``) is the ``scale`` of
            :func:`iama_kernels.group_advantages`. Its ``"batch"`` divides by the std of the
            group-centred values, TRL's by the std of the raw rewards.
        objective: one :class:`~iama_kernels.Criterion` per reward function, named as TRL names
            it (the function's ``__name__``, or the last path part of a reward model's name).
        estimator: ``"plugin"`` or ``"unbiased"``, for ``BestOfN`` criteria.
        advantage_impl: the ``impl`` of :func:`iama_kernels.group_advantages`.
        loss_impl: ``None`` (default) keeps TRL's loss; an ``impl`` of
            :func:`iama_kernels.policy_loss` (``"auto"``, ``"cpu"``, ``"triton"``,
            ``"reference"``) computes the same clipped-ratio + k3 KL loss and its gradient with
            iama's kernels, one pass over the tokens instead of TRL's chain of elementwise ops.
            It covers TRL's ``loss_type`` ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``, ``"dapo"`` and
            ``"luspo"`` (the clipped surrogate), ``"cispo"`` (the kernel's ``surrogate="cispo"``
            with TRL's bound ``epsilon_high`` on the importance weight, so it needs
            ``epsilon_high >= 1``, e.g. ScaleRL's 5.0), ``"sapo"`` (``surrogate="sapo"``
            with ``sapo_temperature_pos``/``_neg``) and ``"vespo"`` (VESPO's detached gamma
            weight ``phi(w)`` of each sequence's ratio ``w``, with TRL's ``vespo_k_*`` and
            ``vespo_lambda_*``, times ``A logp``: the kernel's ``surrogate="vespo"``, whose
            pre-pass over each row computes its weight, while its KL term still sees each
            token's ratio), with token-level ratios (advantages
            ``[S]`` or per token ``[S, T]``) and with GSPO's sequence-level ones
            (``importance_sampling_level="sequence"``, the kernel's
            ``ratio_level="sequence"``, with advantages ``[S]``: per-token ones there are a
            ``ValueError`` at the loss), and TRL's two-sided clip ``delta > 1`` (above
            ``1 + epsilon_high`` the kernel's ``dual_clip``; at or below it the clip's upper bound
            for ``A > 0`` and a dual clip at ``1 + epsilon_high`` for ``A < 0``). It also covers
            TRL's weights of each token's policy term, folded into the advantages (every
            surrogate here is linear in them; the KL term, which TRL leaves unweighted, does not
            see them): the entropy mask
            (``top_entropy_quantile < 1``), the off-policy sequence mask
            (``off_policy_mask_threshold``) and vLLM's importance sampling correction
            (``vllm_importance_sampling_correction``, on by default with ``use_vllm``; every
            ``vllm_importance_sampling_mode``), alone or together; at the sequence level only
            the per-sequence ones (the off-policy mask, the ``sequence_*`` modes). With VESPO,
            vLLM's ratios go into each sequence's weight, as TRL puts them (TRL's
            ``get_gamma_weights`` computes it; the kernel then runs ``-phi A logp`` as CISPO with
            its weight held at 1). TRL's clip metrics count a token by its advantage's sign whatever its
            weight, and so do these. TRL's entropy bonus (``entropy_coef``, static or
            ``use_adaptive_entropy``) is added as TRL adds it. A setting it does not cover
            (``delta <= 1``, and at the sequence level a KL term with
            ``use_bias_correction_kl``, whose sequence weight TRL differentiates through every
            token of the sequence) is a ``ValueError`` when the trainer is built. With
            ``use_bias_correction_kl`` (TRL's default) and ``beta > 0`` the KL term is TRL's
            ratio-weighted ``rho * k3``, the kernel's ``kl_weight="ratio"``. It logs TRL's
            ``kl``, ``entropy`` and ``clip_ratio/{low,high,region}_mean`` (``cispo_clip_ratio``
            for CISPO, no clip metric for SAPO, ``vespo/phi_seq_mean`` for VESPO, as TRL; at
            the sequence level, as TRL, means
            over sequences, from the kernel's ``sequence_log_ratio``) and TRL's per-sequence
            extremes ``clip_ratio/low_min`` and ``high_max`` (with token-level ratios from the
            kernel's ``row_clip_weights``, ``row_stats=True``).

    Logged next to TRL's metrics: ``iama/lambda/<criterion>`` (the weight ``dg/dR`` of each
    criterion) and ``iama/value/<criterion>`` (the batch's estimate of the criterion's value
    after its transform, e.g. the expected best of ``n``). The ``advantages`` column of TRL's
    completion logs holds the IAMA advantages.
    """

    def __init__(self, *args: Any, objective: Objective, estimator: str = "plugin",
                 advantage_impl: str = "auto", loss_impl: str | None = None,
                 **kwargs: Any) -> None:
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an iama Objective, got {type(objective).__name__}")
        check_choice("estimator", estimator, ESTIMATORS)
        if not isinstance(advantage_impl, str):
            raise TypeError(f"advantage_impl must be a str, got {type(advantage_impl).__name__}")
        if loss_impl is not None and not isinstance(loss_impl, str):
            raise TypeError(f"loss_impl must be None or a str, got {type(loss_impl).__name__}")
        super().__init__(*args, **kwargs)
        if self.args.reward_weights is not None:
            raise ValueError(
                "IAMAGRPOTrainer: leave args.reward_weights unset; the objective's aggregator "
                f"combines the criteria (e.g. WeightedSum({list(self.args.reward_weights)}))"
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "IAMAGRPOTrainer: args.multi_objective_aggregation must stay 'sum_then_normalize' "
                f"(the objective combines the criteria), got {self.multi_objective_aggregation!r}"
            )
        criterion_columns(objective, self.reward_func_names)  # names match, or a clear error now
        largest = objective.max_n()
        for what, g in (("num_generations", self.num_generations),
                        ("num_generations_eval", self.num_generations_eval)):
            if estimator == "unbiased" and g < largest:
                raise ValueError(f"IAMAGRPOTrainer: estimator='unbiased' needs {what} >= the largest "
                                 f"BestOfN n of the objective ({largest}), got {g}")
        self.objective = objective
        self.estimator = estimator
        self.advantage_impl = advantage_impl
        self.loss_impl = loss_impl
        if loss_impl is not None:
            self._check_loss_settings()
        self._gathered_rewards: torch.Tensor | None = None

    def _check_loss_settings(self) -> None:
        """Refuse, by name, every TRL setting that ``loss_impl`` would otherwise ignore."""
        args = self.args
        refused = []
        if self.loss_type not in _LOSS_TYPES:
            refused.append(f"loss_type={self.loss_type!r} (supported: {sorted(_LOSS_TYPES)})")
        elif self.loss_type == "cispo" and self.epsilon_high < 1:
            # TRL's CISPO clamps the importance weight at epsilon_high itself (ScaleRL's eps_max);
            # the kernel's bound is 1 + eps_high with eps_high >= 0.
            refused.append(f"loss_type='cispo' with epsilon_high={self.epsilon_high} < 1 (TRL "
                           "clamps every importance weight at epsilon_high; ScaleRL uses 5.0)")
        if self.importance_sampling_level not in RATIO_LEVELS:  # TRL's names are the kernel's
            refused.append(f"importance_sampling_level={self.importance_sampling_level!r}")
        elif (self.importance_sampling_level == "sequence" and self.beta != 0.0
              and args.use_bias_correction_kl):
            # TRL's KL is then s_i * k3_t with s_i not detached: a gradient through every token of
            # the sequence, which the kernel's per-token KL weight does not have.
            refused.append("importance_sampling_level='sequence' with use_bias_correction_kl=True and "
                           f"beta={self.beta} (set use_bias_correction_kl=False)")
        if (args.delta is not None and _LOSS_TYPES.get(self.loss_type, ("", "", "clip"))[2] == "clip"
                and not (args.delta > 1 and (args.delta > 1 + self.epsilon_high or self.epsilon_high > 0))):
            # TRL's two-sided clip: above 1 + epsilon_high the dual clip at delta; at or below it
            # the clip's upper bound delta for A > 0 and a dual clip at 1 + epsilon_high for A < 0
            refused.append(f"delta={args.delta} (covered when delta > 1)")
        # TRL's per-token weights of the policy term (not of the KL term): folded into the advantages,
        # which the KL term does not see
        weighting = self._weight_settings()
        names = " and ".join(name for name, _ in weighting)
        if (self.loss_type != "vespo" and self.importance_sampling_level == "sequence"
                and any(per_token for _, per_token in weighting)):
            refused.append(f"{names} with importance_sampling_level='sequence' (a weight per token against "
                           "one ratio per sequence)")
        if refused:
            raise ValueError(f"IAMAGRPOTrainer: loss_impl={self.loss_impl!r} does not cover "
                             + "; ".join(refused) + ". Use loss_impl=None for TRL's own loss.")

    def _weight_settings(self) -> list[tuple[str, bool]]:
        """TRL's settings that multiply each token's policy term, each named with its value and
        whether its weight is per token (else per sequence): the entropy mask, the off-policy
        sequence mask and vLLM's importance sampling correction."""
        found = []
        if self.top_entropy_quantile < 1.0:
            found.append((f"top_entropy_quantile={self.top_entropy_quantile}", True))
        if self.off_policy_mask_threshold is not None:
            found.append((f"off_policy_mask_threshold={self.off_policy_mask_threshold}", False))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            mode = self.vllm_importance_sampling_mode
            found.append((f"vllm_importance_sampling_mode={mode!r}", not mode.startswith("sequence")))
        return found

    def _policy_weights(self, inputs: dict[str, Any], logps: torch.Tensor, entropy_mask: torch.Tensor | None,
                        mask: torch.Tensor, advantages: torch.Tensor, with_is: bool) -> torch.Tensor | None:
        """The product of TRL's weights of each token's policy term (``[S, 1]`` or ``[S, T]``, all
        >= 0), computed as TRL computes them, or ``None`` without any: the entropy mask of
        ``top_entropy_quantile``, the off-policy sequence mask (DeepSeek-V3.2's, from the sampling
        log-probs) and, ``with_is``, vLLM's importance sampling ratio (VESPO takes it into its
        weight instead)."""
        weights: torch.Tensor | None = None

        def times(w: torch.Tensor) -> torch.Tensor:
            w = w.to(logps.dtype)
            return w if weights is None else weights * w

        if entropy_mask is not None:
            weights = times(entropy_mask)
        if self.off_policy_mask_threshold is not None:
            old = inputs.get("old_per_token_logps")
            old = logps.detach() if old is None else old
            weights = times(self.get_off_policy_mask(
                advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
                per_token_logps=logps, sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask, off_policy_threshold=self.off_policy_mask_threshold))
        if with_is and self.use_vllm and self.vllm_importance_sampling_correction:
            weights = times(inputs["importance_sampling_ratio"])
        return weights

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        rewards = super()._calculate_rewards(*args, **kwargs)
        self._gathered_rewards = rewards  # [N over all processes, m], groups of G consecutive rows
        return rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._gathered_rewards = None
        output = super()._generate_and_score_completions(inputs)
        rewards = self._gathered_rewards
        if rewards is None:
            import trl

            raise RuntimeError(
                f"IAMAGRPOTrainer: trl {trl.__version__} scored the completions without calling "
                "GRPOTrainer._calculate_rewards, so its advantages cannot be replaced; this version "
                "of TRL is not supported (tested with trl 1.16)"
            )
        self._gathered_rewards = None
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        advantages, out = flat_group_advantages(
            rewards, group, self.objective, self.reward_func_names, estimator=self.estimator,
            scale=self.scale_rewards, impl=self.advantage_impl,
        )
        local = output["advantages"]
        start = self.accelerator.process_index * local.shape[0]
        output["advantages"] = advantages[start:start + local.shape[0]].to(local.dtype)
        # The batch-level values lambda was computed from (groups with a scored completion).
        scored = (~torch.isnan(rewards).all(dim=1)).reshape(-1, group)
        self._log_iama(mode, advantages, batch_values(out.values, scored), out.criterion_weights)
        return output

    def _log_iama(self, mode: str, advantages: torch.Tensor, values: torch.Tensor,
                  lam: torch.Tensor) -> None:
        # TRL appended its own advantages of the whole gathered batch last; put ours in their place.
        logged = self._logs["advantages"]
        for _ in range(min(advantages.shape[0], len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        for name, weight, value in zip(self.objective.names, lam.tolist(), values.tolist(), strict=True):
            self._metrics[mode][f"iama/lambda/{name}"].append(weight)
            self._metrics[mode][f"iama/value/{name}"].append(value)

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        if self.loss_impl is None:
            return super()._compute_loss(model, inputs)
        kind, normaliser, surrogate = _LOSS_TYPES[self.loss_type]
        # VESPO's surrogate sees no ratio level (its weight comes from the token log-ratios' sum)
        if (self.importance_sampling_level == "sequence" and surrogate != "vespo"
                and inputs["advantages"].dim() != 1):
            # TRL then differentiates each sequence's ratio through every token against the
            # whole row of advantages; the kernel's GSPO-token ratio gives each token its own term.
            raise ValueError("IAMAGRPOTrainer: loss_impl with importance_sampling_level='sequence' "
                             "takes one advantage per completion, got advantages of shape "
                             f"{tuple(inputs['advantages'].shape)}; use loss_impl=None for TRL's loss")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _MODEL_INPUTS},
        )
        advantages = inputs["advantages"]  # [S], or [S, T] per token (policy_loss takes both)
        entropy_mask = (self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
                        if self.top_entropy_quantile < 1.0 else None)
        old = inputs.get("old_per_token_logps")
        # VESPO with vLLM's ratios: TRL puts them into each sequence's weight phi, which is then
        # computed here by TRL's own function and folded into the advantages, and the kernel's
        # CISPO weight is held at 1 (-phi A logp, phi detached: VESPO's surrogate)
        vespo_is = surrogate == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction
        phi = None
        if vespo_is:
            log_ratio = logps.detach() - (logps.detach() if old is None else old)
            phi = self.get_gamma_weights(
                advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
                log_ratio_per_token=log_ratio, mask=mask,
                importance_sampling_ratio=inputs["importance_sampling_ratio"],
                **self._vespo_shapes())
            phi = phi[:, 0] if advantages.dim() == 1 else phi
        weights = self._policy_weights(inputs, logps, entropy_mask, mask, advantages, with_is=not vespo_is)
        signs = advantages  # TRL's clip metrics and VESPO's phi go by the advantages before any weight
        if phi is not None:
            advantages = advantages * phi.to(advantages.dtype)
        if weights is not None:  # every surrogate here is linear in A: the weights go into it
            if advantages.dim() == 1 and weights.shape[1] == 1:
                advantages = advantages * weights[:, 0]
            else:
                advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * weights
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        max_length = self.max_completion_length if kind == "dr_grpo" else None
        if kind == "luspo":  # the sum over each sequence's tokens, mean over sequences
            kind, max_length = "dr_grpo", 1
        eps_low, eps_high = self._kernel_clip_range(surrogate)
        kernel_surrogate = "cispo" if vespo_is else surrogate  # with eps 0, 0: the weight is 1
        # TRL applies delta (ratios cut at delta before the min) in the clipped surrogate's branch
        dual_clip, delta_cap = (self.args.delta if surrogate == "clip" else None), False
        if dual_clip is not None and not dual_clip > 1 + eps_high:
            # At or below 1 + epsilon_high: min(rho, delta) cuts A > 0's ratios at delta (the upper
            # clip bound) and leaves A < 0's max(min(rho, delta), clip(rho)) held at 1 + epsilon_high
            # above it (a dual clip there). TRL then counts no token as clipped above.
            eps_high, dual_clip, delta_cap = dual_clip - 1.0, 1.0 + eps_high, True
        # TRL's VESPO: -phi A logp, phi detached, with token-level ratios for the KL weight
        # (use_bias_correction_kl), whatever importance_sampling_level says.
        level = "token" if surrogate == "vespo" else self.importance_sampling_level
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        tokens = mask.sum().to(torch.float64 if logps.dtype == torch.float64 else torch.float32)
        if normaliser == "items":  # TRL's DAPO: token sum over the window's share of the batch
            items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                items = items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            scale = tokens / items
        else:
            scale = 1.0 / accumulation
        # The normaliser goes into the kernel's inputs rather than onto its loss: the surrogate is
        # linear in the advantages (scale > 0) and the KL term in beta, so the kernel's loss comes
        # out scaled and its backward hands back the saved gradient with no pass to rescale it.
        # TRL's use_bias_correction_kl is the kernel's ratio-weighted KL (rho * k3).
        out = policy_loss(
            logps, old, ref, advantages * scale, mask,
            eps_low=eps_low, eps_high=eps_high,
            beta=0.0 if ref is None else self.beta * float(scale), loss_type=kind,
            max_completion_length=max_length,
            kl_weight="ratio" if ref is not None and self.args.use_bias_correction_kl else "none",
            dual_clip=dual_clip,
            ratio_level=level, surrogate=kernel_surrogate,
            tau_pos=self.args.sapo_temperature_pos, tau_neg=self.args.sapo_temperature_neg,
            **self._vespo_options(),
            # the per-sequence clip extremes TRL logs for its clipped losses, at the token level
            row_stats=surrogate == "clip" and self.importance_sampling_level == "token",
            impl=self.loss_impl,
        )
        loss = out.loss
        if self._entropy_bonus_enabled:
            policy = out.loss.detach() * (1.0 if normaliser == "items" else accumulation)
            loss = loss - self._entropy_bonus(mode, entropies, mask, entropy_mask, accumulation, policy)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(mode, out, signs, mask, entropies, tokens, surrogate, eps_low, eps_high,
                               None if weights is None else (logps, old), phi, delta_cap)
        return loss

    def _entropy_bonus(self, mode: str, entropies: torch.Tensor, mask: torch.Tensor,
                       entropy_mask: torch.Tensor | None, accumulation: float,
                       policy_loss: torch.Tensor) -> torch.Tensor:
        """TRL's entropy bonus ``coef * H``, to subtract from the loss (differentiable through the
        entropies): ``H`` the mean entropy over the tokens the policy term acts on (under the
        entropy mask too), divided by the accumulation steps only. With ``use_adaptive_entropy``
        (Skywork-OR1) the coefficient and its gate are those of the previous optimizer step, and
        this step's window of entropy sums and token counts (over every process) updates them at
        its boundary, by ``entropy_coef_delta`` within ``[entropy_coef_min, entropy_coef_max]``
        toward ``entropy_target``, as TRL updates them. Logs TRL's ``policy_loss`` (the loss
        before the bonus, as TRL reports it) and, at each optimizer step, ``entropy_coef``."""
        args, metrics = self.args, self._metrics[mode]
        effective = mask if entropy_mask is None else mask * entropy_mask
        bonus = (entropies * effective).sum() / effective.sum().clamp(min=1.0) / accumulation
        if self.use_adaptive_entropy:  # gated by the entropy measured at the previous step
            coef = self.entropy_coef if self._last_world_entropy <= args.entropy_target else 0.0
        else:
            coef = self.entropy_coef
        metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            window = torch.stack([(entropies * effective).sum(), effective.sum()]).detach()
            self._entropy_window_stats = (window if self._entropy_window_stats is None
                                          else self._entropy_window_stats + window)
            if self.accelerator.sync_gradients:  # the optimizer step's boundary
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                entropy = (total[0] / total[1].clamp(min=1.0)).item()
                coef_now, delta = self.entropy_coef, args.entropy_coef_delta
                if entropy <= args.entropy_target:  # too little entropy: more bonus, up to the max
                    self.entropy_coef = min(coef_now + delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(coef_now - delta, args.entropy_coef_min)
                self._last_world_entropy = entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
        return coef * bonus

    def _kernel_clip_range(self, surrogate: str) -> tuple[float, float]:
        """The kernel's ``(eps_low, eps_high)``: TRL's, except for CISPO, whose weight TRL clamps
        at ``epsilon_high`` from above only (range ``[0, epsilon_high]``), and VESPO, whose
        surrogate reads neither (0 and 0, so that any TRL epsilon passes the kernel's checks)."""
        if surrogate == "cispo":
            return 1.0, self.epsilon_high - 1.0
        if surrogate == "vespo":
            return 0.0, 0.0
        return self.epsilon_low, self.epsilon_high

    def _vespo_options(self) -> dict[str, float]:
        """VESPO's ``vespo_k_*``/``vespo_lambda_*`` for the kernel (ignored by the other
        surrogates), the rates clamped at ``1e-4`` from below as TRL clamps them."""
        args = self.args
        return {"vespo_k_pos": float(args.vespo_k_pos), "vespo_k_neg": float(args.vespo_k_neg),
                "vespo_lambda_pos": max(float(args.vespo_lambda_pos), _VESPO_MIN_LAMBDA),
                "vespo_lambda_neg": max(float(args.vespo_lambda_neg), _VESPO_MIN_LAMBDA)}

    def _vespo_shapes(self) -> dict[str, float]:
        """:meth:`_vespo_options` under the names ``vespo_phi`` and TRL's ``get_gamma_weights``
        take (``k_pos``, ``lambda_pos``, ...)."""
        return {k.removeprefix("vespo_"): v for k, v in self._vespo_options().items()}

    @torch.no_grad()
    def _log_loss_metrics(self, mode: str, out: Any, advantages: torch.Tensor, mask: torch.Tensor,
                          entropies: torch.Tensor, tokens: torch.Tensor, surrogate: str,
                          eps_low: float, eps_high: float,
                          ratio_inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                          phi: torch.Tensor | None = None, none_above: bool = False) -> None:
        """TRL's loss metrics: means over every process, as TRL reports them, in one reduction.
        The clip metrics are token-weighted, except for sequence ratios, which TRL averages over
        sequences; the extremes over sequences of each one's clipped shares are gathered.
        VESPO's ``phi`` (from the kernel's log weights) is averaged over sequences (advantages
        ``[S]``) or tokens (``[S, T]``), as TRL. ``advantages`` are those before TRL's policy-term
        weights; with the weights folded into the kernel's, ``ratio_inputs`` holds ``(logp,
        old_logp)``: TRL counts a clipped token by its advantage's sign whatever its weight, 0
        included, so the token-level clip counts are then taken from those, as TRL takes them.
        ``none_above``: TRL's delta at or
        below ``1 + epsilon_high`` cuts the ratios it tests before the test, so no token counts as
        clipped above (the kernel's clipped-above tokens are then those above delta)."""
        sequence = self.importance_sampling_level == "sequence" and surrogate != "vespo"
        zero = tokens.new_zeros(())
        low_sum = high_sum = phi_sum = phi_count = zero
        clip_count: Any = tokens
        if surrogate == "vespo" and phi is None:  # VESPO clips nothing; its metric is phi's mean
            log_w = out.sequence_log_ratio.to(tokens.dtype)
            log_w = log_w if advantages.dim() == 1 else log_w[:, None]
            phi = vespo_phi(log_w, advantages, **self._vespo_shapes())
        if surrogate == "vespo":
            if phi.dim() == 1:  # one weight per sequence: TRL's mean over sequences
                phi_sum, phi_count = phi.sum(), zero + phi.shape[0]
            else:
                phi_sum, phi_count = (phi * mask).sum(), tokens
        elif sequence:
            low, high = self._sequence_clips(out.sequence_log_ratio, advantages, eps_low, eps_high)
            low_sum, high_sum, clip_count = low.sum(), high.sum(), advantages.shape[0]
        elif ratio_inputs is not None:
            low_tokens, high_tokens = self._token_clips(advantages, *ratio_inputs, mask, eps_low, eps_high)
            low_sum, high_sum = low_tokens.sum(), high_tokens.sum()
        else:
            high_sum = out.clip_high_fraction * tokens
            low_sum = out.clip_fraction * tokens - high_sum
        if none_above:
            high_sum = zero
        weighted = torch.stack([out.kl * tokens, low_sum.to(tokens.dtype), high_sum.to(tokens.dtype),
                                (entropies.detach() * mask).sum().to(tokens.dtype), tokens,
                                torch.as_tensor(clip_count, dtype=tokens.dtype, device=tokens.device),
                                phi_sum.to(tokens.dtype), phi_count.to(tokens.dtype)])
        reduced = self.accelerator.reduce(weighted, reduction="sum").tolist()
        kl_sum, low_sum, high_sum, entropy_sum, count, clip_count, phi_sum, phi_count = reduced
        count, clip_count = max(count, 1.0), max(clip_count, 1.0)
        metrics = self._metrics[mode]
        if self.beta != 0.0:
            metrics["kl"].append(kl_sum / count)
        metrics["entropy"].append(entropy_sum / count)
        if surrogate == "cispo":
            metrics["cispo_clip_ratio"].append(high_sum / clip_count)
        elif surrogate == "vespo":
            metrics["vespo/phi_seq_mean"].append(phi_sum / max(phi_count, 1.0))
        elif surrogate == "clip":
            metrics["clip_ratio/low_mean"].append(low_sum / clip_count)
            metrics["clip_ratio/high_mean"].append(high_sum / clip_count)
            metrics["clip_ratio/region_mean"].append((low_sum + high_sum) / clip_count)
            if sequence:  # each sequence's clipped share is 0 or 1
                low_share, high_share = low.to(tokens.dtype), high.to(tokens.dtype)
            elif ratio_inputs is not None:  # each sequence's clipped shares of its tokens, as TRL
                total = mask.sum(-1).to(tokens.dtype)
                low_share, high_share = low_tokens.sum(-1) / total, high_tokens.sum(-1) / total
            else:  # each sequence's clipped shares of its tokens; NaN for an empty one, as TRL
                rows = out.row_clip_weights
                total = rows[:, 0]
                high_share = rows[:, 2] / total
                low_share = (rows[:, 1] - rows[:, 2]) / total
            if none_above:
                high_share = torch.where(torch.isnan(high_share), high_share, 0.0)
            # TRL's extremes over the sequences of every process (one gather for both), skipping NaN
            shares = self.accelerator.gather(torch.stack([low_share, high_share], dim=-1))
            metrics["clip_ratio/low_min"].append(nanmin(shares[:, 0]).item())
            metrics["clip_ratio/high_max"].append(nanmax(shares[:, 1]).item())

    @staticmethod
    def _token_clips(advantages: torch.Tensor, logps: torch.Tensor, old: torch.Tensor | None,
                     mask: torch.Tensor, eps_low: float, eps_high: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[S, T]`` float: the tokens clipped below and above, as TRL counts them (by the ratio and
        the advantage's sign, under the mask)."""
        ratio = torch.ones_like(logps) if old is None else torch.exp(logps.detach() - old)
        a = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        keep = mask.to(logps.dtype)
        return ((ratio < 1 - eps_low) & (a < 0)) * keep, ((ratio > 1 + eps_high) & (a > 0)) * keep

    @staticmethod
    def _sequence_clips(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                        eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``[S]`` bool: the sequences clipped below and above, as TRL counts them for
        sequence-level ratios, from the kernel's ``[S]`` log sequence ratios (TRL's masked mean of
        ``logp - old``, which is the kernel's mean over the support for a 0/1 mask)."""
        ratio = torch.exp(log_ratio)
        return (ratio < 1 - eps_low) & (advantages < 0), (ratio > 1 + eps_high) & (advantages > 0)
