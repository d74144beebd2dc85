"""The shared sampler against its definition: many seeded draws follow softmax(logits / T) after
top-k and top-p, logprobs are the model's before temperature, and the draws depend on
(seed, step, token) only."""

import pytest
import torch

from h2o.engine.sampling import Sampler, Sampling, request_keys, uniforms

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
DRAWS = 40_000


def _draws(sampling: Sampling) -> torch.Tensor:
    """One draw per seed (DRAWS seeds), all at step 0: the empirical distribution over tokens."""
    sampler = Sampler.for_requests([Sampling(**{**sampling.__dict__, "seed": s}) for s in range(DRAWS)], "cpu")
    tokens = sampler.choose(LOGITS.expand(DRAWS, -1), torch.zeros(DRAWS, dtype=torch.long)).tokens
    return torch.bincount(tokens, minlength=LOGITS.numel()).double() / DRAWS


def _intended(temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    probs = (LOGITS.double() / temperature).softmax(-1)  # LOGITS are sorted, highest first
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    before = probs.cumsum(-1) - probs
    keep &= before < top_p
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


def _total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p - q).abs().sum() / 2)


# With 40,000 draws the total variation to the true distribution is about 0.005; 0.015 leaves
# room, and every wrong variant below is at least 0.05 away.
@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.3, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (0.7, 4, 0.9)]
)
def test_draws_follow_the_filtered_tempered_softmax(temperature, top_k, top_p):
    empirical = _draws(Sampling(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p))
    assert _total_variation(empirical, _intended(temperature, top_k, top_p)) < 0.015


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.3, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8)])
def test_draws_are_far_from_a_sampler_that_ignores_a_setting(temperature, top_k, top_p):
    # The sampler's own draws, well beyond the bound above from plain softmax(logits): a sampler
    # that dropped the temperature, top-k or top-p would be within it.
    empirical = _draws(Sampling(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p))
    assert _total_variation(empirical, _intended(1.0)) > 0.05


def test_greedy_takes_the_first_highest_logit():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    choice = Sampler.for_requests([Sampling(max_new_tokens=1)], "cpu").choose(logits, torch.zeros(1, dtype=torch.long))
    assert choice.tokens.tolist() == [1]


def test_logprobs_are_the_models_before_temperature():
    logits = LOGITS[None]
    sampler = Sampler.for_requests([Sampling(max_new_tokens=1, temperature=0.3, top_logprobs=3)], "cpu")
    choice = sampler.choose(logits, torch.zeros(1, dtype=torch.long))
    expected = LOGITS.log_softmax(-1)
    assert torch.allclose(choice.logprobs, expected[choice.tokens])
    assert torch.allclose(choice.top_logprobs[0], expected[:3])
    assert choice.top_ids[0].tolist() == [0, 1, 2]


def test_noise_depends_on_key_step_and_token_only():
    keys = request_keys([7, 8])
    a = uniforms(keys, torch.tensor([3, 3]), 50)
    # Another batch, another order, another row: the same numbers for the same (key, step).
    b = uniforms(keys.flip(0), torch.tensor([3, 3]), 50).flip(0)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # another request
    assert not torch.equal(a, uniforms(keys, torch.tensor([4, 4]), 50))  # another step
    assert float(a.min()) > 0 and float(a.max()) < 1
    # Roughly uniform: the mean of many draws is near 1/2.
    many = uniforms(torch.arange(1000), torch.zeros(1000, dtype=torch.long), 100)
    assert abs(float(many.mean()) - 0.5) < 0.01


def test_keys_of_large_seeds_differ():
    assert len(set(request_keys([0, 1, 2**32, 2**32 + 1, 2**40]).tolist())) == 5
