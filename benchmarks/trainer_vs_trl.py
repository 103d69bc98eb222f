"""One training step on the tiny model: iama's NonLinearGRPOTrainer against TRL's GRPOTrainer.

Both trainers get the same model (``iama.tiny``, 2 layers, width 64, random weights from the same
seed), the same prompts, and the same settings: ``B`` prompts x ``G`` completions per step, up to
``max_new_tokens`` sampled at temperature 1 (top-p 1, no top-k), two length rewards averaged with
weights 1/2 (TRL: ``reward_weights`` with ``sum_then_normalize``; iama: ``WeightedSum([0.5, 0.5])``
of two ``Mean()`` criteria, which is the same plain-GRPO advantage), group-scaled advantages, loss
type ``grpo``, clip 0.2, one optimizer update per generation, AdamW (non-fused) at a constant
learning rate, gradient clipping at 1.0, no gradient checkpointing, ``beta`` as given (default 0:
no reference model). A third row times iama with ``BestOfN(4)`` on both criteria (the IAMA
objective; same work plus the non-linear first variation).

A step is timed from its start (prompt sampling and generation included) to the end of the
optimizer update: iama around ``trainer.train_step()``, TRL between the ``on_step_begin`` and
``on_step_end`` callbacks. The trainers take turns step by step (each iama trainer runs one step
right after each TRL step), so that a change in machine load hits all of them alike. The first
``--warmup`` steps are dropped; the median of the next ``--steps`` is reported, with the ratio
iama / TRL (below 1 means iama is faster). The mean completion length is recorded next to each
time because generation dominates a step.

TRL comes with iama's ``trl`` extra, which ``make`` installs into ``.venv``
(``.venv/bin/python benchmarks/trainer_vs_trl.py --threads 1,2``). In another environment,
install the CPU torch first so that pip never pulls a CUDA build::

    python3 -m venv /tmp/venv-trl
    /tmp/venv-trl/bin/pip install -c constraints.txt torch==2.13.0
    /tmp/venv-trl/bin/pip install -c constraints.txt -e ".[triton,trl]"
    /tmp/venv-trl/bin/python benchmarks/trainer_vs_trl.py --threads 1,2

Results go to ``benchmarks/results/trainer_vs_trl.jsonl`` (device and versions included); the
table is printed last.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the checkout's own packages first (a copy of this script in another worktree measures that one)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import Measurement, format_table, write_results

from iama import BestOfN, Criterion, Mean, Objective, WeightedSum
from iama.rewards import LengthReward
from iama.tiny import build_tiny_model, build_tiny_tokenizer
from iama.trainer import NonLinearGRPOTrainer, TrainerConfig
from iama_kernels import _extension

SETUP = __doc__[__doc__.index("    python3 -m venv"):__doc__.index("Results go")].rstrip()
TRL = "trl GRPOTrainer"
TOPICS = ["cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "sky", "sea"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per trainer (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (default %(default)s)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--impl", default="auto", help="iama loss backend (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                   help="comma-separated torch thread counts to run in turn, 0 = torch's default "
                        "(e.g. 1,2; one thread steadies timings on a busy machine)")
    return p.parse_args(argv)


def _prompts() -> list[str]:
    return [f"tell a story about the {t}" for t in TOPICS]


def _rewards() -> dict[str, LengthReward]:
    return {"short": LengthReward(8, 16), "long": LengthReward(24, 16)}


def _summary(impl: str, shape: str, times_s: list[float], extra: dict[str, Any]) -> Measurement:
    ms = [t * 1e3 for t in times_s]
    q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    return Measurement("grpo_train_step", impl, shape, statistics.median(ms), q[1], q[7], len(ms),
                       extra=extra)


def build_iama(args: argparse.Namespace, objective: Objective, out: Path) -> NonLinearGRPOTrainer:
    """An iama trainer on a fresh tiny model (same seed, so the same weights as TRL's)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=args.seed, max_positions=64 + args.max_new_tokens)
    config = TrainerConfig(
        group_size=args.group_size, prompts_per_step=args.prompts_per_step,
        max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, learning_rate=args.lr,
        max_steps=args.warmup + args.steps, beta=args.beta, eps_low=0.2, eps_high=0.2, loss_type="grpo",
        scale="group", max_grad_norm=1.0, seed=args.seed, impl=args.impl, output_dir=str(out),
        progress=False, device="cpu",
    )
    return NonLinearGRPOTrainer(model, tokenizer, objective, _rewards(), _prompts(), config)


def run_interleaved(
    args: argparse.Namespace, iama: dict[str, NonLinearGRPOTrainer], out: Path
) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """Run TRL's GRPOTrainer; after each of its steps (outside its timed span) run one step of every
    iama trainer, so that all of them see the same machine load. Returns ``{name: (step wall times
    in s, mean completion lengths, step CPU times of the process in s)}`` without the warm-up
    steps. TRL is imported here: it lives only
    in the benchmark environment."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=args.seed, max_positions=64 + args.max_new_tokens)
    rewards = _rewards()

    def reward_fn(fn: LengthReward):
        def call(prompts, completions, completion_ids, **kwargs):
            return fn(prompts, completions, completion_ids).tolist()

        call.__name__ = f"length_{fn.target:g}"
        return call

    results: dict[str, tuple[list[float], list[float], list[float]]] = {
        name: ([], [], []) for name in (TRL, *iama)}

    class Interleave(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            results[TRL][0].append(time.perf_counter() - self.start[0])
            results[TRL][2].append(time.process_time() - self.start[1])
            for name, trainer in iama.items():
                start = (time.perf_counter(), time.process_time())
                record = trainer.train_step()
                results[name][0].append(time.perf_counter() - start[0])
                results[name][2].append(time.process_time() - start[1])
                results[name][1].append(record["completion_length/mean"])

    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=1, seed=args.seed, data_seed=args.seed,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.group_size,
        num_generations=args.group_size, steps_per_generation=1, gradient_accumulation_steps=1,
        num_iterations=1, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,
        beta=args.beta, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        reward_weights=[0.5, 0.5], multi_objective_aggregation="sum_then_normalize",
    )
    dataset = Dataset.from_dict({"prompt": _prompts()})
    # TRL builds its reference model (beta > 0) with from_pretrained on the policy's name: give it
    # a local directory holding the same weights.
    model_dir = out / "tiny-model"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(model_dir)
    trainer = GRPOTrainer(model=str(model_dir),
                          reward_funcs=[reward_fn(rewards["short"]), reward_fn(rewards["long"])],
                          args=config, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[Interleave()])
    trainer.remove_callback(PrinterCallback)  # logs are kept in state.log_history, not printed
    trainer.train()
    results[TRL][1].extend(h["completions/mean_length"] for h in trainer.state.log_history
                           if "completions/mean_length" in h)
    w = args.warmup
    return {name: (times[w:], lengths[w:], cpu[w:]) for name, (times, lengths, cpu) in results.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        versions = {name: importlib.metadata.version(name) for name in ("trl", "transformers", "accelerate")}
    except importlib.metadata.PackageNotFoundError as error:
        print(f"TRL is not installed in this environment ({error}). Set up the benchmark "
              f"environment:\n{SETUP}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    half = WeightedSum([0.5, 0.5])
    objectives = {
        "iama Mean": Objective([Criterion("short", Mean()), Criterion("long", Mean())], half),
        "iama BestOfN(4)": Objective([Criterion("short", BestOfN(4)), Criterion("long", BestOfN(4))], half),
    }
    reason = _extension.unavailable_reason() if args.impl in ("auto", "cpu") else None
    # The C++ extension builds on first use; its failure reason can be a whole build log.
    backend = args.impl if args.impl != "auto" else (
        "cpu" if reason is None else "not cpu: " + str(reason).strip().splitlines()[0][:120])
    default_threads = torch.get_num_threads()
    rows: list[Measurement] = []
    ratios: list[str] = []
    for threads in args.threads:
        torch.set_num_threads(threads if threads > 0 else default_threads)
        shape = (f"B{args.prompts_per_step}xG{args.group_size} T{args.max_new_tokens} beta{args.beta:g} "
                 f"thr{torch.get_num_threads()}")
        with tempfile.TemporaryDirectory() as tmp:
            iama = {name: build_iama(args, objective, Path(tmp) / name.replace(" ", "_"))
                    for name, objective in objectives.items()}
            results = run_interleaved(args, iama, Path(tmp) / "trl")
        batch = []
        for name, (times, lengths, cpu) in results.items():
            extra = {"mean_completion_length": statistics.fmean(lengths) if lengths else None,
                     "step_times_ms": [round(t * 1e3, 2) for t in times],
                     "median_cpu_ms": statistics.median(cpu) * 1e3, "threads": torch.get_num_threads(),
                     "iama_loss_backend": backend, **versions}
            batch.append(_summary(name, shape, times, extra))
            print(f"[{shape}] {name}: median {batch[-1].median_ms:.1f} ms/step (CPU "
                  f"{extra['median_cpu_ms']:.1f} ms), mean completion length "
                  f"{extra['mean_completion_length']:.1f} tokens", flush=True)
        for r in batch[1:]:
            r.extra["ratio_vs_trl"] = r.median_ms / batch[0].median_ms
            r.extra["cpu_ratio_vs_trl"] = r.extra["median_cpu_ms"] / batch[0].extra["median_cpu_ms"]
            ratios.append(f"[{shape}] ratio {r.impl} / TRL = {r.extra['ratio_vs_trl']:.3f} wall, "
                          f"{r.extra['cpu_ratio_vs_trl']:.3f} CPU time (target <= 1.0)")
        rows += batch
    path = write_results(rows, "trainer_vs_trl")
    listed = ", ".join(f"{k} {v}" for k, v in versions.items())
    print(f"wrote {path}; torch {torch.__version__}, {listed}; iama loss backend: {backend}; "
          f"{args.steps} timed steps after {args.warmup} warm-up steps")
    print("\n".join(ratios))
    print(format_table(rows, baseline_impl=TRL))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
