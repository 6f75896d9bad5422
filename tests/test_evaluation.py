import math

import numpy as np
import pytest
import torch

from cddrec.data import eval_split
from cddrec.evaluation import avg_change, evaluate, evaluate_popularity, mask_scores, metrics_from_ranks, target_ranks
from cddrec.model import CDDRec


def brute_metrics(scores, targets):
    """Sort every row and read the target's position: the textbook definitions."""
    out = {k: 0.0 for k in ["R@1", "R@5", "R@10", "R@20", "N@5", "N@10", "N@20", "MRR", "MRR@40"]}
    for row, t in zip(scores, targets):
        # ties against the target: among equal scores the target is placed last
        order = sorted(range(len(row)), key=lambda j: (-row[j], j == t))
        r = order.index(t)
        for k in (1, 5, 10, 20):
            out[f"R@{k}"] += r < k
        for k in (5, 10, 20):
            out[f"N@{k}"] += 1 / math.log2(r + 2) if r < k else 0
        out["MRR"] += 1 / (r + 1)
        out["MRR@40"] += 1 / (r + 1) if r < 40 else 0
    return {k: v / len(targets) for k, v in out.items()}


def test_metrics_match_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 60, generator=g).round(decimals=1)  # rounding makes ties
    targets = torch.randint(0, 60, (200,), generator=g)
    got = metrics_from_ranks(target_ranks(scores, targets).numpy())
    want = brute_metrics(scores.tolist(), targets.tolist())
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


def test_ties_count_against_the_target():
    scores = torch.zeros(1, 10)
    assert target_ranks(scores, torch.tensor([3])).item() == 9  # collapsed model: last, not first


def test_seen_items_masked_with_minus_inf_even_when_scores_are_negative():
    scores = -torch.rand(2, 7) - 1.0  # all negative: setting seen items to 0 would rank them first
    out = mask_scores(scores, 5, np.array([[2, 4], [0, 1]]))  # row 1: one seen item, left-padded
    assert torch.isinf(out[:, 0]).all() and torch.isinf(out[:, 6]).all()
    assert torch.isinf(out[0, [2, 4]]).all() and torch.isinf(out[1, 1])
    assert torch.isfinite(out[0, [1, 3, 5]]).all()
    top = out.topk(3, dim=1).indices
    assert not set(top[0].tolist()) & {0, 2, 4, 6}


def test_avg_change_eq9():
    s = torch.tensor([[10.0, 8.0, 6.0, 3.0]])
    want = (abs(8 - 10) / 10 + abs(6 - 8) / 8 + abs(3 - 6) / 6) / 3 * 100
    assert avg_change(s).item() == pytest.approx(want)


def test_evaluate_never_recommends_padding_mask_or_seen(tiny_cfg, tiny_data):
    model = CDDRec(tiny_cfg.replace(num_items=tiny_data.num_items)).eval()
    split = eval_split(tiny_data, "test", tiny_cfg.max_len)
    res = evaluate(model, split, batch_size=37, keep_topk=20, stages=True)
    assert res.top_items.shape == (len(split), 20)
    N = tiny_data.num_items
    for i, items in enumerate(res.top_items):
        seen = split.seen(np.array([i]))[0]
        assert not set(items.tolist()) & (set(seen.tolist()) | {0, N + 1})
    assert (np.diff(res.top_scores, axis=1) <= 0).all()
    assert res.metrics["users"] == len(split)
    assert len(res.stages) == tiny_cfg.steps
    # the last stage is the final state, so its metrics equal the main ones
    assert res.stages[-1]["R@10"] == res.metrics["R@10"]
    # batch size does not change results
    res2 = evaluate(model, split, batch_size=512)
    assert res2.metrics == {**res.metrics}


def test_evaluate_matches_manual_scoring(tiny_cfg, tiny_data):
    torch.manual_seed(0)
    model = CDDRec(tiny_cfg.replace(num_items=tiny_data.num_items)).eval()
    split = eval_split(tiny_data, "valid", tiny_cfg.max_len)
    res = evaluate(model, split)
    ranks = []
    with torch.no_grad():
        for i in range(len(split)):
            s = model(torch.as_tensor(split.histories[i:i + 1]))[0]
            seen = split.seen(np.array([i]))[0]
            s[0] = s[-1] = -math.inf
            s[seen[seen > 0]] = -math.inf
            t = split.targets[i]
            excluded = bool(s[t] == -math.inf)  # a repeat of a seen item can never be recommended: a miss
            ranks.append(math.inf if excluded else int((s > s[t]).sum() + (s == s[t]).sum() - 1))
    assert any(math.isinf(r) for r in ranks)  # the synthetic data repeat items: the rule is exercised
    assert res.metrics["MRR"] == pytest.approx(metrics_from_ranks(np.array(ranks))["MRR"], rel=1e-9)


def test_popularity_baseline(tiny_data):
    split = eval_split(tiny_data, "test", 8)
    m = evaluate_popularity(tiny_data.popularity("train"), split, tiny_data.num_items)
    assert 0 < m["R@20"] < 1 and m["users"] == len(split)


def test_avg_change_skips_masked_entries():
    s = torch.tensor([[4.0, 2.0, -math.inf, -math.inf]])
    assert avg_change(s).item() == pytest.approx(50.0)


def test_a_target_the_ranking_excludes_is_a_miss_even_in_a_tiny_catalogue():
    """One item (V = 3: padding, the item, the mask token): a target already in the history is masked;
    its rank must be a miss, not V - 1 = 2, which a top-10 cut-off would count as a hit."""
    import numpy as np
    import torch

    from cddrec.evaluation import mask_scores, target_ranks
    from cddrec.metrics import metrics_from_ranks

    raw = torch.tensor([[0.0, 1.5, 0.0], [0.0, 1.5, 0.0]])  # (B, V)
    scores = mask_scores(raw, 1, np.array([[1], [0]]))  # user 0 has seen item 1; user 1 has seen nothing
    ranks = target_ranks(scores, torch.tensor([1, 1])).numpy()
    assert np.isinf(ranks[0]) and ranks[1] == 0
    m = metrics_from_ranks(ranks)
    assert m["R@10"] == 0.5
