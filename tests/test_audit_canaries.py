import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dptrain.audit.canaries import (draw_inclusion, gradient_alignment_scores, loss_scores, random_canaries,
                                    weight_delta)
from dptrain.audit.one_run import best_epsilon_lower_bound
from dptrain.errors import UserError
from dptrain.model import Decoder, DecoderConfig

CFG = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=16, max_seq_len=64, query_pre_attn_scalar=16.0)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Decoder(CFG)


def test_coins_are_fair_independent_and_reproducible():
    coins = draw_inclusion(200_000, seed=3)
    assert coins.dtype == bool and coins.shape == (200_000,)
    assert abs(coins.mean() - 0.5) < 0.005  # 4.5 standard deviations
    assert abs(np.mean(coins[1:] == coins[:-1]) - 0.5) < 0.005  # no serial correlation
    assert np.array_equal(coins, draw_inclusion(200_000, seed=3))
    assert not np.array_equal(draw_inclusion(64), draw_inclusion(64))  # fresh entropy by default
    with pytest.raises(UserError):
        draw_inclusion(0)


def test_random_canaries_respect_the_id_range():
    c = random_canaries(50, 12, 64, seed=0, low=4)
    assert c.shape == (50, 12) and c.min() >= 4 and c.max() < 64
    assert torch.equal(c, random_canaries(50, 12, 64, seed=0, low=4))


def test_loss_scores_match_a_per_token_reference():
    model = tiny_model()
    tokens = random_canaries(5, 10, CFG.vocab_size, seed=1)
    expected = []
    with torch.no_grad():
        for row in tokens:
            logp = torch.log_softmax(model(row[None])[0].double(), dim=-1)
            expected.append(np.mean([float(logp[t, row[t + 1]]) for t in range(len(row) - 1)]))
    assert np.allclose(loss_scores(model, tokens, batch_size=2), expected, atol=1e-5)
    assert model.training  # mode restored


def test_gradient_alignment_matches_a_flattened_reference():
    model = tiny_model()
    tokens = random_canaries(4, 10, CFG.vocab_size, seed=2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    delta = {name: 0.01 * torch.randn_like(p) for name, p in model.named_parameters()}
    flat_delta = torch.cat([d.flatten() for d in delta.values()])
    expected = []
    for row in tokens:
        model.zero_grad()
        logits = model(row[None])[0, :-1]
        F.cross_entropy(logits, row[1:]).backward()
        g = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
        expected.append(-float(F.cosine_similarity(g, flat_delta, dim=0)))
    assert np.allclose(gradient_alignment_scores(model, tokens, delta), expected, atol=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(delta[name])
    recovered = weight_delta(initial, model)
    assert all(torch.allclose(recovered[n], delta[n], atol=1e-6) for n in delta)
    assert "lm_head.weight" not in recovered  # the tied head counts once


def test_trained_canaries_score_higher_and_the_audit_sees_it():
    """Non-private training on about half of 32 canaries: both scorers separate them, the bound is > 0."""
    model = tiny_model(seed=1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    canaries = random_canaries(32, 16, CFG.vocab_size, seed=4)
    included = draw_inclusion(32, seed=5)
    train = canaries[torch.from_numpy(included)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(8):
        opt.zero_grad()
        logits = model(train)[:, :-1]
        F.cross_entropy(logits.transpose(1, 2), train[:, 1:]).backward()
        opt.step()
    by_loss = loss_scores(model, canaries)
    delta = weight_delta(initial, model)
    start = tiny_model(seed=1)
    by_gradient = gradient_alignment_scores(start, canaries, delta)
    for scores in (by_loss, by_gradient):
        assert scores[included].min() > scores[~included].max()  # perfectly separated
        n_in = int(included.sum())
        audit = best_epsilon_lower_bound(scores, included, k_grid=[(n_in // 2, (32 - n_in) // 2), (n_in, 32 - n_in)])
        assert audit.epsilon > 1.5


def test_bad_tokens_raise_user_error():
    model = tiny_model()
    with pytest.raises(UserError, match="token ids"):
        loss_scores(model, torch.full((2, 5), CFG.vocab_size))
    with pytest.raises(UserError, match="max_seq_len"):
        loss_scores(model, torch.zeros(2, CFG.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(UserError, match="did not change"):
        gradient_alignment_scores(model, torch.zeros(2, 5, dtype=torch.long),
                                  {n: torch.zeros_like(p) for n, p in model.named_parameters()})


@pytest.mark.gpu
def test_scores_on_cuda_match_cpu():
    model = tiny_model()
    tokens = random_canaries(6, 12, CFG.vocab_size, seed=7)
    delta = {n: 0.01 * torch.ones_like(p) for n, p in model.named_parameters()}
    cpu = loss_scores(model, tokens), gradient_alignment_scores(model, tokens, delta)
    model.cuda()
    gpu = loss_scores(model, tokens), gradient_alignment_scores(model, tokens, delta)
    assert np.allclose(cpu[0], gpu[0], atol=1e-4) and np.allclose(cpu[1], gpu[1], atol=1e-4)
