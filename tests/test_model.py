import pytest
import torch

from cddrec.config import ModelConfig
from cddrec.model import CDDRec, attention_bias, flops_per_user


def all_positions(model, ids):
    e_s, bias = model.encode(ids)
    x, _ = model.diffusion.reverse(model.decoder, e_s, bias)
    return x  # (B, L, d)


@pytest.mark.parametrize("variant", [{}, {"decoder": False}, {"decoder_norm": "post"}, {"decoder_norm": "rezero"}])
def test_causal_later_items_do_not_change_earlier_outputs(tiny_cfg, make_histories, variant, open_gates):
    model = CDDRec(tiny_cfg.replace(**variant)).eval()
    open_gates(model)
    ids = make_histories(50, 6, 8, seed=1, min_len=8)
    out = all_positions(model, ids)
    for i in range(7):
        changed = ids.clone()
        changed[:, i + 1:] = (changed[:, i + 1:] % 50) + 1  # every later item differs
        out2 = all_positions(model, changed)
        assert torch.allclose(out[:, : i + 1], out2[:, : i + 1], atol=1e-6)
        assert not torch.allclose(out[:, i + 1:], out2[:, i + 1:], atol=1e-4)


def test_per_user_independent_of_batch(tiny_model, make_histories):
    ids = make_histories(50, 8, 8, seed=2)
    out = tiny_model(ids)
    other = make_histories(50, 8, 8, seed=3)
    other[3] = ids[3]
    assert torch.allclose(tiny_model(other)[3], out[3], atol=1e-6)
    assert torch.allclose(tiny_model(ids[3:4])[0], out[3], atol=1e-6)  # alone in its batch


def test_fast_paths_equal_the_plain_reference(tiny_model, make_histories):
    """Hoisted keys/values, last-position-only and packed-row decoding vs the plain chain."""
    ids = make_histories(50, 5, 8, seed=4)
    e_s, bias = tiny_model.encode(ids)
    full, full_states = tiny_model.diffusion.reverse(tiny_model.decoder, e_s, bias, hoist=False, return_all=True)
    hoisted, _ = tiny_model.diffusion.reverse(tiny_model.decoder, e_s, bias)
    assert torch.allclose(hoisted, full, atol=1e-6)
    last, last_states = tiny_model.diffusion.reverse(tiny_model.decoder, e_s, bias, last_only=True, return_all=True)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)
    rows = (ids > 0).flatten().nonzero().squeeze(1)
    packed, packed_states = tiny_model.diffusion.reverse(tiny_model.decoder, e_s, bias, rows=rows, return_all=True)
    assert torch.allclose(packed, full.reshape(-1, full.shape[-1])[rows], atol=1e-6)
    for a, b, c in zip(full_states, last_states, packed_states):
        assert torch.allclose(a[:, -1], b[:, 0], atol=1e-6)
        assert torch.allclose(a.reshape(-1, a.shape[-1])[rows], c, atol=1e-6)


def test_reverse_is_a_chain_of_T_steps(tiny_model, make_histories):
    ids = make_histories(50, 4, 8, seed=5)
    e_s, bias = tiny_model.encode(ids)
    _, states = tiny_model.diffusion.reverse(tiny_model.decoder, e_s, bias, last_only=True, return_all=True)
    assert len(states) == tiny_model.cfg.steps
    # each state feeds the next step: recomputing step t from state t+1 reproduces it
    k, v = tiny_model.decoder.attn.memory(e_s)
    b = bias[:, :, -1:]
    x = e_s[:, -1:]
    for i, t in enumerate(reversed(range(tiny_model.cfg.steps))):
        x = tiny_model.decoder(x, t, k, v, b)
        assert torch.allclose(x, states[i], atol=1e-6)
    assert not torch.allclose(states[0], states[-1], atol=1e-3)


def test_deterministic_and_explicit_noise(tiny_model, make_histories):
    ids = make_histories(50, 3, 8, seed=6)
    a, b = tiny_model.user_embedding(ids), tiny_model.user_embedding(ids)
    assert torch.equal(a, b)
    assert torch.allclose(tiny_model.user_embedding(ids, plain=True), a, atol=1e-6)
    T, d = tiny_model.cfg.steps, tiny_model.cfg.hidden_size
    zero = torch.zeros(T, 3, d)
    assert torch.allclose(tiny_model.user_embedding(ids, noise=zero), a, atol=1e-6)
    noise = torch.randn(T, 3, d)
    n1, n2 = tiny_model.user_embedding(ids, noise=noise), tiny_model.user_embedding(ids, noise=noise)
    assert torch.equal(n1, n2) and not torch.allclose(n1, a, atol=1e-4)
    assert torch.allclose(tiny_model.user_embedding(ids, noise=noise, plain=True), n1, atol=1e-6)


def test_padding_only_history_is_finite(tiny_model):
    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[1, -1] = 3
    assert torch.isfinite(tiny_model(ids)).all()


def test_padding_amount_does_not_matter(tiny_cfg):
    """The same history gives the same output whatever the padding of the other rows."""
    model = CDDRec(tiny_cfg).eval()
    ids = torch.tensor([[0, 0, 0, 0, 0, 4, 9, 2]])
    assert torch.allclose(model(ids), model(torch.cat([ids, torch.arange(1, 9).view(1, 8)]))[:1], atol=1e-6)


def test_attention_bias_masks_future_and_padding():
    ids = torch.tensor([[0, 0, 3, 4]])
    b = attention_bias(ids)[0, 0]
    visible = b == 0
    assert visible.tolist() == [[False] * 4, [False] * 4, [False, False, True, False], [False, False, True, True]]


def test_rezero_chain_starts_as_the_identity(tiny_cfg, make_histories):
    """With gates at their initial 0 the T-step chain returns the encoder's last state."""
    model = CDDRec(tiny_cfg.replace(decoder_norm="rezero")).eval()
    ids = make_histories(50, 4, 8, seed=3)
    e_s, _ = model.encode(ids)
    assert torch.allclose(model.user_embedding(ids), e_s[:, -1], atol=1e-6)


def test_flops_per_user_counts():
    cfg = ModelConfig(num_items=12101)  # the paper's size: d=128, L=20, T=20
    d, L, T, V = 128, 20, 20, 12103
    f = flops_per_user(cfg)
    assert f["scoring"] == 2 * d * V
    assert f["encoder"] == L * (24 * d * d + 4 * L * d)
    assert f["decoder_kv"] == 4 * L * d * d and f["decoder_steps"] == T * (4 * d * d + 4 * L * d)
    plain = flops_per_user(cfg, plain=True)
    assert plain["total"] > 4 * f["total"]  # every position at every step, keys/values each step
    assert flops_per_user(cfg.replace(decoder=False))["decoder_kv"] == 0  # SASRec baseline: no decoder
    assert CDDRec(cfg.replace(num_items=50)).flops_per_user() == flops_per_user(cfg.replace(num_items=50))


def test_sampled_chain_equals_the_chain_with_the_same_explicit_noise(tiny_model, make_histories):
    """``sample`` draws eps for steps T-1..1 in that order (Eq. 4), the last step adds none; explicit ``noise``
    (T, B, Q, d), indexed by step, gives the same chain."""
    ids = make_histories(50, 3, 8, seed=7)
    e_s, bias = tiny_model.encode(ids)
    diffusion, T, d = tiny_model.diffusion, tiny_model.cfg.steps, tiny_model.cfg.hidden_size
    torch.manual_seed(0)
    sampled, _ = diffusion.reverse(tiny_model.decoder, e_s, bias, last_only=True, sample=True)
    torch.manual_seed(0)
    noise = torch.zeros(T, 3, 1, d)
    for t in range(T - 1, 0, -1):
        noise[t] = torch.randn(3, 1, d)
    explicit, _ = diffusion.reverse(tiny_model.decoder, e_s, bias, last_only=True, noise=noise)
    assert torch.equal(sampled, explicit)
    mean, _ = diffusion.reverse(tiny_model.decoder, e_s, bias, last_only=True)
    assert not torch.allclose(sampled, mean, atol=1e-4)
    # without a decoder (the SASRec baseline) the chain is its start state
    x, states = diffusion.reverse(None, e_s, bias, last_only=True, sample=True, return_all=True)
    assert torch.equal(x, e_s[:, -1:]) and len(states) == 1
