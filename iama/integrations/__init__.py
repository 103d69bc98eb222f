"""Non-linear GRPO inside other trainers.

* :mod:`iama.integrations.flat`: advantages for the flat ``[N, m]`` reward matrix most trainers
  keep (one column per reward function, NaN where a reward function gave no score), with groups
  of ``G`` consecutive rows or a group id per row. Needs torch alone.
* :mod:`iama.integrations.trl`: :class:`~iama.integrations.trl.IAMAGRPOTrainer`, TRL's
  ``GRPOTrainer`` with IAMA advantages (``pip install "iama[trl]"``).
* :mod:`iama.integrations.verl`: the ``"iama"`` advantage estimator for verl's PPO trainer
  (``algorithm.adv_estimator=iama``), registered when verl is imported.
* :mod:`iama.integrations.verl_loss`: the ``"iama"`` policy loss for verl's actor
  (``actor_rollout_ref.actor.policy_loss.loss_mode=iama``): verl's PPO loss on the fused kernel,
  registered with the estimator.
* :mod:`iama.integrations.openrlhf`: :class:`~iama.integrations.openrlhf.PolicyLoss`, a drop-in
  for OpenRLHF's actor loss (``PolicyLoss``: PPO and GSPO, the dual clip, its train/rollout
  correction) on the fused kernel.

The submodules are imported on demand, so ``import iama.integrations`` never imports TRL, verl or OpenRLHF.
"""
