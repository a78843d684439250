"""Seeded sampling is a property of the request, not of the batch it happens to share."""

from __future__ import annotations

import torch

from scalellm.engine.sampler import TOP_P_CANDIDATES, apply_penalties, apply_top_p, sample, uniform_from_counter
from scalellm.engine.sequence import SamplingParams, Sequence


def make_seq(params: SamplingParams, output: list[int] | None = None) -> Sequence:
    seq = Sequence("s", [1, 2, 3], params, on_output=lambda out: None)
    seq.output_ids = list(output or [])
    return seq


def test_counter_uniforms_are_uniform_and_deterministic():
    seeds = torch.full((20000,), 7, dtype=torch.long)
    u = uniform_from_counter(seeds, torch.arange(20000))
    assert torch.equal(u, uniform_from_counter(seeds, torch.arange(20000)))
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs((u < 0.1).float().mean().item() - 0.1) < 0.01


def test_same_seed_same_token_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    alone = sample(logits[:1], [make_seq(params)]).token_ids[0]
    others = [make_seq(SamplingParams(temperature=1.0, seed=i)) for i in range(5)]
    mixed = sample(logits[[1, 2, 0, 3, 4, 5]], others[:2] + [make_seq(params)] + others[2:])
    assert mixed.token_ids[2] == alone


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(3000, 3).clone()
    seqs = [make_seq(SamplingParams(temperature=1.0, seed=i)) for i in range(3000)]
    counts = torch.bincount(torch.tensor(sample(logits, seqs).token_ids), minlength=3).float() / 3000
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(500, 4).clone()
    top_k = [make_seq(SamplingParams(temperature=1.0, top_k=2, seed=i)) for i in range(500)]
    assert set(sample(logits, top_k).token_ids) == {0, 1}
    top_p = [make_seq(SamplingParams(temperature=1.0, top_p=0.6, seed=i)) for i in range(500)]
    assert set(sample(logits, top_p).token_ids) == {0, 1}  # 0.5 < 0.6, so the second is needed too


def test_top_p_keeps_the_nucleus_a_float64_sort_finds():
    """Rows of a 49k vocabulary whose nuclei end within the first candidates, within the second, and only in the
    whole sorted row: each keeps what sorting the row in float64 keeps, but for tokens whose mass ahead is within
    float32's rounding of top_p."""
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(24, 49152) * scale for scale in (6.0, 2.0, 0.5)])
    top_p = torch.rand(len(logits)) * 0.9 + 0.05
    kept = ~apply_top_p(logits, top_p).isinf()
    sorted_probs, order = logits.double().softmax(dim=-1).sort(dim=-1, descending=True)
    ahead = torch.zeros_like(sorted_probs).scatter(1, order, sorted_probs.cumsum(dim=-1) - sorted_probs)
    want = ahead <= top_p.double().unsqueeze(1)
    sizes = want.sum(dim=-1)
    assert (sizes < TOP_P_CANDIDATES[0]).any() and (sizes > TOP_P_CANDIDATES[-1]).any()
    assert ((sizes > TOP_P_CANDIDATES[0]) & (sizes < TOP_P_CANDIDATES[-1])).any()
    differ = kept != want
    assert ((ahead - top_p.double().unsqueeze(1)).abs()[differ] < 1e-5).all()
    assert differ.sum() <= 0.001 * want.sum()


def test_top_p_one_leaves_a_row_alone_whatever_the_batch():
    """top_p 1 is off: such a row keeps its whole vocabulary, also beside rows that use top-p (the float sum of a
    peaked row's probabilities can pass 1.0 and would drop its tail)."""
    torch.manual_seed(1)
    logits = torch.randn(3, 49152) * 8
    out = apply_top_p(logits, torch.tensor([0.5, 1.0, 0.9]))
    assert torch.equal(out[1], logits[1])
    assert (~out[0].isinf()).sum() < 49152 and (~out[2].isinf()).sum() < 49152


def test_min_tokens_and_bad_words_mask_tokens():
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0]])
    early = make_seq(SamplingParams(min_tokens=2, stop_token_ids=(0,)), output=[3])
    assert sample(logits, [early]).token_ids == [1]
    banned = make_seq(SamplingParams(bad_sequences=((2, 0),)), output=[2])
    assert sample(logits, [banned]).token_ids == [1]


def test_log_probs_are_the_models():
    logits = torch.randn(2, 50)
    seqs = [make_seq(SamplingParams(return_log_probs=True)), make_seq(SamplingParams(temperature=0.7, seed=3))]
    result = sample(logits, seqs)
    expected = torch.log_softmax(logits, -1)[[0, 1], result.token_ids]
    assert torch.allclose(torch.tensor(result.log_probs), expected)


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.07, 0.03]])).expand(500, 4).clone()
    seqs = [make_seq(SamplingParams(temperature=1.0, min_p=0.2, seed=i)) for i in range(500)]
    assert set(sample(logits, seqs).token_ids) == {0, 1}  # 0.07 < 0.2 x 0.6


def test_penalties_match_an_independent_computation():
    torch.manual_seed(1)
    logits = torch.randn(1, 20)
    prompt, output = [1, 2, 3], [3, 5, 5, 7]
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    seq = Sequence("p", prompt, params, on_output=lambda out: None)
    seq.output_ids = list(output)
    expected = logits[0].clone()
    for token in set(output):  # OpenAI-style: output tokens only
        expected[token] -= 0.25 * output.count(token) + 0.5
    for token in set(prompt + output):  # HF/CTRL-style: prompt and output
        expected[token] = expected[token] / 1.3 if expected[token] > 0 else expected[token] * 1.3
    assert sample(logits.clone(), [seq]).token_ids == [int(expected.argmax())]
    penalised = logits.clone()
    apply_penalties(penalised, [seq])
    assert torch.allclose(penalised[0], expected)
