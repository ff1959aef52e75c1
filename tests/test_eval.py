"""Evaluation behaviour on CPU (issue 5 points 2 and 4 in miniature): TTT lowers the loss where adaptation clearly
helps, a small EVAL_BUDGET_SECONDS shrinks TTT work but never the scored tokens, the row builders score every target
once, and the vectorized n-gram table equals a sequential one."""
import time

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import synthetic_docs
from test_legality import CPU, c4_ok, make_model, tiny_cfg, val_stream


@pytest.fixture(scope="module")
def trained():
    """A tiny model briefly trained on repetitive synthetic documents (each repeats its own random pattern, so a
    document's earlier chunks predict its later ones: per-document adaptation clearly helps)."""
    cfg = tiny_cfg()
    m = make_model(cfg)
    rng = np.random.default_rng(1)
    train = np.concatenate(synthetic_docs(rng, 200, 1024, 64)).astype(np.int64)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(8):
        a = int(rng.integers(0, len(train) - 257))
        cu = torch.from_numpy(T.segment_bounds(train[a:a + 256], 128))
        m(torch.from_numpy(train[None, a:a + 256]), torch.from_numpy(train[None, a + 1:a + 257]), cu, 128).mean().backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def model_from(state, cfg):
    m = T.GPT(cfg)
    m.load_state_dict(state)
    return m


def test_ttt_lowers_loss(trained, capsys):
    tokens, nbytes = val_stream(seed=3, n_docs=12, mean_len=64)
    cfg = tiny_cfg(PHASED_TTT_PREFIX_DOCS=4)
    res = T.run_evaluation(model_from(trained, cfg), tokens, nbytes, cfg, CPU, time.perf_counter())
    assert res["val_tokens"] == len(tokens) - 1 and res["val_bytes"] == nbytes[1:].sum()
    assert res["ttt_val_bpb"] < res["quant_val_bpb"] - 0.2, res
    assert res["ttt_stats"]["phases_done"] == 3 and res["eval_shrunk"] == [] and res["ttt_tokens_per_s"] > 0
    # the same chunked scoring with no update at all
    off = tiny_cfg(TTT_LORA_LR=0, PHASED_TTT_PREFIX_DOCS=0)
    m = model_from(trained, off)
    m.looping = True
    (loss, bpb, n, _), _ = T.ttt_eval(m, T.Scorer(m, tokens, nbytes, CPU.device), tokens, off, CPU, float("inf"))
    assert res["ttt_val_bpb"] < bpb - 0.2 and n == len(tokens) - 1
    assert "ttt (phased) val_loss" in capsys.readouterr().out


def test_fewer_prefix_docs_than_phases(trained):
    """PHASED_TTT_PREFIX_DOCS=2 with 3 phases leaves the first phase group empty: the phases still run over the scored
    prefix and every token is scored once."""
    tokens, nbytes = val_stream(seed=3, n_docs=6, mean_len=48)
    cfg = tiny_cfg(PHASED_TTT_PREFIX_DOCS=2)
    m = model_from(trained, cfg)
    m.looping = True
    (_, _, n, nb), st = T.ttt_eval(m, T.Scorer(m, tokens, nbytes, CPU.device), tokens, cfg, CPU, float("inf"))
    assert n == len(tokens) - 1 and nb == nbytes[1:].sum() and st["phases_done"] == 2


def test_full_mode_lowers_loss(trained):
    tokens, nbytes = val_stream(seed=3, n_docs=12, mean_len=64)
    cfg = tiny_cfg(TTT_MODE="full", TTT_SGD_CHUNK_TOKENS=128, FULL_TTT_LR=0.05)
    res = T.run_evaluation(model_from(trained, cfg), tokens, nbytes, cfg, CPU, time.perf_counter())
    assert res["ttt_stats"]["full_chunks_trained"] > 3 and res["val_tokens"] == len(tokens) - 1
    assert res["ttt_val_bpb"] < res["quant_val_bpb"]


def test_small_budget_shrinks_work_never_tokens(trained, capsys):
    tokens, nbytes = val_stream(seed=4, n_docs=16, mean_len=64)
    cfg = tiny_cfg()
    full = float("inf")
    for _ in range(2):  # the faster of two runs: the first one pays one-off costs
        m = model_from(trained, cfg)
        m.looping = True
        t = time.perf_counter()
        T.ttt_eval(m, T.Scorer(m, tokens, nbytes, CPU.device), tokens, cfg, CPU, float("inf"))
        full = min(full, time.perf_counter() - t)
    # (a) no time at all: no adapter update, no phase, yet every token scored exactly once
    cfg = tiny_cfg(EVAL_BUDGET_SECONDS=0.01)
    m = model_from(trained, cfg)
    m.looping = True
    T.EVAL_TRACE = []
    try:
        res, st = T.ttt_eval(m, T.Scorer(m, tokens, nbytes, CPU.device), tokens, cfg, CPU, time.perf_counter() + 0.01)
        assert c4_ok(res, T.EVAL_TRACE, tokens, nbytes)
        assert not any(ev.endswith("update") for ev, _, _ in T.EVAL_TRACE)
    finally:
        T.EVAL_TRACE = None
    assert st["adapted_docs"] == 0 and st["phases_done"] == 0 and len(st["shrunk"]) == 2
    # (b) run_evaluation with a budget below the full TTT time: ends within it, shrinks, scores everything. TTT keeps
    # a reserve of 1 s + 3% of the budget (TTT.margin), so the budget leaves it half its full time beyond that (a
    # fixed floor let a fast machine fit the whole TTT in and skip the shrinking)
    budget = (1.0 + 0.5 * full) / 0.97
    cfg = tiny_cfg(EVAL_BUDGET_SECONDS=budget)
    t0 = time.perf_counter()
    res = T.run_evaluation(model_from(trained, cfg), tokens, nbytes, cfg, CPU, t0)
    assert time.perf_counter() - t0 <= budget and res["eval_time_s"] <= budget
    assert res["eval_shrunk"] and res["val_tokens"] == len(tokens) - 1 and res["val_bytes"] == nbytes[1:].sum()
    assert "eval budget: " in capsys.readouterr().out
    # (c) a budget that even plain scoring cannot meet: the run exits non-zero
    cfg = tiny_cfg(EVAL_BUDGET_SECONDS=0.001)
    with pytest.raises(SystemExit, match="EVAL_BUDGET_SECONDS"):
        T.run_evaluation(model_from(trained, cfg), tokens, nbytes, cfg, CPU, time.perf_counter())


def test_scoring_windows_runs_with_frozen_weights(trained):
    """eval_windows (pre-quant, quantized, sliding, calibrated diagnostics) scores with the weights frozen, so that on a
    GPU the eager kernels serve it, and leaves every requires_grad as it was."""
    tokens, nbytes = val_stream(seed=4, n_docs=6, mean_len=64)
    cfg = tiny_cfg()
    m = model_from(trained, cfg)
    m.skip_w.requires_grad_(False)
    before, seen = [p.requires_grad for p in m.parameters()], []
    m.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(any(p.requires_grad for p in m.parameters())))
    loss, bpb, n, nb = T.eval_windows(T.Scorer(m, tokens, nbytes, CPU.device), T.plain_rows(tokens, 128), CPU, 1024)
    assert n == len(tokens) - 1 and seen and not any(seen)
    assert [p.requires_grad for p in m.parameters()] == before and not all(before)


def test_rows_score_every_target_once():
    tokens, _ = val_stream(seed=5, n_docs=30, mean_len=100)
    docs = T.doc_ranges(tokens)
    starts = np.array([s for s, _ in docs])
    for window, stride in ((128, 128), (128, 16), (64, 64), (200, 7)):
        for rows, step in ((T.sliding_rows(tokens, window, stride), stride), (T.plain_rows(tokens, window), window)):
            cover = np.zeros(len(tokens), int)
            for a, b, f in rows:
                s, e = docs[np.searchsorted(starts, a, "right") - 1]
                assert s <= a <= f < b <= e and b - a <= window  # context from its own document, within the window
                assert f - a >= min(window - step, f - s)  # sliding: every target keeps >= window - stride context
                cover[f + 1:b + 1] += 1
            assert cover[0] == 0 and (cover[1:] == 1).all()


def sequential_hints(tok, order, thr):
    """Reference: one position at a time, hint from the table, then count the true token."""
    table, out = {}, np.full(len(tok), -1)
    for j, t in enumerate(tok):
        key = tuple([-1] * max(0, order - j) + list(tok[max(0, j - order):j]))
        counts = table.setdefault(key, {})
        tot = sum(counts.values())
        out[j] = next((f for f, c in counts.items() if tot and c >= thr * tot), -1)
        counts[t] = counts.get(t, 0) + 1
    return out


@pytest.mark.parametrize("order,thr", [(1, 0.8), (2, 0.6), (3, 0.8)])
def test_ngram_matches_sequential_table(order, thr):
    rng = np.random.default_rng(order)
    tok = np.where(rng.random(600) < 0.85, np.resize([5, 6, 7, 8, 9], 600), rng.integers(4, 12, 600))
    ref = sequential_hints(tok.tolist(), order, thr)
    assert (ref >= 0).mean() > 0.3
    for block in (1 << 22, 1, 7, 100):
        assert (T.NgramTilt(order, thr, block).hints(torch.from_numpy(tok)).numpy() == ref).all(), block


def test_split_forwards_match_whole_steps():
    """TTT_MAX_BATCH_TOKENS only splits a chunk step's documents over several forwards: same scores."""
    from test_legality import run_ttt, scores
    tokens, nbytes = val_stream(seed=6, n_docs=8)
    whole = scores(run_ttt(tokens, nbytes, tiny_cfg())[1])
    split = scores(run_ttt(tokens, nbytes, tiny_cfg(TTT_MAX_BATCH_TOKENS=40))[1])
    assert whole.keys() == split.keys() and max(abs(whole[j] - split[j]) for j in whole) < 1e-4


def _rank_worker(rank, world, port, q):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = T.Runtime(rank, world, 0, torch.device("cpu"), rank == 0)
    tokens, nbytes = val_stream(n_docs=16)
    out = []
    for mode in ("phased", "full", "phased"):  # twice phased: a second run gets a fresh queue
        m = make_model(tiny_cfg())
        res = T.run_evaluation(m, tokens, nbytes, tiny_cfg(TTT_MODE=mode, NGRAM_TILT=1), rt, time.perf_counter())
        w = torch.cat([p.detach().flatten() for p in m.parameters()])
        ws = [torch.zeros_like(w) for _ in range(world)]
        dist.all_gather(ws, w)
        out.append((res["val_tokens"], res["val_bytes"], float(max((x - ws[0]).abs().max() for x in ws))))
    q.put(out)
    dist.destroy_process_group()


def test_two_ranks_share_the_queue_and_stay_in_sync():
    """world 2 (gloo): batches pulled from the store counter, every target once, base weights identical on both
    ranks after the global phases / full-model steps."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    tokens, nbytes = val_stream(n_docs=16)
    for out in (q.get(), q.get()):
        for n, nb, diff in out:
            assert n == len(tokens) - 1 and nb == nbytes[1:].sum() and diff == 0.0


def test_cuda_graph_padding_is_exact(trained, monkeypatch):
    """The CUDA-graph path pads each LoRA forward's row count (TTT_PAD_ROWS) and length (buckets), and splits rows
    into forwards by TTT_MAX_BATCH_TOKENS: no score changes (same padding, eagerly, on CPU)."""
    tokens, nbytes = val_stream(seed=5, n_docs=10, mean_len=80)
    results = []
    for pad, max_tokens, rows in ((False, 65536, "x8"), (True, 65536, "x8"), (True, 65536, "pow2"), (True, 300, "x8"),
                                  (True, 300, "pow2"), (False, 300, "x8")):
        cfg = tiny_cfg(PHASED_TTT_PREFIX_DOCS=0, TTT_BATCH_DOCS=10, TTT_LORA_LR=0.01, TTT_MAX_BATCH_TOKENS=max_tokens,
                       TTT_PAD_ROWS=rows)
        m = model_from(trained, cfg)
        m.looping = True
        monkeypatch.setattr(T.TTT, "pad_always", pad)
        torch.manual_seed(1)  # the adapters' random init
        results.append(T.ttt_eval(m, T.Scorer(m, tokens, nbytes, CPU.device), tokens, cfg, CPU, float("inf"))[0])
    assert all(r[2:] == results[0][2:] for r in results)
    assert max(abs(r[0] - results[0][0]) for r in results) < 1e-6, results


def test_ttt_scores_the_same_through_lora_linears(trained, monkeypatch):
    """TTT with its adapted linears as LoraLinears nodes (the GPU path; here on the CPU, without the Triton kernels
    when triton is missing) scores as with lora_linear's torch expressions, global SGD phases included."""
    if T.HAVE_TRITON:
        pytest.skip("triton installed: the CPU run would need the Triton interpreter (the interpreter test covers it)")
    tokens, nbytes = val_stream(seed=6, n_docs=6, mean_len=60)
    cfg = tiny_cfg(PHASED_TTT_PREFIX_DOCS=3, TTT_BATCH_DOCS=3, TTT_LORA_LR=0.01)
    results, calls = [], []
    orig = T.LoraLinears.apply
    monkeypatch.setattr(T.LoraLinears, "apply", lambda *a: calls.append(1) or orig(*a))
    for on in (True, False):
        monkeypatch.setattr(T, "EAGER_KERNELS_ANYWHERE", on)
        m = model_from(trained, cfg)
        m.looping = True
        torch.manual_seed(1)
        results.append(T.ttt_eval(m, T.Scorer(m, tokens, nbytes, CPU.device), tokens, cfg, CPU, float("inf"))[0])
        assert (len(calls) > 0) == on
        calls.clear()
    assert results[0][2:] == results[1][2:] and abs(results[0][0] - results[1][0]) < 1e-6, results


def test_lora_adamw_matches_torch():
    torch.manual_seed(0)
    ps = [torch.randn(3, 5, 4), torch.randn(3, 4, 7)]
    ref = [p.clone().requires_grad_() for p in ps]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.0, 0.99), weight_decay=0.5)
    vs, t = [torch.zeros_like(p) for p in ps * 2], torch.zeros(())
    for step in range(1, 5):
        gs = [torch.randn_like(p) for p in ps]
        for r, g in zip(ref, gs):
            r.grad = g.clone()
        opt.step()
        t.fill_(step)
        T.lora_adamw_(ps, gs, vs, t, 1e-2, 0.5)
        for p, r in zip(ps, ref):
            assert torch.allclose(p, r.detach(), atol=1e-6, rtol=1e-5)


def test_lora_shapes_row_rules():
    assert [B for *_, B, _ in T.lora_shapes(40, 100, 65536, True, "x8")] == [40]
    assert [B for *_, B, _ in T.lora_shapes(40, 100, 65536, True, "pow2")] == [64]
    assert list(T.lora_shapes(20, 2048, 65536, True, "x8")) == [(0, 20, 24, 2048)]
    assert list(T.lora_shapes(40, 2048, 65536, True, "x8")) == [(0, 32, 32, 2048), (32, 8, 8, 2048)]
    assert list(T.lora_shapes(5, 700, 65536, False, "x8")) == [(0, 5, 5, 700)]
    with pytest.raises(SystemExit, match="TTT_PAD_ROWS"):
        T.ttt_eval(None, None, None, tiny_cfg(TTT_PAD_ROWS="x4"), CPU, 0.0)


def test_cost_fit_leaves_out_warm_up_batches():
    """The LoRA cost model that the eval budget projects with ignores batches that warmed up (first CUDA-graph
    capture and its lazy initialization): their one-time seconds would inflate every later projection."""
    from types import SimpleNamespace
    rows = [(s, w, 0.01 * s + 1e-3 * w, False) for s, w in ((10, 1000), (20, 5000), (5, 3000), (40, 2000))]
    fit = T.TTT.cost_fit(SimpleNamespace(adapt_log=rows + [(50, 9000, 80.0, True)]))
    assert np.allclose(fit, [0.01, 1e-3])
    only = T.TTT.cost_fit(SimpleNamespace(adapt_log=[(50, 9000, 80.0, True)]))  # only warm-up rows: those are used
    assert np.isclose(only @ [50, 9000], 80.0)
