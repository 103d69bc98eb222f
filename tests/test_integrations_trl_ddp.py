"""IAMAGRPOTrainer in two CPU processes (accelerate's MULTI_CPU over gloo), against TRL's own.

Each process holds 6 of the step's 12 completions (3 prompts x 4), so the middle group straddles
the two processes: an advantage computed from a process's own rows would be wrong there. The
checks: with Mean criteria each process trains on exactly TRL's advantages (the slicing matches
TRL's); with a SmoothMin of BestOfN criteria (a lambda that depends on the batch) both processes
see the same gathered rewards and lambda, and their slices put together are the float64
reference advantages of the whole batch; loss_impl's DAPO normaliser (the one that depends on the
number of processes) gives TRL's loss in each process.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from test_integrations_trl import _config, long, short  # noqa: E402

from iama.integrations.flat import flat_group_advantages  # noqa: E402
from iama.integrations.trl import IAMAGRPOTrainer  # noqa: E402
from iama.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from iama_kernels import BestOfN, Criterion, Mean, Objective, SmoothMin, WeightedSum  # noqa: E402

PROMPTS = [f"tell a story about the {w}" for w in ("cat", "sun", "dog")]
GROUP = 4
PER_PROCESS = 6  # 12 completions in all: the second group has 2 rows in each process
WORLD = 2
BEST_OF = Objective([Criterion("short", BestOfN(2)), Criterion("long", BestOfN(3))],
                    SmoothMin([0.5, 0.5], 0.5))
SEQUENCE_EXTREMES = ("clip_ratio/low_min", "clip_ratio/high_max")  # TRL's, at the sequence level


def _spy(base: type) -> type:
    """``base`` recording what each micro-batch trains on, the gathered rewards and lambda."""

    class Spy(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.seen: dict[str, list] = {"advantages": [], "completions": [], "rewards": [],
                                          "lambda": [], "loss": [], "scored": [], "extremes": []}

        def _generate_and_score_completions(self, inputs: list) -> dict:
            # The process's rows in the gathered batch's order (TRL shuffles them afterwards).
            output = super()._generate_and_score_completions(inputs)
            self.seen["scored"].append(output["advantages"].detach().clone())
            return output

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            rewards = super()._calculate_rewards(*args, **kwargs)
            self.seen["rewards"].append(rewards.detach().clone())
            return rewards

        def _log_iama(self, mode: str, advantages: torch.Tensor, values: torch.Tensor,
                      lam: torch.Tensor) -> None:
            self.seen["lambda"].append(lam.detach().clone())
            super()._log_iama(mode, advantages, values, lam)

        def _compute_loss(self, model: Any, inputs: dict) -> torch.Tensor:
            self.seen["advantages"].append(inputs["advantages"].detach().clone())
            self.seen["completions"].append(inputs["completion_ids"].clone())
            loss = super()._compute_loss(model, inputs)
            if getattr(self, "loss_impl", None) is not None:  # TRL's loss on the same inputs
                metrics = self._metrics["train"]
                ours = {k: metrics[k][-1] for k in SEQUENCE_EXTREMES if metrics[k]}
                impl, self.loss_impl = self.loss_impl, None
                try:
                    theirs = super()._compute_loss(model, inputs)
                finally:
                    self.loss_impl = impl
                self.seen["loss"].append((loss.detach().clone(), theirs.detach().clone()))
                self.seen["extremes"].append((ours, {k: metrics[k][-1] for k in ours}))
            return loss

    return Spy


def _run(base: type, model_dir: Path, out: Path, overrides: dict | None = None,
         **kwargs: Any) -> dict[str, list]:
    tokenizer = build_tiny_tokenizer()
    config = _config(out, per_device_train_batch_size=PER_PROCESS, num_generations=GROUP,
                     **(overrides or {}))
    trainer = _spy(base)(
        model=str(model_dir), reward_funcs=[short, long], args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
        **kwargs,
    )
    trainer.train()
    assert trainer.accelerator.num_processes == WORLD
    return trainer.seen


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    out = Path(out_dir) / f"rank{rank}"
    model_dir = Path(out_dir) / "tiny"
    w = [0.25, 0.75]
    try:
        results = {
            "trl": _run(trl.GRPOTrainer, model_dir, out / "trl", {"reward_weights": w}),
            "mean": _run(IAMAGRPOTrainer, model_dir, out / "mean", objective=Objective(
                [Criterion("long", Mean()), Criterion("short", Mean())], WeightedSum(w[::-1]))),
            "best_of": _run(IAMAGRPOTrainer, model_dir, out / "best_of",
                            {"loss_type": "dapo", "beta": 0.1},  # TRL's default bias-corrected KL
                            objective=BEST_OF, loss_impl="auto"),
            # GSPO: the per-sequence clip extremes are gathered over the processes
            "gspo": _run(IAMAGRPOTrainer, model_dir, out / "gspo",
                         {"importance_sampling_level": "sequence", "max_steps": 2, "num_iterations": 2,
                          "learning_rate": 5e-2},
                         objective=BEST_OF, loss_impl="auto"),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        # accelerate leaves the gloo process group up; torn down at interpreter exit, its threads
        # can abort the process ("terminate called without an active exception").
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, list]]]:
    out = tmp_path_factory.mktemp("trl_ddp")
    # Saved here, once: TRL builds the policy and the reference model (beta > 0) from this path.
    build_tiny_model(build_tiny_tokenizer(), seed=0, max_positions=64).save_pretrained(out / "tiny")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_each_process_trains_on_trls_own_advantages_with_mean_criteria(ranks) -> None:
    for rank in ranks:
        plain, ours = rank["trl"], rank["mean"]
        assert len(plain["advantages"]) == len(ours["advantages"]) == 1
        torch.testing.assert_close(ours["completions"][0], plain["completions"][0], rtol=0, atol=0)
        assert ours["advantages"][0].shape == (PER_PROCESS,)
        torch.testing.assert_close(ours["advantages"][0], plain["advantages"][0], rtol=1e-5, atol=1e-5)
    # The two processes sampled different completions: the check above is per process.
    assert not torch.equal(ranks[0]["mean"]["completions"][0], ranks[1]["mean"]["completions"][0])


def test_the_slices_put_together_are_the_whole_batch_advantages(ranks) -> None:
    runs = [rank["best_of"] for rank in ranks]
    gathered = runs[0]["rewards"][0]
    assert gathered.shape == (WORLD * PER_PROCESS, 2)
    torch.testing.assert_close(runs[1]["rewards"][0], gathered, rtol=0, atol=0)
    torch.testing.assert_close(runs[1]["lambda"][0], runs[0]["lambda"][0], rtol=0, atol=0)
    expected, out = flat_group_advantages(gathered.double(), GROUP, BEST_OF, ["short", "long"],
                                          impl="reference")
    torch.testing.assert_close(runs[0]["lambda"][0].double(), out.criterion_weights, rtol=1e-5, atol=1e-6)
    assert 0.05 < float(out.criterion_weights[0]) < 0.95  # lambda mixes the criteria
    # A straddling group: 2 of its 4 rows in each process, so no process could score it alone.
    assert expected[GROUP:2 * GROUP].abs().max() > 0
    local = torch.cat([run["scored"][0] for run in runs]).double()
    for run in runs:  # what the loss trained on: the same rows, in TRL's shuffled order
        torch.testing.assert_close(run["advantages"][0].sort().values, run["scored"][0].sort().values,
                                   rtol=0, atol=0)
    torch.testing.assert_close(local, expected, rtol=1e-5, atol=1e-5)


def test_loss_impl_gives_trls_gspo_loss_and_extremes_in_each_process(ranks) -> None:
    for rank in ranks:
        run = rank["gspo"]
        assert len(run["loss"]) == 2
        for ours, theirs in run["loss"]:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
        for ours, theirs in run["extremes"]:
            assert set(ours) == set(SEQUENCE_EXTREMES) and ours == theirs


def test_loss_impl_gives_trls_dapo_loss_in_each_process(ranks) -> None:
    for rank in ranks:
        losses = rank["best_of"]["loss"]
        assert len(losses) == 1
        ours, theirs = losses[0]
        assert theirs.abs() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
