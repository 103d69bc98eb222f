"""Registers the ``"iama"`` advantage estimator and the ``"iama"`` and ``"iama_gspo"`` policy losses
when verl loads its plugins (``import verl``).

Named in iama's ``verl.plugins`` entry point, and usable as
``VERL_USE_EXTERNAL_MODULES=iama.integrations.verl_plugin`` where entry points are turned off.
"""

from iama.integrations.verl import register
from iama.integrations.verl_loss import GSPO_POLICY_LOSS_NAME, register_policy_loss

register()
register_policy_loss()
register_policy_loss(GSPO_POLICY_LOSS_NAME, ratio_level="sequence")
