"""Registers the ``"iama"`` advantage estimator and the ``"iama"``, ``"iama_gspo"``,
``"iama_cispo"``, ``"iama_sapo"`` and ``"iama_gpg"`` policy losses when verl loads its plugins
(``import verl``).

Named in iama's ``verl.plugins`` entry point, and usable as
``VERL_USE_EXTERNAL_MODULES=iama.integrations.verl_plugin`` where entry points are turned off.
"""

from iama.integrations.verl import register
from iama.integrations.verl_loss import (
    CISPO_POLICY_LOSS_NAME,
    GPG_POLICY_LOSS_NAME,
    GSPO_POLICY_LOSS_NAME,
    SAPO_POLICY_LOSS_NAME,
    register_policy_loss,
)

register()
register_policy_loss()
register_policy_loss(GSPO_POLICY_LOSS_NAME, ratio_level="sequence")
register_policy_loss(CISPO_POLICY_LOSS_NAME, surrogate="cispo")
register_policy_loss(SAPO_POLICY_LOSS_NAME, surrogate="sapo")
register_policy_loss(GPG_POLICY_LOSS_NAME, surrogate="gpg")
