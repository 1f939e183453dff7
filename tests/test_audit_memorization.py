
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from dptrain.audit.memorization import (continuation_log_likelihood, edit_distance, exposure,
                                        exposure_from_log_likelihoods, greedy_generate, memorization_test,
                                        random_secrets, sample_windows)
from dptrain.errors import UserError
from dptrain.model import Decoder, DecoderConfig

CFG = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=16, max_seq_len=64, query_pre_attn_scalar=16.0)
PREFIX, SUFFIX = 8, 10


def naive_levenshtein(a, b):
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(0, 12), st.integers(0, 12), st.integers(2, 5), st.integers(0, 2**31))
def test_edit_distance_matches_naive_dp(batch, n, k, alphabet, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, alphabet, (batch, n)), rng.integers(0, alphabet, (batch, k))
    assert edit_distance(a, b).tolist() == [naive_levenshtein(list(x), list(y)) for x, y in zip(a, b)]


@pytest.fixture(scope="module")
def memorized():
    """A tiny model trained (no DP) until it reproduces four sequences from their prefixes."""
    torch.manual_seed(0)
    model = Decoder(CFG)
    seqs = torch.randint(0, CFG.vocab_size, (4, PREFIX + SUFFIX), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(model(seqs)[:, :-1].transpose(1, 2), seqs[:, 1:]).backward()
        opt.step()
    return model, seqs


def test_greedy_generation_is_batch_independent(memorized):
    model, seqs = memorized
    together = greedy_generate(model, seqs[:, :PREFIX], SUFFIX)
    one_by_one = torch.cat([greedy_generate(model, row[None, :PREFIX], SUFFIX) for row in seqs])
    assert torch.equal(together, one_by_one)
    # Each step is the argmax of the model's next-token distribution given everything before it.
    seq = torch.cat([seqs[:1, :PREFIX], together[:1]], dim=1)
    with torch.no_grad():
        assert torch.equal(model(seq)[0, PREFIX - 1:-1].argmax(-1), together[0])


def test_memorized_sequences_are_extracted_and_unseen_ones_are_not(memorized):
    model, seqs = memorized
    seen = memorization_test(model, seqs, PREFIX, SUFFIX, progress=False, batch_size=3)
    assert (seen.exact_matches, seen.exact_rate, seen.approx_rate) == (4, 1.0, 1.0)
    unseen = torch.randint(0, CFG.vocab_size, (6, PREFIX + SUFFIX), generator=torch.Generator().manual_seed(9))
    result = memorization_test(model, unseen, PREFIX, SUFFIX, progress=False)
    assert result.exact_matches == 0 and result.approx_matches == 0
    assert min(result.normalized_distances) > 0.5
    assert result.to_dict()["num_sequences"] == 6


def test_approximate_match_threshold_counts_edits(memorized):
    model, seqs = memorized
    # Same prefixes, so the model still emits the memorised suffixes; the reference suffixes now
    # differ from them in 0, 1, 2 and 3 places (of 10): approximate match <= 10% takes 0 and 1.
    altered = seqs.clone()
    for i in range(4):
        positions = PREFIX + torch.arange(i)
        altered[i, positions] = (altered[i, positions] + 1) % CFG.vocab_size
    r = memorization_test(model, altered, PREFIX, SUFFIX, approx_threshold=0.1, progress=False)
    assert r.normalized_distances == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert (r.exact_matches, r.approx_matches) == (1, 2)


def test_continuation_log_likelihood_matches_step_by_step(memorized):
    model, seqs = memorized
    context, conts = seqs[0, :5], seqs[:3, 5:9]
    expected = []
    with torch.no_grad():
        for cont in conts:
            total = 0.0
            for j in range(len(cont)):
                prefix = torch.cat([context, cont[:j]])[None]
                total += float(torch.log_softmax(model(prefix)[0, -1].double(), -1)[cont[j]])
            expected.append(total)
    assert np.allclose(continuation_log_likelihood(model, context, conts), expected, atol=1e-4)


def test_exposure_math_on_known_ranks():
    refs = np.arange(1023, dtype=float)  # 1023 references + the canary = 1024 candidates
    assert exposure_from_log_likelihoods(2000.0, refs).exposure == pytest.approx(10.0)
    assert exposure_from_log_likelihoods(-1.0, refs).exposure == pytest.approx(0.0)
    mid = exposure_from_log_likelihoods(511.5, refs)  # 511 references above it
    assert mid.rank == 512 and mid.exposure == pytest.approx(1.0)
    assert exposure_from_log_likelihoods(5.0, [5.0]).rank == 1.5  # a tie counts half
    with pytest.raises(UserError):
        exposure_from_log_likelihoods(0.0, [])


def test_trained_secret_has_high_exposure_and_unseen_one_low(memorized):
    model, seqs = memorized
    context, secret = seqs[0, :PREFIX], seqs[0, PREFIX:PREFIX + 6]
    refs = random_secrets(6, CFG.vocab_size, seed=3)
    seen = exposure(model, context, secret, refs, num_references=2047)
    assert seen.num_candidates == 2048 and seen.rank == 1
    assert seen.exposure == pytest.approx(11.0)
    unseen_ctx, unseen_secret = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    unseen = exposure(model, unseen_ctx, unseen_secret, random_secrets(6, CFG.vocab_size, seed=5),
                      num_references=2047)
    assert unseen.exposure < 5  # a random secret ranks in the top 1/32 with probability 1/32


def test_random_secrets_are_reproducible_and_exposure_checks_lengths(memorized):
    model, seqs = memorized
    a, b = random_secrets(5, 64, seed=1), random_secrets(5, 64, seed=1)
    assert all(torch.equal(next(a), next(b)) for _ in range(3))
    with pytest.raises(UserError, match="tokens"):
        exposure(model, seqs[0, :4], seqs[0, 4:8], iter([torch.zeros(3, dtype=torch.long)]))


def test_bad_memorization_input_raises_user_error(memorized):
    model, seqs = memorized
    with pytest.raises(UserError, match="need a non-empty"):
        memorization_test(model, seqs[:, :PREFIX + SUFFIX - 1], PREFIX, SUFFIX, progress=False)
    with pytest.raises(UserError, match="max_seq_len"):
        memorization_test(model, torch.zeros(1, 70, dtype=torch.long), 40, 30, progress=False)
    with pytest.raises(UserError, match="approx_threshold"):
        memorization_test(model, seqs, PREFIX, SUFFIX, approx_threshold=1.5, progress=False)


def test_sample_windows_are_contiguous_slices_of_distinct_rows():
    sequences = torch.arange(20 * 30).reshape(20, 30)
    windows = sample_windows(sequences, 8, 12, seed=0)
    assert windows.shape == (8, 12)
    assert torch.all(windows[:, 1:] - windows[:, :-1] == 1)  # contiguous within a row
    rows = (windows[:, 0] // 30).tolist()
    assert len(set(rows)) == 8 and torch.all(windows[:, -1] // 30 == windows[:, 0] // 30)
    assert torch.equal(windows, sample_windows(sequences, 8, 12, seed=0))
    with pytest.raises(UserError):
        sample_windows(sequences, 21, 12)
    with pytest.raises(UserError):
        sample_windows(sequences, 2, 31)


@pytest.mark.gpu
def test_memorization_and_exposure_on_cuda_match_cpu(memorized):
    model, seqs = memorized
    cpu = memorization_test(model, seqs, PREFIX, SUFFIX, progress=False)
    cpu_exp = exposure(model, seqs[0, :PREFIX], seqs[0, PREFIX:PREFIX + 6], random_secrets(6, 64, seed=3), 500)
    gpu_model = Decoder(CFG).cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu = memorization_test(gpu_model, seqs, PREFIX, SUFFIX, progress=False)
    gpu_exp = exposure(gpu_model, seqs[0, :PREFIX], seqs[0, PREFIX:PREFIX + 6], random_secrets(6, 64, seed=3), 500)
    assert cpu.normalized_distances == gpu.normalized_distances
    assert cpu_exp.rank == gpu_exp.rank
