import os
import sys

import pytest
import torch

from train_gpt import (HessianHook, QuantSpec, awq_salient_group, dequantize_state, gptq_quantize,
                   lqer_apply, lqer_factors, quantize_state)


@pytest.fixture(autouse=True, scope='module')
def one_thread():  # small CPU linalg ops: intra-op threads only add contention on a shared 2-core box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n, cols, rank, seed, noise=0.3):
    g = gen(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, cols, generator=g) + noise * torch.randn(n, cols, generator=g)


def heavy_weights(rows, cols, seed, std=0.02):
    g = gen(seed)
    return std * torch.randn(rows, cols, generator=g) * torch.randn(rows, cols, generator=g).mul(0.4).exp()


def deq(q, s, hs=None, hcols=None):
    W = q.float() * s.float()[:, None]
    if hs is not None:
        W[:, hcols] = q[:, hcols].float() * hs.float()[:, None]
    return W


def err(E, H=None):
    return float(E.norm() ** 2) if H is None else float(((E @ H) * E).sum())


def herr(W, Wq, H):  # Hessian-weighted relative error tr(E H E^T) / tr(W H W^T)
    E = W - Wq
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum())


def test_gptq_beats_rtn_on_correlated_inputs():
    X = correlated_inputs(4096, 256, 32, seed=0)
    H, W = X.T @ X, heavy_weights(64, 256, seed=1)
    q, s, hs = gptq_quantize(W, H, 31, 11.5)
    qr, sr, _ = gptq_quantize(W, None, 31, 11.5)  # round-to-nearest, same SDClip scales
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and hs is None and torch.equal(s, sr)
    e_gptq, e_rtn = herr(W, deq(q, s), H), herr(W, deq(qr, sr), H)
    print(f'\nH-weighted rel err: gptq {e_gptq:.3e}  rtn {e_rtn:.3e}  ratio {e_gptq / e_rtn:.3f}')
    assert e_gptq < 0.3 * e_rtn


def test_gptq_blocks_are_exact_and_dead_columns_are_rounded():
    X = correlated_inputs(2048, 256, 32, seed=2)
    dead = torch.tensor([5, 77, 200, 201])
    X[:, dead] = 0
    H, W = X.T @ X, heavy_weights(48, 256, seed=3)
    q32, s, _ = gptq_quantize(W, H, 31, 11.5, block=32)
    q256, _, _ = gptq_quantize(W, H, 31, 11.5, block=256)
    # lazy block updates are the same algorithm as column-by-column: blocks must (nearly) agree
    assert (q32 == q256).float().mean() > 0.99
    assert abs(herr(W, deq(q32, s), H) / herr(W, deq(q256, s), H) - 1) < 0.02
    qr, _, _ = gptq_quantize(W, None, 31, 11.5)
    assert torch.equal(q32[:, dead], qr[:, dead])  # no input -> no feedback, plain rounding


def test_every_dequantized_weight_within_row_clip_bound():
    W = heavy_weights(64, 256, seed=4)
    W[torch.arange(0, 64, 4), torch.arange(0, 256, 16)] = 1.0  # big outliers (> k*std) to be clipped
    H = (lambda X: X.T @ X)(correlated_inputs(2048, 256, 32, seed=5))
    for k, qmax, hcols in [(11.5, 31, None), (13.0, 31, torch.arange(64, 128)), (14.0, 63, None)]:
        for h in (H, None):
            q, s, hs = gptq_quantize(W, h, qmax, k, hi_cols=hcols)
            bound = k * W.std(dim=1, keepdim=True) * (1 + 1e-3)
            Wq = deq(q, s, hs, hcols)
            assert (Wq.abs() <= bound).all()
            assert (q.abs() == qmax).any()  # the clamp is exercised
            if hcols is not None:
                assert q[:, hcols].abs().max() > qmax and q.abs().max() <= 127


def test_awq_salient_group_and_high_precision_columns():
    g = gen(6)
    X = torch.randn(4096, 256, generator=g)
    X[:, 128:192] *= 8  # salient channels
    H, W = X.T @ X, heavy_weights(64, 256, seed=7)
    hc = awq_salient_group(W, H)
    assert torch.equal(hc, torch.arange(128, 192))
    W2 = W.clone()
    W2[:, 64:128] *= 20  # with flat activations the weight magnitude decides
    assert torch.equal(awq_salient_group(W2, torch.eye(256)), torch.arange(64, 128))
    q, s, _ = gptq_quantize(W, H, 31, 11.5)
    qa, sa, hsa = gptq_quantize(W, H, 31, 11.5, hi_cols=hc)
    e0, e1 = herr(W, deq(q, s), H), herr(W, deq(qa, sa, hsa, hc), H)
    print(f'\nAWQ-lite H-weighted rel err: without {e0:.3e}  with {e1:.3e}')
    assert torch.equal(s, sa) and e1 < 0.5 * e0


@pytest.mark.parametrize('kind', ['lowrank+noise', 'gptq_error', 'gptq_error_odd_cols'])
def test_lqer_lowers_error(kind):
    g = gen(8)
    H = None
    if kind == 'lowrank+noise':
        E = torch.randn(256, 4, generator=g) @ torch.randn(4, 512, generator=g) + 0.5 * torch.randn(256, 512, generator=g)
    else:
        cols = 200 if kind.endswith('odd_cols') else 512
        r, c = torch.randn(256, generator=g).mul(0.5).exp(), torch.randn(cols, generator=g).mul(0.5).exp()
        W = r[:, None] * heavy_weights(256, cols, seed=9) * c[None]
        H = (lambda X: X.T @ X)(correlated_inputs(2048, cols, 32, seed=10))
        q, s, _ = gptq_quantize(W, H, 31, 11.5)
        E = W - deq(q, s)
    la, las, lb, lbs = f = lqer_factors(E, rank=4, b_group=64)
    assert la.shape == (256, 4) and la.dtype == torch.int8 and la.min() >= -2 and la.max() <= 1
    assert las.dtype == torch.float16 and las.numel() == 1
    assert lb.shape == (4, E.shape[1]) and lb.dtype == torch.int8 and lb.min() >= -8 and lb.max() <= 7
    assert lbs.dtype == torch.float16 and lbs.shape == (4, -(-E.shape[1] // 64))
    rel = (err(E - lqer_apply(*f)) / err(E)) ** 0.5
    print(f'\nLQER {kind}: ||E - AB|| / ||E|| = {rel:.4f}', end='')
    assert rel < (0.6 if kind == 'lowrank+noise' else 0.995)
    if H is not None:  # fitted in the H metric it lowers the output error (Frobenius-fitted may not)
        hrel = (err(E - lqer_apply(*lqer_factors(E, H=H)), H) / err(E, H)) ** 0.5
        hrel_plain = (err(E - lqer_apply(*f), H) / err(E, H)) ** 0.5
        print(f'; output error ratio: H-fitted {hrel:.4f}, Frobenius-fitted {hrel_plain:.4f}')
        assert hrel < 0.95 and hrel < hrel_plain


def make_state():
    g = gen(11)
    state = {
        'embed.weight': 0.005 * torch.randn(1024, 128, generator=g),  # embed (no Hessian)
        'blocks.0.attn.c_qkv.weight': heavy_weights(384, 256, seed=12),  # attn
        'blocks.0.attn.proj.weight': heavy_weights(256, 256, seed=13),  # exactly 65,536 -> small
        'blocks.0.attn.gate.weight': 0.1 * torch.randn(8, 12, generator=g),  # gate
        'blocks.0.mlp.fc.weight': heavy_weights(512, 256, seed=14),  # mlp
        'blocks.0.mlp.proj.weight': heavy_weights(256, 512, seed=15),  # mlp
        'lane_mix.weight': heavy_weights(300, 300, seed=16),  # other
        'blocks.0.norm_scale': torch.rand(256, generator=g),
        'smear.lam': torch.tensor(0.3),
        'step': torch.tensor([7, 8], dtype=torch.int64),
    }
    state['embed.weight'][3, 5] = 1.0  # outlier: needs the int7 range
    hess = {n: (lambda X: X.T @ X / 2048)(correlated_inputs(2048, state[n].shape[1], 32, seed=20 + i))
            for i, n in enumerate(['blocks.0.attn.c_qkv.weight', 'blocks.0.mlp.fc.weight',
                                   'blocks.0.mlp.proj.weight', 'lane_mix.weight'])}
    return state, hess


def test_quantize_state_roundtrip_and_determinism():
    state, hess = make_state()
    packed, stats = quantize_state(state, hess, QuantSpec())
    print('\ncategory / rel err / H-weighted rel err:')
    for n, c in stats['cat'].items():
        print(f'  {n:28s} {c:6s} {stats["rel"].get(n, 0):.4f} {stats["hrel"].get(n, float("nan")):.4f}')
    print('  after LQER (rel, hrel):', stats['lqer'])
    assert stats['cat'] == {'embed.weight': 'embed', 'blocks.0.attn.c_qkv.weight': 'attn',
                            'blocks.0.attn.proj.weight': 'small', 'blocks.0.attn.gate.weight': 'gate',
                            'blocks.0.mlp.fc.weight': 'mlp', 'blocks.0.mlp.proj.weight': 'mlp',
                            'lane_mix.weight': 'other', 'blocks.0.norm_scale': 'small',
                            'smear.lam': 'small', 'step': 'small'}
    for k, v in packed.items():
        assert v.dtype in (torch.int8, torch.int16, torch.float16) or k == 'step', k
    big = ['embed.weight', 'blocks.0.attn.c_qkv.weight', 'blocks.0.mlp.fc.weight',
           'blocks.0.mlp.proj.weight', 'lane_mix.weight']
    for n in big:
        assert packed[n + '.q'].shape == state[n].shape and packed[n + '.s'].shape == state[n].shape[:1]
        assert (n + '.hs' in packed) == (n in hess) and (n + '.hcols' in packed) == (n in hess)
    assert 31 < packed['embed.weight.q'].abs().max() <= 63 and packed['blocks.0.mlp.fc.weight.q'].abs().max() > 31
    assert len(stats['lqer']) == 3
    assert sum(k.endswith('.la') for k in packed) == 3
    assert packed['blocks.0.attn.gate.weight.q'].dtype == torch.int8 and 'blocks.0.attn.gate.weight.hs' not in packed
    out = dequantize_state(packed)
    assert set(out) == set(state)
    for n, t in state.items():
        assert out[n].shape == t.shape
    for n in ['blocks.0.attn.proj.weight', 'blocks.0.norm_scale', 'smear.lam']:
        assert out[n].dtype == torch.float32 and torch.equal(out[n], state[n].half().float())
    assert torch.equal(out['step'], state['step'])
    gate = state['blocks.0.attn.gate.weight']
    assert (out['blocks.0.attn.gate.weight'] - gate).abs().max() <= gate.abs().amax(1).max() / 254 * 1.01
    for n in big:  # the stored matrix (without LQER) obeys the clip bound; LQER only lowers the error
        p = {k: v for k, v in packed.items() if not k.startswith(n + '.l')}
        base = dequantize_state(p)[n]
        k = QuantSpec.clip[stats['cat'][n]]
        assert (base.abs() <= k * state[n].std(dim=1, keepdim=True) * (1 + 1e-3)).all()
        H = hess.get(n)  # LQER lowers the output (H-weighted) error, or the plain one without H
        assert err(out[n] - state[n], H) <= err(base - state[n], H)
        assert torch.equal(out[n], base) == (n not in stats['lqer'])
    packed2, _ = quantize_state(state, hess, QuantSpec())
    assert packed2.keys() == packed.keys() and all(torch.equal(packed[k], packed2[k]) for k in packed)


def test_spec_overrides():
    spec = QuantSpec(lqer_top_k=0, awq=False, embed_name='emb.w', is_gate=lambda n: n.endswith('g'))
    assert spec.category('emb.w', torch.zeros(512, 256)) == 'embed'
    assert spec.category('x.g', torch.zeros(4, 4)) == 'gate' and spec.category('attn.gate', torch.zeros(4, 4)) == 'small'
    with pytest.raises(AttributeError):
        QuantSpec(lqer_topk=1)
    state, hess = make_state()
    packed, stats = quantize_state(state, hess, QuantSpec(lqer_top_k=0, awq=False))
    assert not stats['lqer'] and not any(k.endswith(('.la', '.hs')) for k in packed)


def test_hessian_hook_shares_the_product_of_a_shared_input(monkeypatch):
    """q, k and v see one input tensor: one X^T X serves all three, and a tensor written to in between (or another
    tensor) gets its own product."""
    import train_gpt
    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(16, n, bias=False) for n in (16, 8, 8))
    hook = HessianHook([('q', q), ('k', k), ('v', v)])
    calls, real = [], train_gpt.gram
    monkeypatch.setattr(train_gpt, "gram", lambda x: calls.append(x.shape) or real(x))
    x, x2 = torch.randn(3, 5, 16), torch.randn(4, 16)
    with torch.no_grad():
        q(x); k(x); v(x)
        assert len(calls) == 1
        X0 = x.reshape(-1, 16).clone()
        x.mul_(2)  # written to: a new product
        q(x)
        q(x2); k(x2)
    assert len(calls) == 3
    X = x.reshape(-1, 16)
    assert torch.allclose(hook.H['v.weight'], X0.T @ X0, atol=1e-4) and hook.n['v.weight'] == 15
    assert torch.allclose(hook.H['k.weight'], X0.T @ X0 + x2.T @ x2, atol=1e-4) and hook.n['k.weight'] == 19
    assert torch.allclose(hook.H['q.weight'], X0.T @ X0 + X.T @ X + x2.T @ x2, atol=1e-4) and hook.n['q.weight'] == 34


def test_hessian_hook_accumulates_over_repeated_calls():
    torch.manual_seed(0)
    lin, other = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(8, 4)
    hook = HessianHook([('lin', lin), ('other', other), ('act', torch.nn.ReLU())])
    x1, x2 = torch.randn(2, 5, 16), torch.randn(3, 16)
    with torch.no_grad():
        other(lin(x1))
        lin(x2)  # second call (depth recurrence) also accumulates
    X = torch.cat([x1.reshape(-1, 16), x2])
    assert set(hook.H) == {'lin.weight', 'other.weight'} and hook.n['lin.weight'] == 13
    assert torch.allclose(hook.H['lin.weight'], X.T @ X, atol=1e-5)
    assert torch.allclose(hook.hessians()['lin.weight'], X.T @ X / 13, atol=1e-6)
    hook.remove()
    lin(x2)
    assert hook.n['lin.weight'] == 13
