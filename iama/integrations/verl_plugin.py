"""Registers the ``"iama"`` advantage estimator and the ``"iama"``, ``"iama_gspo"``,
``"iama_cispo"``, ``"iama_sapo"``, ``"iama_gpg"``, ``"iama_dppo_tv"``, ``"iama_dppo_kl"``,
``"iama_geo_mean"``, ``"iama_kl_cov"``, ``"iama_clip_cov"`` and ``"iama_dro"`` policy losses when
verl loads its plugins (``import verl``).

Named in iama's ``verl.plugins`` entry point, and usable as
``VERL_USE_EXTERNAL_MODULES=iama.integrations.verl_plugin`` where entry points are turned off.
"""

from iama.integrations.verl import register
from iama.integrations.verl_loss import VERL_LOSSES, register_policy_loss

register()
for name, ratio_level, surrogate in VERL_LOSSES.values():
    register_policy_loss(name, ratio_level=ratio_level, surrogate=surrogate)
