"""verl's advantage estimators against iama's, called the way verl's ``compute_advantage`` calls them.

Inputs as verl's driver holds them: ``token_level_rewards`` and ``response_mask`` ``[bs, T]``
float32 / int64 on the CPU (the reward of each response on its last token), and ``index`` a numpy
object array of prompt uid strings, the ``B`` prompts' ``G`` responses in shuffled order (verl
keeps them interleaved after balancing). Every estimator is timed on the same tensors in the
same run, the estimators taking turns call by call: verl's ``grpo`` (a Python loop over rows)
and ``grpo_vectorized``, and iama's ``"iama"`` estimator with ``Mean()`` (the same advantages as
verl's GRPO), ``BestOfN(4)`` (plug-in and unbiased) and ``SoftBestOfN(0.5)``, with
``impl="auto"`` (the C++ kernel) and, for BestOfN(4), ``impl="reference"``. Before timing,
iama's Mean advantages are checked against verl's GRPO. GB/s counts the bytes every estimator
must move: the rewards and the mask read once, the advantages written once.

Needs verl (``make`` installs 0.9.1 into ``.venv``): ``.venv/bin/python benchmarks/verl_estimators.py``.
Results go to ``benchmarks/results/verl_estimators.jsonl`` (device and versions included); the
table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the checkout's own packages first (a copy of this script in another worktree measures that one)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Measurement, interleaved, record_times, report

from iama.integrations.verl import advantage_estimator
from iama_kernels import BestOfN, Mean, SoftBestOfN


def verl_like_batch(n_prompts: int, group: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bs = n_prompts * group
    prompt = torch.arange(n_prompts).repeat_interleave(group)[torch.randperm(bs, generator=g)]
    lengths = torch.randint(length // 4, length + 1, (bs,), generator=g)
    mask = (torch.arange(length) < lengths.unsqueeze(1)).to(torch.int64)
    token = torch.zeros(bs, length)
    token[torch.arange(bs), lengths - 1] = torch.randint(0, 11, (bs,), generator=g).float() / 10
    uid = np.array([f"{int(p):08x}-uid" for p in prompt], dtype=object)
    return token, mask, uid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="512x8x512,128x16x1024,64x64x256",
                        help="comma-separated BxGxT: prompts x responses per prompt x response length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100, help="calls of each estimator, in turns")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from verl.trainer.ppo import core_algos

    rows: list[Measurement] = []
    for spec in args.shapes.split(","):
        n_prompts, group, length = (int(x) for x in spec.split("x"))
        token, mask, uid = verl_like_batch(n_prompts, group, length)
        shape = f"B={n_prompts} G={group} T={length}"
        grpo = core_algos.get_adv_estimator_fn("grpo")
        ours = advantage_estimator(Mean(), eps=1e-6)
        torch.testing.assert_close(ours(token, mask, uid)[0], grpo(token, mask, uid)[0],
                                   rtol=1e-5, atol=1e-5)
        candidates = {
            "verl grpo": grpo,
            "verl grpo_vectorized": core_algos.get_adv_estimator_fn("grpo_vectorized"),
            "iama Mean": ours,
            "iama BestOfN(4)": advantage_estimator(BestOfN(4)),
            "iama BestOfN(4) unbiased": advantage_estimator(BestOfN(4), estimator="unbiased"),
            "iama SoftBestOfN(0.5)": advantage_estimator(SoftBestOfN(0.5)),
            "iama BestOfN(4) reference": advantage_estimator(BestOfN(4), impl="reference"),
        }
        times = interleaved({name: functools.partial(fn, token, mask, uid)
                             for name, fn in candidates.items()}, args.rounds)
        # Bytes verl's tensors oblige an estimator to move: read the rewards and the mask once,
        # write the advantages once (returns is the same tensor).
        moved = token.numel() * token.element_size() * 2 + mask.numel() * mask.element_size()
        record_times(rows, "verl advantage estimator", shape, times, bytes_moved=moved,
                     extra={"threads": args.threads, "verl": importlib.metadata.version("verl")})
    report(rows, "verl_estimators", "verl grpo", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
