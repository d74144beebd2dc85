import pytest
import torch

from h2o.policies import Budget, make_policy


def test_budgets_truncate_like_the_paper_and_keep_the_newest_token():
    policy = make_policy("h2o", 0.1, 0.1)
    assert policy.budget(519) == Budget(heavy=51, recent=51)
    assert policy.budget(5) == Budget(heavy=0, recent=1)
    assert make_policy("h2o", 0.0, 0.2).budget(100) == Budget(heavy=0, recent=20)


@pytest.mark.parametrize(
    "heavy, recent, message",
    [(-0.1, 0.1, "--heavy_ratio"), (0.1, 1.5, "--recent_ratio"), (0.6, 0.6, "at most 1")],
)
def test_ratios_outside_range_are_refused(heavy, recent, message):
    with pytest.raises(ValueError, match=message):
        make_policy("h2o", heavy, recent)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope", 0.1, 0.1)


def _select(scores, n_tokens, heavy, recent):
    positions = torch.arange(len(scores)).view(1, 1, -1)
    policy = make_policy("h2o", 0.1, 0.1)
    return policy.select(
        torch.tensor(scores, dtype=torch.float32).view(1, 1, -1), positions,
        torch.tensor([n_tokens]), torch.tensor([heavy]), torch.tensor([recent]),
    )


def test_selection_keeps_recent_window_top_heavy_and_parks_the_leaving_token():
    # 10 tokens seen, heavy 2, recent 3: the next token plus tokens 8, 9 form the window;
    # token 7 leaves it (kept in memory, not attended); heavy = top 2 of tokens 0..6.
    scores = [5.0, 0.1, 9.0, 0.2, 0.3, 7.0, 0.4, 100.0, 0.0, 0.0]
    chosen = _select(scores, n_tokens=10, heavy=2, recent=3)
    assert chosen.active[0, 0].nonzero().flatten().tolist() == [2, 5, 8, 9]
    assert chosen.retained[0, 0].nonzero().flatten().tolist() == [2, 5, 7, 8, 9]


def test_nothing_is_evicted_within_budget():
    chosen = _select([1.0] * 6, n_tokens=6, heavy=3, recent=3)
    assert chosen.active.all() and chosen.retained.all()


def test_local_keeps_only_the_window():
    chosen = _select([9.0] * 10, n_tokens=10, heavy=0, recent=4)
    assert chosen.active[0, 0].nonzero().flatten().tolist() == [7, 8, 9]
    assert chosen.retained[0, 0].nonzero().flatten().tolist() == [7, 8, 9]


def test_budgets_are_per_sequence_in_a_batch():
    policy = make_policy("h2o", 0.1, 0.1)
    scores = torch.arange(10, dtype=torch.float32).flip(0).repeat(2, 1, 1)  # earliest highest
    positions = torch.arange(10).repeat(2, 1, 1)
    chosen = policy.select(scores, positions, torch.tensor([10, 10]), torch.tensor([1, 3]), torch.tensor([2, 2]))
    assert chosen.active[0, 0].nonzero().flatten().tolist() == [0, 9]
    assert chosen.active[1, 0].nonzero().flatten().tolist() == [0, 1, 2, 9]
