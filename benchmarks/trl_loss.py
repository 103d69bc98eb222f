"""TRL's GRPO loss against iama's kernel inside TRL: ``IAMAGRPOTrainer(loss_impl=...)``.

Both rows run TRL 1.16's real ``GRPOTrainer._compute_loss`` code path on the same micro-batch: one
with ``loss_impl=None`` (TRL's own loss: its eager clipped-ratio, KL and normaliser ops and its
metrics), one with ``loss_impl="auto"`` (iama's ``policy_loss``, the C++ kernel on the CPU, and
the same metrics). Only the model is taken out: ``_get_per_token_logps_and_entropies`` returns
precomputed per-token log-probs (a leaf that requires grad) and entropies, so that the time is the
loss's alone and not the language model's. A call is the loss and its backward into the
log-probs. The two take turns call by call in shuffled order; the median of ``--rounds`` each is
reported, with GB/s over the bytes the loss must move (logp, old and ref log-probs and the mask
read once, the gradient written once). Before timing, the two losses and gradients are checked
equal.

TRL comes with iama's ``trl`` extra, which ``make`` installs into ``.venv``:
``.venv/bin/python benchmarks/trl_loss.py``. Results go to ``benchmarks/results/trl_loss.jsonl``
(device and versions included); the table is printed last.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the checkout's own packages first (a copy of this script in another worktree measures that one)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Measurement, interleaved, record_times, report

from iama_kernels import BestOfN, Criterion, Objective


def _trainer(loss_type: str, beta: float, corrected: bool, level: str, out_dir: str) -> Any:
    import datasets
    import trl

    from iama.integrations.trl import IAMAGRPOTrainer
    from iama.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model_dir = Path(out_dir) / "tiny"  # TRL builds the reference model (beta > 0) from a path
    build_tiny_model(tokenizer, seed=0, max_positions=64).save_pretrained(model_dir)
    config = trl.GRPOConfig(output_dir=out_dir, use_cpu=True, bf16=False, report_to="none",
                            save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4,
                            num_generations=4, loss_type=loss_type, beta=beta,
                            use_bias_correction_kl=corrected, importance_sampling_level=level,
                            max_completion_length=8,
                            # CISPO's epsilon_high is the weight's bound itself (ScaleRL's 5.0)
                            **({"epsilon_high": 5.0} if loss_type == "cispo" else {}))
    def zero(completions: list, **kwargs: Any) -> list[float]:
        return [0.0] * len(completions)

    return IAMAGRPOTrainer(model=str(model_dir), reward_funcs=[zero], args=config,
                           train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * 4}),
                           processing_class=tokenizer, objective=Objective([Criterion("zero", BestOfN(4))]),
                           loss_impl="auto")


def _micro_batch(S: int, T: int, beta: float, seed: int = 0,
                 old_noise: float = 0.2) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g) * 3
    lengths = torch.randint(T // 4, T + 1, (S,), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    inputs = {
        "prompt_ids": torch.ones(S, 4, dtype=torch.long), "prompt_mask": torch.ones(S, 4, dtype=torch.long),
        "completion_ids": torch.ones(S, T, dtype=torch.long), "completion_mask": mask,
        "advantages": torch.randn(S, generator=g),
        "old_per_token_logps": logp + old_noise * torch.randn(S, T, generator=g),
        "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = logp + 0.2 * torch.randn(S, T, generator=g)
    entropies = torch.rand(S, T, generator=g) * mask
    return inputs, logp, entropies


def _loss_call(trainer: Any, impl: str | None, inputs: dict[str, Any], logp: torch.Tensor,
               entropies: torch.Tensor) -> Callable[[], torch.Tensor]:
    leaf = logp.clone().requires_grad_(True)
    trainer_model = trainer.model
    trainer.current_gradient_accumulation_steps = 1  # what Trainer sets per step in train()

    def precomputed(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, None]:
        return leaf, entropies, None

    def call() -> torch.Tensor:
        trainer.loss_impl = impl
        trainer._get_per_token_logps_and_entropies = precomputed
        leaf.grad = None
        loss = trainer._compute_loss(trainer_model, inputs)
        loss.backward()
        return leaf.grad

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x1024,256x2048,512x4096", help="comma-separated SxT")
    parser.add_argument("--configs",
                        default="grpo:0,dapo:0.04,dapo:0.04:corrected,grpo:0:sequence,cispo:0,sapo:0,vespo:0",
                        help="comma-separated loss_type:beta[:corrected][:sequence] (corrected: TRL's "
                             "default use_bias_correction_kl, the ratio-weighted KL; sequence: GSPO's "
                             "importance_sampling_level='sequence')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in args.configs.split(","):
            loss_type, beta, *flags = spec.split(":")
            beta, corrected = float(beta), "corrected" in flags
            level = "sequence" if "sequence" in flags else "token"
            trainer = _trainer(loss_type, beta, corrected, level, f"{tmp}/{spec.replace(':', '_')}")
            trainer.model.train()
            for shape in args.shapes.split(","):
                S, T = (int(x) for x in shape.split("x"))
                # VESPO weighs a sequence by the sum of its log-ratios: noise of 0.5 / sqrt(T) per
                # token keeps the sums about +-0.5, where the weights are neither 0 nor flat
                noise = 0.5 / T ** 0.5 if loss_type == "vespo" else 0.2
                inputs, logp, entropies = _micro_batch(S, T, beta, old_noise=noise)
                calls = {"TRL loss": _loss_call(trainer, None, inputs, logp, entropies),
                         "iama loss_impl=auto": _loss_call(trainer, "auto", inputs, logp, entropies)}
                grads = {name: call().clone() for name, call in calls.items()}
                torch.testing.assert_close(grads["iama loss_impl=auto"], grads["TRL loss"],
                                           rtol=1e-4, atol=1e-6 * float(grads["TRL loss"].abs().max()))
                times = interleaved(calls, args.rounds)
                # float32 logp, old (and ref) read and the gradient written; the int64 mask read.
                moved = (3 + (1 if beta else 0)) * S * T * 4 + S * T * 8
                label = (f"S={S} T={T} {loss_type} beta={beta:g}" + (" corrected" if corrected else "")
                         + (" sequence" if level == "sequence" else ""))
                record_times(rows, "loss inside TRL (fwd+bwd)", label, times, bytes_moved=moved,
                             extra={"threads": args.threads, "trl": importlib.metadata.version("trl")})
    report(rows, "trl_loss", "TRL loss", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
