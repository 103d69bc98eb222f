"""``iama demo length``: the paper's length task (Sec. 6.1), scaled down to run on a CPU.

Two criteria reward a completion's length in tokens, ``r_i = -((len - L_i) / scale)^2`` with a
short and a long target. From one base model (a tiny Llama-style model given a broad length
distribution by a supervised warm-up on texts of uniformly random length; RL only reshapes what
the base can sample), two policies are trained with the same seed:

* GRPO: the averaged reward served by one sample (``Mean`` on both criteria, weights 1/2, 1/2);
* IAMA: both criteria served by ``BestOfN(4)`` at inference (non-linear GRPO).

GRPO learns one medium length; IAMA keeps mass near both targets, so that Best-of-4 at inference
can pick a completion close to whichever target is asked for: its Best-of-4 rewards are higher
on both criteria. Writes length histograms, a Pareto plot of the Best-of-4 rewards and
``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from iama_kernels.objectives import BestOfN, Criterion, Mean, Objective, WeightedSum

from ..rollout import HFGenerator
from ..trainer import NonLinearGRPOTrainer, TrainerConfig

# Every prompt has the same number of tokens, so a position in the sequence is a position in the
# completion: the tiny model then only has to learn when to stop, not where the prompt ended.
TOPICS = ("cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "sky", "sea")
PROMPT_TEMPLATE = "tell a story about the {}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo-length", help="output folder (default: %(default)s)")
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: a 2-layer Llama-style model built locally (default); smollm2: "
                             "SmolLM2 from a local GGUF file through iama.pretrained")
    parser.add_argument("--steps", type=int, default=150, help="RL steps per policy (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=400,
                        help="supervised warm-up steps of the base model (default: %(default)s)")
    parser.add_argument("--eval-samples", type=int, default=512,
                        help="completions sampled per policy at evaluation (default: %(default)s)")
    parser.add_argument("--short", type=float, default=12, help="short target length in tokens")
    parser.add_argument("--long", type=float, default=36, help="long target length in tokens")
    parser.add_argument("--scale", type=float, default=64, help="length scale of the reward")
    parser.add_argument("--n", type=int, default=4, help="BestOfN n at inference (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=1e-4)
    parser.add_argument("--estimator", choices=("plugin", "unbiased"), default="plugin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impl", default="auto", help="backend of the loss op (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the tiny model, whose operations are so "
                             "small that more threads mostly add synchronisation; torch's default else)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prompts(tokenizer: Any = None) -> list[str]:
    """The training and evaluation prompts (for a chat model, wrapped in its chat template)."""
    prompts = [PROMPT_TEMPLATE.format(t) for t in TOPICS]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        from ..pretrained import chat_prompts

        return chat_prompts(tokenizer, [p.capitalize() + "." for p in prompts])
    return prompts


def build_base(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer the policies start from (warmed up when it is the tiny model)."""
    if args.model == "smollm2":
        try:
            from ..pretrained import load_smollm2
        except ImportError as error:
            raise SystemExit("--model smollm2 needs iama.pretrained (SmolLM2 GGUF loading), which "
                             "is not available in this installation") from error
        try:
            return load_smollm2()
        except (ModuleNotFoundError, FileNotFoundError) as error:
            raise SystemExit(f"--model smollm2: {error}") from error
    from ..tiny import WORDS, build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=args.seed, max_positions=64 + args.max_new_tokens)
    completion_words = [w for w in WORDS if w not in ("tell", "story", "about")]
    warm_up(model, tokenizer, _prompts(), completion_words, args)
    return model, tokenizer


def warm_up(model: torch.nn.Module, tokenizer: Any, prompts: list[str], words: list[str],
            args: argparse.Namespace, batch_size: int = 64, lr: float = 3e-3) -> list[float]:
    """Supervised warm-up on ``prompt + k random words + EOS`` with ``k + 1`` (the completion's
    length in tokens) uniform on ``[1, max_new_tokens]``; the loss is on completion tokens only.
    Returns the loss of every step."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(words))
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / max(1, args.warmup_steps)))
    losses = []
    model.train()
    for _ in range(args.warmup_steps):
        rows, labels = [], []
        which = torch.randint(len(prompts), (batch_size,), generator=gen).tolist()
        n_words = torch.randint(0, args.max_new_tokens, (batch_size,), generator=gen).tolist()
        for p, k in zip(which, n_words, strict=True):
            completion = [*word_ids[torch.randint(len(words), (k,), generator=gen)].tolist(), eos]
            rows.append(prompt_ids[p] + completion)
            labels.append([-100] * len(prompt_ids[p]) + completion)
        width = max(len(r) for r in rows)
        # Right padding: positions are the natural ones, as generate computes them from the mask.
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def length_rewards(args: argparse.Namespace) -> dict[str, Any]:
    """``{"short": r_1, "long": r_2}``: ``-((len - L_i) / scale)^2``, len in tokens (EOS included)."""
    from ..rewards import LengthReward

    return {"short": LengthReward(args.short, args.scale, unit="tokens"),
            "long": LengthReward(args.long, args.scale, unit="tokens")}


def objectives(args: argparse.Namespace) -> dict[str, Objective]:
    half = WeightedSum([0.5, 0.5])
    return {
        "grpo": Objective([Criterion("short", Mean()), Criterion("long", Mean())], half),
        "iama": Objective([Criterion("short", BestOfN(args.n)), Criterion("long", BestOfN(args.n))], half),
    }


def evaluate_policy(model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace,
                    seed: int) -> dict[str, Any]:
    """Sample ``eval_samples`` completions (spread over the prompts) and estimate each
    criterion's BestOfN(n) reward with the unbiased estimator over groups of samples."""
    from ..evaluation import Evaluator

    prompts = _prompts(tokenizer)
    per_prompt = max(args.n, -(-args.eval_samples // len(prompts)))
    evaluator = Evaluator(
        Objective([Criterion("short", BestOfN(args.n)), Criterion("long", BestOfN(args.n))]),
        length_rewards(args), samples=per_prompt, max_new_tokens=args.max_new_tokens,
        estimator="unbiased",
    )
    result = evaluator(HFGenerator(model, tokenizer), prompts, rng=torch.Generator().manual_seed(seed))
    lengths = result.lengths.tolist()
    return {"lengths": lengths, f"bon{args.n}": result.values, "stderr": result.stderrs}


def train_policy(base: torch.nn.Module, tokenizer: Any, objective: Objective, name: str,
                 args: argparse.Namespace) -> tuple[torch.nn.Module, float]:
    """RL from a copy of ``base``; returns the policy and the training time in seconds."""
    policy = copy.deepcopy(base).requires_grad_(True)
    config = TrainerConfig(
        group_size=args.group_size, prompts_per_step=args.prompts_per_step,
        max_new_tokens=args.max_new_tokens, learning_rate=args.lr, max_steps=args.steps,
        beta=args.beta, estimator=args.estimator, seed=args.seed, impl=args.impl,
        output_dir=str(Path(args.out) / name), progress=not args.no_progress,
        max_grad_norm=1.0,
    )
    trainer = NonLinearGRPOTrainer(policy, tokenizer, objective, length_rewards(args), _prompts(tokenizer),
                                   config, ref_model=base)
    start = time.perf_counter()
    trainer.train()
    return policy, time.perf_counter() - start


def _near(lengths: list[int], target: float, width: float) -> float:
    return sum(abs(v - target) <= width for v in lengths) / len(lengths)


def run(args: argparse.Namespace) -> int:
    from .. import plots

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads if args.threads is not None else (1 if args.model == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    n = args.n
    start = time.perf_counter()
    print(f"length task: targets {args.short:g} and {args.long:g} tokens, scale {args.scale:g} (the "
          f"paper's 50/150 tokens and scale 256, scaled down); {args.steps} steps of "
          f"{args.prompts_per_step} groups of {args.group_size}, AdamW lr {args.lr:g}, beta {args.beta:g}")
    base, tokenizer = build_base(args)
    warmed = f", {args.warmup_steps} warm-up steps" if args.model == "tiny" else ""
    print(f"base model ready ({time.perf_counter() - start:.0f} s{warmed})")
    for p in base.parameters():
        p.requires_grad_(False)

    results: dict[str, Any] = {"targets": {"short": args.short, "long": args.long}}
    results["base"] = evaluate_policy(base, tokenizer, args, seed=args.seed + 100)
    times = {}
    for name, objective in objectives(args).items():
        policy, times[name] = train_policy(base, tokenizer, objective, name, args)
        for p in policy.parameters():
            p.requires_grad_(False)
        results[name] = evaluate_policy(policy, tokenizer, args, seed=args.seed + 100)
        print(f"{name}: trained in {times[name]:.0f} s ({objective.transforms[0]!r} on both criteria)")

    results["settings"] = {
        "steps": args.steps, "warmup_steps": args.warmup_steps, "group_size": args.group_size,
        "prompts_per_step": args.prompts_per_step, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
        "beta": args.beta, "scale": args.scale, "n": n, "estimator": args.estimator, "seed": args.seed,
        "model": args.model, "train_seconds": times,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    key = f"bon{n}"
    targets = {"short": args.short, "long": args.long}
    plots.length_histograms({k: results[k]["lengths"] for k in ("base", "grpo", "iama")}, targets=targets,
                            path=out / "lengths.png", title="completion lengths at evaluation")
    policies = ("base", "grpo", "iama")
    plots.pareto_plot({k: (results[k][key]["short"], results[k][key]["long"]) for k in policies},
                      xlabel=f"BestOfN({n}) reward, short target", ylabel=f"BestOfN({n}) reward, long target",
                      path=out / "rewards.png", title=f"Best-of-{n} rewards (higher is better)",
                      errors={k: (results[k]["stderr"]["short"], results[k]["stderr"]["long"])
                              for k in ("base", "grpo", "iama")})

    width = max(2.0, (args.long - args.short) / 8)
    print(f"\n{'policy':<8}{'BoN' + str(n) + ' short':>14}{'BoN' + str(n) + ' long':>14}"
          f"{'mean len':>10}{'near short':>12}{'near long':>11}")
    for k in ("base", "grpo", "iama"):
        r, lengths = results[k], results[k]["lengths"]
        print(f"{k:<8}{r[key]['short']:>14.5f}{r[key]['long']:>14.5f}{sum(lengths) / len(lengths):>10.1f}"
              f"{_near(lengths, args.short, width):>12.0%}{_near(lengths, args.long, width):>11.0%}")
    print(f"('near' = within {width:g} tokens; rewards are -((len - target)/{args.scale:g})^2, 0 is best)")
    better = all(results["iama"][key][c] > results["grpo"][key][c] for c in ("short", "long"))
    print(f"IAMA's Best-of-{n} rewards are {'higher' if better else 'NOT higher'} than GRPO's "
          "on both criteria.")
    print(f"wrote {out / 'results.json'}, {out / 'lengths.png'}, {out / 'rewards.png'} "
          f"({time.perf_counter() - start:.0f} s in all)")
    return 0
