"""Rollouts: sampling layout and reproducibility, log-probs against generate's own logits, scoring."""

from __future__ import annotations

import math

import pytest
import torch

from iama.rollout import HFGenerator, Rollout, first_eos_mask, score, sequence_logprobs
from iama.tiny import build_tiny_model, build_tiny_tokenizer
from iama_kernels import BestOfN, Criterion, Mean, Objective


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's operations are so small that a second thread only adds synchronisation
    (and contention on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

PROMPTS = ["tell a story about the cat", "write", "say one two"]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=0), tokenizer


def test_generate_layout_and_masks(tiny):
    model, tokenizer = tiny
    G = 3
    r = HFGenerator(model, tokenizer).generate(PROMPTS, G, max_new_tokens=12,
                                               generator=torch.Generator().manual_seed(0))
    N = len(PROMPTS) * G
    assert r.group_size == G and r.num_groups == len(PROMPTS)
    assert r.prompts == [p for p in PROMPTS for _ in range(G)]  # group-major
    assert r.prompt_ids.shape[0] == N and r.completion_ids.shape[0] == N
    assert r.completion_ids.shape[1] <= 12
    # Left padding: each row's real prompt tokens are the tokenizer's encoding, at the right end.
    for i, p in enumerate(r.prompts):
        ids = tokenizer(p)["input_ids"]
        assert r.prompt_mask[i].sum() == len(ids)
        assert r.prompt_ids[i, -len(ids):].tolist() == ids
        assert not r.prompt_mask[i, :r.prompt_ids.shape[1] - len(ids)].any()
    eos = tokenizer.eos_token_id
    for i in range(N):
        m = r.completion_mask[i]
        ids = r.completion_ids[i]
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # a prefix
        assert eos not in ids[:n - 1].tolist()  # no EOS before the last masked token
        if n < r.completion_ids.shape[1]:
            assert ids[n - 1] == eos  # it ended with EOS before the budget
        assert (ids[n:] == tokenizer.pad_token_id).all()
        assert r.completions[i] == tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)


def test_generate_reproducible_under_seed(tiny):
    model, tokenizer = tiny
    gen = HFGenerator(model, tokenizer)
    state = torch.get_rng_state()
    a = gen.generate(PROMPTS, 4, max_new_tokens=10, generator=torch.Generator().manual_seed(7))
    b = gen.generate(PROMPTS, 4, max_new_tokens=10, generator=torch.Generator().manual_seed(7))
    c = gen.generate(PROMPTS, 4, max_new_tokens=10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids[:, :a.completion_ids.shape[1]]) \
        or a.completion_ids.shape != c.completion_ids.shape
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was left alone
    # Without a generator the global RNG is used: reproducible under torch.manual_seed.
    torch.manual_seed(3)
    d = gen.generate(PROMPTS, 2, max_new_tokens=10)
    torch.manual_seed(3)
    e = gen.generate(PROMPTS, 2, max_new_tokens=10)
    assert torch.equal(d.completion_ids, e.completion_ids)


def test_greedy_gives_identical_group_members(tiny):
    model, tokenizer = tiny
    r = HFGenerator(model, tokenizer).generate(PROMPTS, 3, max_new_tokens=6, temperature=0.0)
    ids = r.completion_ids.reshape(len(PROMPTS), 3, -1)
    assert (ids == ids[:, :1]).all()


def test_tokenizer_without_pad_token():
    tokenizer = build_tiny_tokenizer(pad_token=False)
    assert tokenizer.pad_token_id is None
    model = build_tiny_model(tokenizer, seed=1)
    r = HFGenerator(model, tokenizer).generate(PROMPTS, 2, max_new_tokens=5,
                                               generator=torch.Generator().manual_seed(0))
    assert tokenizer.pad_token_id is None  # not modified
    assert (r.prompt_ids[~r.prompt_mask] == tokenizer.eos_token_id).all()  # EOS pads
    assert torch.isfinite(sequence_logprobs(model, r)[r.completion_mask]).all()


def test_sequence_logprobs_match_generate_logits(tiny):
    """Oracle: the log-softmax of the logits that generate itself sampled from (left-padded)."""
    model, tokenizer = tiny
    gen = HFGenerator(model, tokenizer)
    ids, mask = gen.encode_prompts(PROMPTS)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=9, do_sample=True,
                         top_k=0, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id])
    completion = out.sequences[:, ids.shape[1]:]
    expected = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, completion.unsqueeze(-1))[..., 0]
    cmask = first_eos_mask(completion, [tokenizer.eos_token_id])
    rollout = Rollout(PROMPTS, ids, mask, completion, cmask, [""] * len(PROMPTS), 1)
    for batch_size in (None, 2):
        got = sequence_logprobs(model, rollout, batch_size=batch_size)
        assert got.shape == completion.shape and got.dtype == torch.float32
        torch.testing.assert_close(got[cmask], expected[cmask], atol=1e-5, rtol=0)
    # Temperature divides the logits.
    hot = sequence_logprobs(model, rollout, temperature=2.0)
    attention = torch.cat([mask, torch.ones_like(cmask)], 1).long()
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, completion], 1), attention_mask=attention,
                     position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits[:, ids.shape[1] - 1:-1]
    want = (full / 2).log_softmax(-1).gather(-1, completion.unsqueeze(-1))[..., 0]
    torch.testing.assert_close(hot[cmask], want[cmask], atol=1e-5, rtol=0)


def test_first_eos_mask_and_select_groups():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    m = first_eos_mask(ids, [2])
    assert m.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert first_eos_mask(ids, [2, 8]).tolist()[1] == [True] * 4
    r = Rollout(["a", "a", "b", "b"], torch.arange(4).reshape(4, 1), torch.ones(4, 1, dtype=torch.bool),
                torch.arange(8).reshape(4, 2), torch.ones(4, 2, dtype=torch.bool), ["0", "1", "2", "3"], 2)
    s = r.select_groups([1])
    assert s.prompts == ["b", "b"] and s.completions == ["2", "3"] and s.prompt_ids[:, 0].tolist() == [2, 3]


def _rollout(prompts: list[str], G: int) -> Rollout:
    N = len(prompts) * G
    lengths = torch.arange(N) % 5 + 1
    cmask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
    return Rollout([p for p in prompts for _ in range(G)], torch.ones(N, 1, dtype=torch.long),
                   torch.ones(N, 1, dtype=torch.bool), torch.where(cmask, 4, 0), cmask,
                   [f"c{i}" for i in range(N)], G)


def test_score_stacks_criteria_in_objective_order():
    r = _rollout(["p0", "p1"], 3)
    objective = Objective([Criterion("len", BestOfN(2)), Criterion("neg", Mean())])
    fns = {"neg": lambda p, c, ids: torch.tensor([-float(len(i)) for i in ids]),
           "len": lambda p, c, ids: [float(len(i)) for i in ids]}  # a list is accepted too
    out = score(r, fns, objective)
    lengths = r.completion_mask.sum(-1).float().reshape(2, 3)
    assert out.shape == (2, 3, 2) and out.dtype == torch.float32
    assert torch.equal(out[..., 0], lengths) and torch.equal(out[..., 1], -lengths)


@pytest.mark.parametrize("case", ["raises", "shape", "nan", "inf", "missing"])
def test_score_errors_name_criterion_and_prompt(case):
    r = _rollout(["first prompt", "second prompt"], 2)
    objective = Objective([Criterion("good"), Criterion("bad")])

    def bad(prompts, completions, ids):
        if case == "raises":
            if "second prompt" in prompts:
                raise RuntimeError("boom")
            return torch.zeros(len(ids))
        if case == "shape":
            return torch.zeros(len(ids) + 1)
        v = torch.zeros(len(ids))
        v[3] = math.nan if case == "nan" else math.inf
        return v

    fns = {"good": lambda p, c, ids: torch.zeros(len(ids))}
    if case != "missing":
        fns["bad"] = bad
    with pytest.raises(ValueError) as info:
        score(r, fns, objective)
    message = str(info.value)
    assert "'bad'" in message
    if case in ("nan", "inf", "raises"):
        assert "'second prompt'" in message  # the offending prompt
    if case in ("nan", "inf"):
        assert "row 3" in message
    if case == "shape":
        assert "[4]" in message
    if case == "raises":
        assert "boom" in message and isinstance(info.value.__cause__, RuntimeError)
