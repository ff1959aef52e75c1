"""Phased TTT speed on the first TTT_BENCH_TOKENS val tokens (device machine, not CI).

    DATA_PATH=... [TTT_BENCH_GRAPHS=1,0] [TTT_BENCH_SETTINGS="EAGER_KERNELS=0,EAGER_KERNELS=1 TTT_CUDA_GRAPHS=0"] python tests/gpu_ttt_bench.py

TTT_BENCH_GRAPHS lists the TTT_CUDA_GRAPHS settings to run, one after another in this process (same model, same
adapter init), so their times are ratios measured in one run. TTT_BENCH_SETTINGS, if given, lists whole settings
instead: comma-separated, each a space-separated list of KEY=VALUE env overrides. With more than one setting (or
TTT_BENCH_WARMUP=1), each first runs untimed over the first 32 documents: the first TTT of a process pays one-time
costs (imports, Triton builds and loads; 6-10 s on an H200), which would otherwise count against the first setting.
With one setting and no TTT_BENCH_WARMUP, the time includes them, as a cold evaluation would.

A freshly initialized record-size model (TTT speed does not depend on what the weights learned); every setting as in
the record configuration; every document is a phase-prefix document, as on the whole 2,000-doc bench val set
(TTT_BENCH_PREFIX_DOCS=N: the first N only). Prints the TTT time (everything included, as inside the eval timer), scored
tokens/s and the LoRA step statistics.

TTT_BENCH_MEAN_DOC_LEN=957 stands in for a val set of longer documents (FineWeb val: 47,851,520 tokens / 50,000 docs):
as many documents as the val set has are drawn from it with replacement, with probability proportional to length^a,
a chosen so that the expected mean length is the one asked for (for a log-normal length distribution this is the
same distribution with every length scaled). A LoRA chunk step runs over each document's context up to the chunk,
so TTT's cost per scored token grows with the document lengths."""
import copy, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import train_gpt as T

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
rt = T.Runtime(0, 1, 0, dev, True)
cfg0 = T.Config()
val = np.concatenate([np.asarray(T.read_shard(f)) for f in T.list_shards(cfg0.data_path, "val")]).astype(np.int64)
mean_len = float(os.environ.get("TTT_BENCH_MEAN_DOC_LEN", "0"))
if mean_len:  # a stand-in for a val set of longer documents (TTT's cost per token grows with the document length)
    doc = [val[s:e] for s, e in T.doc_ranges(val)]
    lens = np.array([len(d) for d in doc], dtype=np.float64)
    lo, hi = 0.0, 4.0  # documents drawn with replacement, probability ~ length^a; a bisected for the mean length
    for _ in range(60):
        a = (lo + hi) / 2
        lo, hi = (a, hi) if (lens ** (a + 1)).sum() / (lens ** a).sum() < mean_len else (lo, a)
    pick = np.random.default_rng(0).choice(len(doc), size=len(doc), p=lens ** a / (lens ** a).sum())
    val = np.concatenate([doc[i] for i in pick])
    print(f"documents drawn with probability ~ length^{a:.3f}: mean {lens[pick].mean():.0f} tokens "
          f"(the val set's {lens.mean():.0f})", flush=True)
n = int(os.environ.get("TTT_BENCH_TOKENS", "300000"))
starts = np.flatnonzero(val == T.BOS_ID)
val = val[:int(starts[np.searchsorted(starts, n)]) if n < len(val) else len(val)]
docs = T.doc_ranges(val)
# default: every document is a phase-prefix document, as on the whole bench val set (2,000 docs < 2,500)
prefix = int(os.environ.get("TTT_BENCH_PREFIX_DOCS", len(docs)))
torch.manual_seed(0)
base = T.GPT(cfg0).to(dev)
base.attn_backend = T.pick_attention(cfg0.attn_backend, dev, training=False)
state = copy.deepcopy(base.state_dict())
print(f"{len(val):,} tokens, {len(docs)} docs (longest {max(e - s for s, e in docs):,}), prefix docs {prefix}", flush=True)
times = {}
settings = (os.environ.get("TTT_BENCH_SETTINGS") or ",".join(
    f"TTT_CUDA_GRAPHS={g}" for g in os.environ.get("TTT_BENCH_GRAPHS", "1").split(","))).split(",")


def run(graphs, tokens):
    """One timed TTT of the given setting over tokens: (seconds, loss, scored tokens, stats)."""
    env = dict(os.environ, PHASED_TTT_PREFIX_DOCS=str(min(prefix, len(T.doc_ranges(tokens)) - 1)))
    env.update(kv.split("=", 1) for kv in graphs.split())
    env.pop("TTT_BENCH_SETTINGS", None)
    cfg = T.Config(env)
    m = T.GPT(cfg).to(dev)
    m.load_state_dict(state)
    m.attn_backend, m.looping = base.attn_backend, True
    sc = T.Scorer(m, tokens, np.ones_like(tokens), dev, cfg.fused_ce)
    torch.manual_seed(1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    (loss, bpb, ntok, _), st = T.ttt_eval(m, sc, tokens, cfg, rt, time.perf_counter() + 1e6)
    dt = time.perf_counter() - t
    del m, sc
    torch.cuda.empty_cache()
    return dt, loss, ntok, st


# the first TTT of a process pays one-time costs (imports, Triton builds and loads): with several settings, an
# untimed TTT of each over the first 32 documents comes first, so that no timed setting pays them for the others
if os.environ.get("TTT_BENCH_WARMUP", "1" if len(settings) > 1 else "0") == "1":
    small = val[:int(starts[min(32, len(starts) - 1)])]
    for graphs in settings:
        print(f"warm-up {graphs}: {run(graphs, small)[0]:.1f}s (untimed)", flush=True)
for graphs in settings:
    dt, loss, ntok, st = times[graphs] = run(graphs, val)
    print(f"{graphs}: {dt:.1f}s, {ntok / dt:,.0f} scored tok/s, loss {loss:.6f}, peak "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; {st}", flush=True)
if len(times) > 1:
    print("time ratios vs the first setting:", {k: round(v[0] / times[settings[0]][0], 3) for k, v in times.items()}, flush=True)
