"""Evaluation legality suite (SPEC 0, C1-C4; issue 5 point 1) on CPU with a tiny model.

Each condition has a checker that runs the product, and a test double that plants the violation the checker must
catch (the doubles live here, never in train_gpt.py):
  C1 causal      future tokens never change an earlier token's score  | double: learns a chunk before scoring it;
                                                                         n-gram table that counts before it hints
  C2 normalized  tilted + calibrated distribution sums to 1            | double: tilt without the normalizer Z
  C3 score first every update reads only already-scored positions     | doubles: the learn-first TTT, count-first table
  C4 single pass every target scored once, bytes = sidecar total       | double: TTT that scores a chunk twice
"""
import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import synthetic_docs

CPU = T.Runtime(0, 1, 0, torch.device("cpu"), True)


def tiny_cfg(**kw):
    env = dict(RUN_PRESET="tiny", DATA_PATH="/nonexistent", TTT_CHUNK=16, TTT_BATCH_DOCS=4, PHASED_TTT_PREFIX_DOCS=6,
               PHASED_TTT_PHASES=3, TTT_SGD_CHUNK_TOKENS=128, TTT_LORA_LR=1e-2, TTT_SGD_LR=1e-2, NGRAM_ORDER=3)
    env.update(kw)
    return T.Config({k: str(v) for k, v in env.items()})


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    m = T.GPT(cfg)
    with torch.no_grad():  # zero-initialized projections would hide paths: randomize everything a little
        for name, p in m.named_parameters():
            if "embed" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    m.looping = True
    return m


def val_stream(seed=0, n_docs=10, mean_len=48):
    rng = np.random.default_rng(seed)
    tokens = np.concatenate(synthetic_docs(rng, n_docs, 1024, mean_len)).astype(np.int64)
    return tokens, np.where(tokens == T.BOS_ID, 0, rng.integers(1, 6, size=len(tokens))).astype(np.int64)


def perturbed(tokens, t, seed=1):
    """Tokens t.. replaced by other non-BOS tokens (BOS kept, so the documents stay the same)."""
    out = tokens.copy()
    keep = out[t:] == T.BOS_ID
    out[t:] = np.where(keep, T.BOS_ID, (out[t:] - 4 + np.random.default_rng(seed).integers(1, 1000, len(out) - t)) % 1020 + 4)
    return out


def run_ttt(tokens, nbytes, cfg, ttt_cls=T.TTT, tilt_cls=None, calib=None, seed=0):
    """One TTT evaluation with tracing on: (result, trace)."""
    T.EVAL_TRACE = []
    try:
        m = make_model(cfg, seed)
        sc = T.Scorer(m, tokens, nbytes, CPU.device, calib=calib, boost=cfg.ngram_boost)
        if tilt_cls is not None:
            sc.hints = tilt_cls(cfg.ngram_order, cfg.ngram_threshold).hints(sc.tokens)
        torch.manual_seed(seed)
        res, _ = ttt_cls(m, sc, tokens, cfg, CPU, float("inf")).run()
        return res, T.EVAL_TRACE
    finally:
        T.EVAL_TRACE = None


def scores(trace):
    """{target position: NLL} from the trace's score events."""
    out = {}
    for ev, pos, vals in trace:
        if ev == "score":
            out.update(zip(pos.tolist(), vals.tolist()))
    return out


def c1_change(run, tokens, ts):
    """Largest change of an earlier target's score when tokens t.. change (0 = causal)."""
    base, worst = scores(run(tokens)), 0.0
    for t in ts:
        new = scores(run(perturbed(tokens, t)))
        assert any(abs(new[j] - base[j]) > 1e-6 for j in base if j >= t), "perturbation had no effect at all"
        worst = max(worst, max(abs(new[j] - base[j]) for j in base if j < t))
    return worst


def c3_violations(trace, tokens):
    """Updates reading a position not yet scored (n-gram: not yet hinted). A document's own leading BOS is a
    boundary marker known in advance (documents are split at BOS up front) and is exempt."""
    seen = {"score": np.zeros(len(tokens) + 1, bool), "ngram_hint": np.zeros(len(tokens) + 1, bool)}
    need = {"lora_update": "score", "sgd_update": "score", "ngram_update": "ngram_hint"}
    free, bad, updates = tokens == T.BOS_ID, 0, 0
    for ev, pos, _ in trace:
        if ev in seen:
            seen[ev][pos] = True
        else:
            updates += 1
            bad += int((~seen[need[ev]][pos] & ~free[pos]).sum())
    assert updates > 0, "nothing was updated: the check would be vacuous"
    return bad


def c4_ok(res, trace, tokens, nbytes):
    counts = np.bincount(np.concatenate([p for ev, p, _ in trace if ev == "score"]), minlength=len(tokens))
    return (res[2] == len(tokens) - 1 and res[3] == int(nbytes[1:].sum()) and counts[0] == 0
            and bool((counts[1:] == 1).all()))


# ---- test doubles: each plants one violation -------------------------------------------------------------------
class LearnFirstTTT(T.TTT):
    """Violation (C1, C3): every chunk is learned from BEFORE it is scored."""

    def lora_step(self, ps, vs, meta, L, rows, train):
        trace, tot, meta = T.EVAL_TRACE, self.tot, meta.clone()
        meta[3] = meta[1] > 0  # every row learns, its last chunk included
        T.EVAL_TRACE, self.tot = [], torch.zeros_like(tot)
        super().lora_step(ps, vs, meta, L, rows, True)  # learn from the chunk (this pass's scores are dropped) ...
        trace += [e for e in T.EVAL_TRACE if e[0] == "lora_update"]
        T.EVAL_TRACE, self.tot = trace, tot
        super().lora_step(ps, vs, meta, L, rows, False)  # ... then score it with the updated adapters


class CountFirstTilt(T.NgramTilt):
    """Violation (C1, C3): the block's tokens, its own targets included, are counted before its hints."""

    def run_block(self, K, Fv, pos):
        self.count(*self.predict(K, Fv)[1])
        T._trace("ngram_update", pos)
        hint = self.predict(K, Fv)[0]
        T._trace("ngram_hint", pos)
        return hint


class UnnormalizedScorer(T.Scorer):
    """Violation (C2): the tilt without its normalizer Z."""

    def logprobs(self, zc, hint=None):
        lp = super().logprobs(zc)
        if hint is not None:
            lp = lp + self.boost * torch.nn.functional.one_hot(hint.clamp_min(0), lp.shape[-1]) * (hint >= 0)[..., None]
        return lp


class DoubleScoreTTT(T.TTT):
    """Violation (C4): the first chunk of every batch is scored a second time."""

    def lora_batch(self, batch):
        super().lora_batch(batch)
        C, W = self.cfg.ttt_chunk, self.cfg.ttt_context
        self.score_rows([(s, min(e, s + C), s) for s, e in batch])


# ---- C1 -----------------------------------------------------------------------------------------------------------
def run_tilt(tokens, nbytes, cfg, tilt_cls=T.NgramTilt):
    """Plain windows scored with the n-gram tilt, tracing on."""
    T.EVAL_TRACE = []
    try:
        sc = T.Scorer(make_model(cfg), tokens, nbytes, CPU.device, boost=cfg.ngram_boost)
        sc.hints = tilt_cls(cfg.ngram_order, cfg.ngram_threshold).hints(sc.tokens)
        T.eval_windows(sc, T.plain_rows(tokens, 128), CPU, 1024)
        return T.EVAL_TRACE
    finally:
        T.EVAL_TRACE = None


def test_c1_causal_ttt_path_and_ngram_tilt():
    tokens, nbytes = val_stream()
    cfg = tiny_cfg(NGRAM_TILT=1)
    docs = T.doc_ranges(tokens)
    # mid-chunk positions: in a phase-1 prefix document (the phases then learn from it) and in a later document
    ts = [next(s + 21 for s, e in docs[:2] if e - s > 30), next(s + 9 for s, e in docs[7:] if e - s > 16)]
    calib = (torch.tensor(1.1), torch.linspace(-0.5, 0.5, 1024))
    product = lambda tok: run_ttt(tok, nbytes, cfg, tilt_cls=T.NgramTilt, calib=calib)[1]
    assert c1_change(product, tokens, ts) < 1e-6
    assert c1_change(lambda tok: run_tilt(tok, nbytes, cfg), tokens, ts) < 1e-6
    for t in ts:  # the hints themselves: hint[j] for j <= t never depends on tokens t..
        h0 = T.NgramTilt(3, 0.8).hints(torch.from_numpy(tokens))
        h1 = T.NgramTilt(3, 0.8).hints(torch.from_numpy(perturbed(tokens, t)))
        assert torch.equal(h0[:t + 1], h1[:t + 1]) and (h0 >= 0).sum() > 20
    # planted violations are caught
    assert c1_change(lambda tok: run_ttt(tok, nbytes, cfg, ttt_cls=LearnFirstTTT)[1], tokens, ts) > 1e-3
    assert c1_change(lambda tok: run_tilt(tok, nbytes, cfg, CountFirstTilt), tokens, ts) > 1e-3


# ---- C2 -----------------------------------------------------------------------------------------------------------
def c2_deviation(scorer_cls, tokens, nbytes, cfg):
    """max |log sum_a p'(a)| of the full scored distribution, and max |scored NLL - (-log p'(y))|."""
    m = make_model(cfg)
    batches = [tuple(torch.from_numpy(a) for a in (tokens[:256], tokens[1:257], np.array([0, 128, 256], np.int32)))]
    calib, before, after = T.fit_calibration(m, batches, cfg)
    assert after <= before and calib[1].shape == (cfg.vocab_size,)
    sc = scorer_cls(m, tokens, nbytes, CPU.device, calib=calib, boost=cfg.ngram_boost)
    sc.hints = T.NgramTilt(cfg.ngram_order, cfg.ngram_threshold).hints(sc.tokens)
    rows = T.plain_rows(tokens, 64)
    x, cu, L, y, scored, _, tpos, sel = sc.batch(rows)
    assert sel is None  # plain rows: every position is scored
    with torch.no_grad():
        hint = sc.hints[tpos]
        assert (hint[scored] >= 0).sum() > 20, "the tilt must be active somewhere"
        lp = sc.logprobs(m.capped(m.logits(m.hidden(x, cu, L))), hint)
        nll = sc.forward(rows)[1]
    total = lp.logsumexp(-1)[scored].abs().max()
    consistent = (nll + lp.gather(-1, y[..., None])[..., 0])[scored].abs().max()
    return float(total), float(consistent)


def test_c2_normalized_tilt_and_calibration():
    tokens, nbytes = val_stream()
    total, consistent = c2_deviation(T.Scorer, tokens, nbytes, tiny_cfg())
    assert total < 1e-5 and consistent < 1e-4
    total, consistent = c2_deviation(UnnormalizedScorer, tokens, nbytes, tiny_cfg())
    assert total > 1e-2  # planted: caught


# ---- C3 -----------------------------------------------------------------------------------------------------------
def test_c3_updates_only_after_scoring():
    tokens, nbytes = val_stream()
    for cfg in (tiny_cfg(TTT_MAX_BATCH_TOKENS=100), tiny_cfg(TTT_MODE="full", TTT_SGD_CHUNK_TOKENS=96)):  # 100: split steps
        trace = run_ttt(tokens, nbytes, cfg)[1]
        assert c3_violations(trace, tokens) == 0
        assert {"lora_update", "sgd_update"} & {ev for ev, _, _ in trace}
    short = tokens[:300]
    T.EVAL_TRACE = []
    try:
        T.NgramTilt(3, 0.8, block=1).hints(torch.from_numpy(short))  # one event per token: exact ordering
        assert c3_violations(T.EVAL_TRACE, short) == 0
        T.EVAL_TRACE = []
        CountFirstTilt(3, 0.8, block=1).hints(torch.from_numpy(short))
        assert c3_violations(T.EVAL_TRACE, short) > 0  # planted: caught
    finally:
        T.EVAL_TRACE = None
    assert c3_violations(run_ttt(tokens, nbytes, tiny_cfg(), ttt_cls=LearnFirstTTT)[1], tokens) > 0  # planted: caught


# ---- C4 -----------------------------------------------------------------------------------------------------------
def test_c4_every_token_scored_once():
    tokens, nbytes = val_stream()
    cfg = tiny_cfg()
    m = make_model(cfg)
    sc = T.Scorer(m, tokens, nbytes, CPU.device)
    plain = T.plain_rows(tokens, 128)
    for rows, ok in ((plain, True), (T.sliding_rows(tokens, 64, 16), True), (plain + plain[:1], False)):  # last: planted
        T.EVAL_TRACE = []
        try:
            assert c4_ok(T.eval_windows(sc, rows, CPU, 1024), T.EVAL_TRACE, tokens, nbytes) == ok
        finally:
            T.EVAL_TRACE = None
    for cfg in (tiny_cfg(TTT_MAX_BATCH_TOKENS=100), tiny_cfg(TTT_MODE="full", TTT_SGD_CHUNK_TOKENS=96)):  # 100: split steps
        res, trace = run_ttt(tokens, nbytes, cfg)
        assert c4_ok(res, trace, tokens, nbytes)
    with pytest.raises(SystemExit, match="expected"):  # planted: the product's own guard refuses the total
        run_ttt(tokens, nbytes, tiny_cfg(), ttt_cls=DoubleScoreTTT)
