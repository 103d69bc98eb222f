"""Two CPU processes (gloo) give the same update as one process on the same global batch.

A scripted generator makes the completions depend only on the prompt and the step, so that both
runs see exactly the same global batch; the rest (scoring, all-reduced lambda and token counts,
the loss normalisers, DDP's gradient averaging) is the real trainer.
"""

from __future__ import annotations

import socket
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iama.rollout import HFGenerator, Rollout, first_eos_mask
from iama.tiny import build_tiny_model, build_tiny_tokenizer
from iama.trainer import NonLinearGRPOTrainer, TrainerConfig
from iama_kernels import BestOfN, Criterion, Mean, Objective, SmoothMin


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's operations are so small that a second thread only adds synchronisation
    (and contention on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Same token count for every prompt: left padding is then identical in both runs.
PROMPTS = [f"tell a story about the {w}" for w in ("cat", "dog", "bird", "fish", "tree", "sun")]
STEPS = 2


class ScriptedGenerator:
    """Completions drawn from a generator seeded by (prompt, call number): independent of which
    rank or batch the prompt lands in."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encoder = HFGenerator(build_tiny_model(tokenizer), tokenizer)
        self.calls = 0

    def generate(self, prompts, group_size, *, max_new_tokens, temperature=1.0, top_p=1.0, generator=None):
        self.calls += 1
        ids, mask = self.encoder.encode_prompts(prompts)
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()) + 7919 * self.calls)
            for _ in range(group_size):
                n = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
                row = torch.randint(4, len(self.tokenizer), (max_new_tokens,), generator=g)
                if n < max_new_tokens:
                    row[n - 1] = self.tokenizer.eos_token_id
                rows.append(row)
        completion = torch.stack(rows)
        cmask = first_eos_mask(completion, [self.tokenizer.eos_token_id])
        completion = completion.masked_fill(~cmask, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode([r[m].tolist() for r, m in zip(completion, cmask, strict=True)],
                                            skip_special_tokens=True)
        return Rollout([p for p in prompts for _ in range(group_size)], ids.repeat_interleave(group_size, 0),
                       mask.repeat_interleave(group_size, 0), completion, cmask, texts, group_size)


def _length(target):
    return lambda prompts, completions, ids: torch.tensor([-((len(i) - target) / 8.0) ** 2 for i in ids])


def _train(out_dir: str) -> dict[str, torch.Tensor]:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0, max_positions=64)
    # SmoothMin: lambda depends on the batch-level values, which must be all-reduced.
    objective = Objective([Criterion("short", BestOfN(3)), Criterion("long", Mean())],
                          SmoothMin([0.5, 0.5], 8.0))
    # SGD with lr 1: the weight change is the gradient itself, so the comparison is tight.
    config = TrainerConfig(group_size=4, prompts_per_step=4, max_new_tokens=10, optimizer="sgd",
                           learning_rate=1.0, max_grad_norm=None, beta=0.05, loss_type="token",
                           max_steps=STEPS, output_dir=out_dir, progress=False)
    trainer = NonLinearGRPOTrainer(model, tokenizer, objective, {"short": _length(3), "long": _length(9)},
                                   PROMPTS, config, generator=ScriptedGenerator(tokenizer))
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        weights = _train(out_dir)
        if rank == 0:
            torch.save(weights, f"{out_dir}/weights.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp" / "weights.pt")
    single = _train(str(tmp_path / "single"))
    base = build_tiny_model(build_tiny_tokenizer(), seed=0, max_positions=64)
    moved = max(float((single[k] - v.detach()).abs().max()) for k, v in base.named_parameters())
    assert moved > 1e-2  # the two steps did change the weights
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
