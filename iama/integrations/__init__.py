"""Non-linear GRPO inside other trainers.

* :mod:`iama.integrations.flat`: advantages for the flat ``[N, m]`` reward matrix most trainers
  keep (one column per reward function, NaN where a reward function gave no score), with groups
  of ``G`` consecutive rows or a group id per row. Needs torch alone.
* :mod:`iama.integrations.trl`: :class:`~iama.integrations.trl.IAMAGRPOTrainer`, TRL's
  ``GRPOTrainer`` with IAMA advantages (``pip install "iama[trl]"``).

The submodules are imported on demand, so ``import iama.integrations`` never imports TRL.
"""
