"""Where a training step's and a TTT step's time goes, at the record configuration (device machine, not CI).

    DATA_PATH=... python tests/gpu_profile.py [train] [ttt] [matmul] [hessian]

train: compiles (COMPILE_SCOPE as set), times PROFILE_STEPS steps before and after looping, then profiles one
step of each and prints GPU time per kernel category and the top kernels. ttt: times LoRA TTT batches (TTT_CUDA_GRAPHS
as set; the kernel table is that of the eager path when it is 0) of 1, 8 and TTT_BATCH_DOCS documents; the tables cover
the first 3 chunk steps of the 1-document batch and the last 3 forwards (full context windows) of the largest batch,
or each whole batch with PROFILE_TTT_FULL=1. matmul: the bf16 matmul ceiling used for MFU. hessian: GPTQ calibration
(collect_hessians) per training batch, over PROFILE_STEPS batches after one that builds the eager kernels, and the
kernel table of one batch (not run by default). PROFILE_ROWS sets how many kernels the tables list (25). After each
training step's table: the GPU's idle time between kernels over two queued steps. PROFILE_COMPILE_TIMES=1 prints
torch.compile's time per phase after the warm-up."""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import train_gpt as T

what = set(sys.argv[1:]) or {"train", "ttt", "matmul"}
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cuda.matmul.allow_tf32 = True
cfg = T.Config()
rt = T.Runtime(0, 1, 0, dev, True)
STEPS = int(os.environ.get("PROFILE_STEPS", "5"))


def category(name):
    n = name.lower()
    if n.startswith("triton_"):
        return "inductor fused"
    if "flash" in n or "fmha" in n or "attn" in n or "kernel_cutlass" in n:
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "nvjet", "cublas", "sm90_", "wgmma")):
        return "matmul"
    if "softcap_ce" in n:
        return "softcap CE"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copy/memset"
    if "multi_tensor" in n or "foreach" in n or "adam" in n:
        return "optimizer (foreach)"
    return "other"


def gpu_table(prof, total_label, rows=int(os.environ.get("PROFILE_ROWS", "25"))):
    evs = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    tot = sum(e.self_device_time_total for e in evs) or 1
    cats = {}
    for e in evs:
        c = cats.setdefault(category(e.key), [0, 0])
        c[0] += e.self_device_time_total; c[1] += e.count
    print(f"--- {total_label}: GPU kernel time {tot / 1e3:.1f} ms")
    print(f"{'category':24s} {'ms':>9s} {'%':>6s} {'launches':>9s}")
    for k, (t, n) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        print(f"{k:24s} {t / 1e3:9.2f} {100 * t / tot:6.1f} {n:9d}")
    print(f"{'kernel':80s} {'ms':>8s} {'n':>6s}")
    for e in sorted(evs, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"{e.key[:120]:80s} {e.self_device_time_total / 1e3:8.2f} {e.count:6d}")


def gaps(prof, label):
    """GPU idle time between kernels (the wall time a step loses outside kernels), by gap size, and the largest gaps
    with the kernels around them: many small gaps mean launch latency, a few large ones a host sync or a slow CPU."""
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA)
    if not ks:
        return
    idle, last, name = [], ks[0][1], ks[0][2]
    for s, e, n in ks[1:]:
        if s > last:
            idle.append((s - last, name, n))
        if e > last:
            last, name = e, n
    span = last - ks[0][0]
    print(f"--- {label}: {len(ks)} kernels over {span / 1e3:.1f} ms, GPU idle {sum(g for g, *_ in idle) / 1e3:.1f} ms")
    for lo, hi in ((0, 5), (5, 50), (50, 1000), (1000, float("inf"))):
        sel = [g for g, *_ in idle if lo <= g < hi]
        print(f"gaps {lo}-{hi} us: {len(sel):6d}, {sum(sel) / 1e3:8.2f} ms")
    for g, a, b in sorted(idle, reverse=True)[:8]:
        print(f"{g / 1e3:8.3f} ms after {a[:60]} before {b[:60]}")


def timed(fn, n):
    T.sync(dev); t = time.perf_counter()
    for _ in range(n):
        fn()
    T.sync(dev)
    return (time.perf_counter() - t) / n


if "matmul" in what:
    a, b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16), torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    dt = timed(lambda: a @ b, 10)
    print(f"matmul ceiling: 8192^3 bf16 {2 * 8192 ** 3 / dt / 1e12:.0f} TFLOP/s", flush=True)

if "train" in what:
    t0 = time.perf_counter()
    m = T.GPT(cfg).to(dev)
    m.attn_backend = T.pick_attention(cfg.attn_backend, dev)
    tr = T.Trainer(cfg, rt, m)
    m.block_fns = tr.block_fns
    loops = [bool(int(x)) for x in os.environ.get("PROFILE_LOOPS", "0,1").split(",")]
    if loops == [False, True]:
        tr.warmup()
    else:  # compile only the loop settings asked for
        for lp in loops:
            m.looping = lp
            for s in range(max(1, cfg.warmup_steps)):
                tr.train_step(s, 0.0)
    T.sync(dev)
    print(f"compile + warm-up ({cfg.compile_scope}, {cfg.warmup_steps} steps per loop setting): "
          f"{time.perf_counter() - t0:.1f}s; backend {m.attn_backend}", flush=True)
    if os.environ.get("PROFILE_COMPILE_TIMES") == "1":  # torch.compile's own time per phase
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
    t = time.perf_counter()
    for _ in range(5):
        tr.loader.next_step()
    print(f"loader CPU time per step: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms", flush=True)
    flops = {}
    for looping in loops:
        m.looping = looping
        order = m.orders[looping]
        n_mat = sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks.") and p.ndim == 2) / cfg.num_layers
        flops[looping] = 6 * (n_mat * len(order) + cfg.vocab_size * cfg.model_dim)  # per token, matmuls only
        tr.train_step(0, 0.5)
        dt = timed(lambda: tr.train_step(0, 0.5), STEPS)
        tps = cfg.train_batch_tokens / dt
        print(f"looping={looping}: {dt * 1e3:.1f} ms/step, {tps / 1e6:.3f}M tok/s, "
              f"{flops[looping] * tps / 1e12:.0f} TFLOP/s of matmul work", flush=True)
        from torch.profiler import profile, ProfilerActivity
        if os.environ.get("PROFILE_TABLE", "1") == "1":
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                tr.train_step(0, 0.5); T.sync(dev)
            gpu_table(prof, f"one training step, looping={looping}")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:  # two steps queued as in training
                tr.train_step(0, 0.5); tr.train_step(0, 0.5); T.sync(dev)
            gaps(prof, f"two training steps, looping={looping}")
    del tr, m
    torch.cuda.empty_cache()

if "ttt" in what:
    m = T.GPT(cfg).to(dev)
    m.attn_backend, m.looping = T.pick_attention(cfg.attn_backend, dev, training=False), True
    val = np.concatenate([np.asarray(T.read_shard(f)) for f in T.list_shards(cfg.data_path, "val")]).astype(np.int64)
    nb = np.ones_like(val)
    sc = T.Scorer(m, val, nb, dev, cfg.fused_ce)
    ttt = T.TTT(m, sc, val, cfg, rt, time.perf_counter() + 1e6)
    for p in m.parameters():
        p.requires_grad_(False)
    docs = sorted(T.doc_ranges(val), key=lambda d: d[0] - d[1])
    span = cfg.ttt_context + 10 * cfg.ttt_chunk
    for n in (1, 8, cfg.ttt_batch_docs):
        batch = [(s, min(e, s + span)) for s, e in docs[:n]]
        steps, work = ttt.plan(batch)
        ttt.lora_batch(batch[:1])
        T.sync(dev); t = time.perf_counter()
        ttt.lora_batch(batch)
        T.sync(dev); dt = time.perf_counter() - t
        toks = sum(e - s for s, e in batch)
        print(f"TTT LoRA batch of {n} docs x {span} tokens: {steps} chunk steps in {dt:.2f}s = {dt / steps * 1e3:.1f} ms/step, "
              f"{toks / dt:,.0f} scored tok/s, {work / dt:,.0f} padded tok/s", flush=True)
        if n == 1 or n == cfg.ttt_batch_docs:
            from torch.profiler import profile, ProfilerActivity, schedule
            acts = [ProfilerActivity.CUDA, ProfilerActivity.CPU]
            if n > 1 and os.environ.get("PROFILE_TTT_FULL") != "1":  # the last 3 forwards: full context windows
                name = "replay" if ttt.graphs is not None else "lora_step"  # called once per forward
                orig, calls, prof = getattr(ttt, name), [0], None
                def counted(*a, **kw):
                    calls[0] += 1
                    r = orig(*a, **kw)
                    if prof is not None:
                        prof.step()
                    return r
                setattr(ttt, name, counted)
                ttt.lora_batch(batch); T.sync(dev)  # counts the forwards
                with profile(activities=acts, schedule=schedule(wait=max(0, calls[0] - 3), warmup=0, active=3, repeat=1)) as prof:
                    calls[0] = 0
                    ttt.lora_batch(batch); T.sync(dev)
                setattr(ttt, name, orig)
                gpu_table(prof, f"TTT LoRA batch of {n} docs, the last 3 of its {calls[0]} forwards (full windows)")
                continue
            short = batch if os.environ.get("PROFILE_TTT_FULL") == "1" else [(s, min(e, s + 3 * cfg.ttt_chunk)) for s, e in batch]
            with profile(activities=acts) as prof:
                ttt.lora_batch(short); T.sync(dev)
            gpu_table(prof, f"TTT LoRA batch of {n} docs, {ttt.plan(short)[0]} chunk steps")
            cpu = sum(e.self_cpu_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU)
            print(f"CPU self time of those steps: {cpu / 1e3:.1f} ms", flush=True)

if "hessian" in what:
    m = T.GPT(cfg).to(dev)
    m.attn_backend, m.looping = T.pick_attention(cfg.attn_backend, dev, training=False), cfg.num_loops > 0
    loader = T.TrainLoader(cfg, rt, T.grad_accum(cfg, rt))
    for n in (1, STEPS):  # the first call builds the eager kernels
        cfg.values["GPTQ_CALIB_BATCHES"] = n
        dt = timed(lambda: T.collect_hessians(m, loader, cfg, rt, float("inf")), 1)
        print(f"GPTQ calibration, {n} batch(es) of {cfg.train_batch_tokens:,} tokens: {dt / n:.3f} s per batch", flush=True)
    from torch.profiler import profile, ProfilerActivity
    cfg.values["GPTQ_CALIB_BATCHES"] = 1
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        T.collect_hessians(m, loader, cfg, rt, float("inf")); T.sync(dev)
    gpu_table(prof, "GPTQ calibration, one batch")

