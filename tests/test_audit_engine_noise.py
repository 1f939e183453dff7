"""The noise DP-SGD actually adds: DPEngine.add_noise with the real NoiseSource (seeded and secure).

tests/test_privacy_noise.py checks the source alone; here the sample is what lands in .grad, over
every trainable parameter of a decoder with tied embeddings, so a wrong scale (σ instead of σC,
C applied twice, noise added twice to a tied weight, or reused streams) is caught.
"""
import numpy as np
import pytest
import torch
from scipy import stats

from dptrain.dp import DPEngine
from dptrain.model import Decoder, DecoderConfig
from dptrain.privacy.mechanism import Mechanism
from dptrain.privacy.noise import NoiseSource

SIGMA, CLIP = 0.8, 2.5
STD = SIGMA * CLIP


def decoder() -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=2,
                                 num_kv_heads=1, head_dim=24, max_seq_len=32, query_pre_attn_scalar=24.0))


def grads(engine: DPEngine) -> dict[str, np.ndarray]:
    named = {id(p): name for name, p in engine.model.named_parameters()}
    return {named[id(p)]: p.grad.detach().double().numpy().ravel().copy() for p in engine.parameters}


def ks_pvalue(sample: np.ndarray, scale: float) -> float:
    return stats.kstest(sample, "norm", args=(0, scale)).pvalue


@pytest.mark.parametrize("secure", [False, True])
def test_engine_noise_is_gaussian_with_scale_sigma_times_clip(secure):
    engine = DPEngine(decoder(), CLIP)
    engine.add_noise(SIGMA, NoiseSource(None if secure else 5, secure=secure))
    noise = grads(engine)
    everything = np.concatenate(list(noise.values()))
    assert everything.size > 40_000
    assert ks_pvalue(everything, STD) > 1e-3
    # the wrong scales are rejected: the test has the power to see a factor 2/3 or 3/2
    assert ks_pvalue(everything, STD * 2 / 3) < 1e-6
    assert ks_pvalue(everything, STD * 3 / 2) < 1e-6
    # the tied embedding / output head is one parameter and gets its noise once, not twice
    assert "lm_head.weight" not in noise
    assert ks_pvalue(noise["embed_tokens.weight"], STD) > 1e-3
    assert ks_pvalue(noise["embed_tokens.weight"], STD * np.sqrt(2)) < 1e-6
    # parameters of the same shape get independent draws, not a replayed stream
    a, b = noise["layers.0.mlp.up_proj.weight"], noise["layers.1.mlp.up_proj.weight"]
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(a.size)


@pytest.mark.parametrize("secure", [False, True])
def test_noise_lands_on_top_of_the_clipped_sum_and_is_divided_by_the_expected_batch(secure):
    model = decoder()
    inputs = torch.randint(0, 256, (6, 16))
    targets = torch.randint(0, 256, (6, 16))
    engine = DPEngine(model, CLIP)
    engine.clipped_grad_sum(inputs, targets)
    clean = grads(engine)
    engine.zero_grad()
    engine.clipped_grad_sum(inputs, targets)
    engine.privatize(Mechanism(SIGMA, CLIP, 6, 6), NoiseSource(None if secure else 9, secure=secure))
    noisy = grads(engine)
    residual = np.concatenate([noisy[k] - clean[k] / 6.0 for k in clean])
    assert ks_pvalue(residual, STD / 6.0) > 1e-3
    assert ks_pvalue(residual, STD / 6.0 * 2 / 3) < 1e-6
    assert ks_pvalue(residual, STD / 6.0 * 3 / 2) < 1e-6
