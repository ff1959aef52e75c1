"""Attention backends on one training micro-batch of real packed documents (device machine, not CI).

    DATA_PATH=... python tests/gpu_attn_bench.py

For every importable backend: correctness of forward and gradients against masked SDPA in fp32, then the time of
one layer's forward and forward+backward (the record shapes: 8 query / 4 KV heads of 64 dims, TRAIN_BATCH_TOKENS/8
tokens in TRAIN_SEQ_LEN windows), and TFLOP/s counted over the causal pairs inside documents."""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import train_gpt as T

dev = torch.device("cuda")
cfg = T.Config()
tok = np.asarray(T.read_shard(T.list_shards(cfg.data_path, "train")[0]))
N = cfg.train_batch_tokens // 8
cu_np = T.segment_bounds(tok[:N], cfg.train_seq_len)
L = np.diff(cu_np).astype(np.float64)
pairs = float((L * (L + 1) / 2).sum())
cu = torch.from_numpy(np.pad(cu_np, (0, 64), constant_values=N)).to(dev)
H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads
print(f"micro-batch {N} tokens, {len(L)} segments (mean {L.mean():.0f}), {pairs / N:.0f} causal pairs per token", flush=True)


def bench(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def attn(q, k, v, c, n, b):
    if b == "varlen-repeat":  # the baseline: KV heads repeated to the query heads before PyTorch's varlen_attn
        g = q.shape[1] // k.shape[1]
        return T.varlen_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), c, n, "varlen")
    return T.varlen_attention(q, k, v, c, n, b)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


backends = []
for b in ("fa3", "fa4", "varlen"):
    try:
        T.pick_attention(b, dev)
        backends.append(b)
    except SystemExit as e:
        print(f"skip {b}: {e}")
backends.append("varlen-repeat")
# correctness on a short slice (SDPA reference in fp32)
n_small = int(cu_np[np.searchsorted(cu_np, 8192)])
cs = torch.from_numpy(cu_np[cu_np <= n_small]).to(dev)
qs, ks, vs = (torch.randn(n_small, h, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for h in (H, KV, KV))
g = torch.randn(n_small, H, D, device=dev, dtype=torch.bfloat16)
ref_in = [t.detach().float().requires_grad_() for t in (qs, ks, vs)]
ref = T.varlen_attention(*ref_in, cs, cfg.train_seq_len, "sdpa")
ref.backward(g.float())
def measure(b):
    """(fwd s, fwd+bwd s, correct) of backend b; prints the details."""
    t0 = time.perf_counter()
    out = attn(qs, ks, vs, cs, cfg.train_seq_len, b)
    out.backward(g)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    errs = [rel(out, ref)] + [rel(t.grad, r.grad) for t, r in zip((qs, ks, vs), ref_in)]
    for t in (qs, ks, vs):
        t.grad = None
    q, k, v = (torch.randn(N, h, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for h in (H, KV, KV))
    go = torch.randn(N, H, D, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        tf = bench(lambda: attn(q, k, v, cu, cfg.train_seq_len, b))
    tfb = bench(lambda: attn(q, k, v, cu, cfg.train_seq_len, b).backward(go))
    # inside torch.compile, as the model uses it (one graph, no break)
    f = torch.compile(lambda q, k, v: attn(q, k, v, cu, cfg.train_seq_len, b) * 1.5, fullgraph=True)
    try:
        comp = f"{bench(lambda: f(q, k, v).backward(go)) * 1e3:.2f}"
    except Exception as e:  # noqa: BLE001
        comp = f"fails: {type(e).__name__}: {str(e)[:120]}"
    ok = max(errs) < 2e-2
    print(f"{b}: first call (JIT) {first:.1f}s; rel err out/dq/dk/dv {' '.join(f'{e:.1e}' for e in errs)} {'OK' if ok else 'FAIL'}; "
          f"fwd {tf * 1e3:.2f} ms ({4 * pairs * H * D / tf / 1e12:.0f} TFLOP/s), fwd+bwd {tfb * 1e3:.2f} ms "
          f"({14 * pairs * H * D / tfb / 1e12:.0f} TFLOP/s); compiled fwd+bwd {comp} ms", flush=True)
    return tf, tfb, ok


rows = []
for b in backends:
    try:
        rows.append((b, *measure(b)))
    except Exception as e:  # noqa: BLE001
        print(f"{b}: fails: {type(e).__name__}: {str(e)[:300]}", flush=True)
base = dict((r[0], r) for r in rows).get("varlen-repeat")
print("\n| backend | fwd ms/layer | fwd+bwd ms/layer | per step (x 8 micro x 11 layers, no loop) | vs varlen-repeat | correct |")
print("| --- | --- | --- | --- | --- | --- |")
for b, tf, tfb, ok in rows:
    print(f"| {b} | {tf * 1e3:.2f} | {tfb * 1e3:.2f} | {tfb * 88:.2f} s | {base[2] / tfb:.2f}x | {ok} |" if base else
          f"| {b} | {tf * 1e3:.2f} | {tfb * 1e3:.2f} | {tfb * 88:.2f} s | - | {ok} |")
