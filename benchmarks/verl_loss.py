"""verl's PPO policy losses against iama's on the fused kernel: ``"vanilla"`` against ``"iama"``,
``"gspo"`` against ``"iama_gspo"``, ``"cispo"``, ``"sapo"``, ``"gpg"``, ``"dppo_tv"``,
``"dppo_kl"``, ``"geo_mean"``, ``"kl_cov"``, ``"clip_cov"``, ``"dro"`` and ``"bypass_mode"`` against
``"iama_cispo"``, ``"iama_sapo"``, ``"iama_gpg"``, ``"iama_dppo_tv"``, ``"iama_dppo_kl"``,
``"iama_geo_mean"``, ``"iama_kl_cov"``, ``"iama_clip_cov"``, ``"iama_dro"`` and
``"iama_bypass_mode"``.

Both rows call the registered functions of verl 0.9.1's policy-loss registry the way verl's actor
loss calls them (keyword arguments, an actor config with ``clip_ratio_high=0.28`` and the default
dual clip ``clip_ratio_c=3``, which ``"vanilla"`` uses, and DPPO as its weight cap; DRO's
``dro_beta=0.5``; bypass mode's default rollout correction: sequence-level IS weights truncated
at 2, only for its metrics with PPO's clip), on the same
float32 micro-batch:
log-probs, old log-probs, per-response advantages broadcast over a bool response mask. A call is
the loss, its three metrics (verl reads each with ``.item()``) and the backward into the
log-probs. The rows take
turns call by call in shuffled order; the median of ``--rounds`` each is reported, with GB/s over
the bytes the loss must move (log-probs, old log-probs and the token-level advantages read once,
the mask read once, the gradient written once). Before timing, the losses and gradients are
checked equal. Each iama call follows a verl call, which leaves the caches and the allocator cold
(a verl loss takes 10-20x as long and allocates its temporaries); ``--alone`` also times iama's
call by itself (the row ``iama alone``), which is what a change to iama's side is best judged by.

verl is installed into ``.venv`` by ``make``: ``.venv/bin/python benchmarks/verl_loss.py``.
Results go to ``benchmarks/results/verl_loss.jsonl`` (device and versions included; ``--output``
names another file, for a partial run); the table is printed last.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the checkout's own packages first (a copy of this script in another worktree measures that one)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Measurement, interleaved, record_times, report


def _config(mode: str) -> Any:
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    config = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4,
                             rollout_n=4, clip_ratio_high=0.28, loss_agg_mode=mode,
                             policy_loss=PolicyLossConfig(dro_beta=0.5))
    config.global_batch_info.update({"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
                                     "loss_scale_factor": None})
    return config


def _micro_batch(S: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g) * 3
    lengths = torch.randint(T // 4, T + 1, (S,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(1)
    adv = torch.randn(S, generator=g).unsqueeze(1) * mask
    return {"log_prob": logp, "old_log_prob": logp + 0.3 * torch.randn(S, T, generator=g),
            "advantages": adv, "response_mask": mask}


def _loss_call(fn: Callable[..., Any], batch: dict[str, torch.Tensor], mode: str) -> Callable[[], Any]:
    leaf = batch["log_prob"].clone().requires_grad_(True)
    config = _config(mode)

    def call() -> torch.Tensor:
        leaf.grad = None
        torch.manual_seed(0)  # "clip_cov" draws its tokens: both rows draw the same ones (both pay this)
        loss, metrics = fn(old_log_prob=batch["old_log_prob"], log_prob=leaf, advantages=batch["advantages"],
                           response_mask=batch["response_mask"], loss_agg_mode=mode, config=config,
                           rollout_is_weights=None)
        loss.backward()
        assert isinstance(metrics, dict)  # verl's "gpg" returns none, "bypass_mode" its rollout_corr/ ones
        return leaf.grad

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x1024,256x2048,512x4096", help="comma-separated SxT")
    parser.add_argument("--modes", default="token-mean,seq-mean-token-mean", help="verl loss_agg_modes")
    parser.add_argument("--losses",
                        default="vanilla,gspo,cispo,sapo,gpg,dppo_tv,dppo_kl,geo_mean,kl_cov,clip_cov,dro,"
                                "bypass_mode",
                        help="verl policy losses")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--alone", action="store_true", help="also time iama's call without verl's between")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--output", default="verl_loss",
                        help="results file name in benchmarks/results (a partial run can keep the full one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[Measurement] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from verl.trainer.ppo import core_algos

        from iama.integrations.verl_loss import VERL_LOSSES, VerlPolicyLoss

        ours = {name: VerlPolicyLoss(ratio_level=level, surrogate=surrogate)
                for name, (_, level, surrogate) in VERL_LOSSES.items()}
        for loss in args.losses.split(","):
            if loss not in ours:
                parser.error(f"--losses: {loss!r} is not one of {sorted(ours)}")
            losses = {"verl": core_algos.get_policy_loss_fn(loss), "iama": ours[loss]}
            for mode in args.modes.split(","):
                for shape in args.shapes.split(","):
                    S, T = (int(x) for x in shape.split("x"))
                    batch = _micro_batch(S, T)
                    calls = {name: _loss_call(fn, batch, mode) for name, fn in losses.items()}
                    grads = {name: call().clone() for name, call in calls.items()}
                    torch.testing.assert_close(grads["iama"], grads["verl"], rtol=1e-4,
                                               atol=1e-6 * float(grads["verl"].abs().max()))
                    times = interleaved(calls, args.rounds)
                    if args.alone:
                        times["iama alone"] = interleaved({"iama": calls["iama"]}, args.rounds)["iama"]
                    moved = 4 * S * T * 4 + S * T  # float32 logp, old, advantages, gradient; bool mask
                    record_times(rows, f"verl {loss} loss (fwd+bwd)", f"S={S} T={T} {mode}", times,
                                 bytes_moved=moved,
                                 extra={"threads": args.threads, "verl": importlib.metadata.version("verl")})
    report(rows, args.output, "verl", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
