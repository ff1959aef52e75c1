"""Parameter Golf 10-minute / 16 MB track: one-file training, GPTQ quantization,
compression and score-first TTT evaluation of a small GPT.

Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py   (1, 2, 4 or 8 GPUs)
Every knob is an environment variable (see CONFIG below / README.md).
Sections, in pipeline order:
  1 config   2 runtime   3 data   4 kernels   5 model   6 optimizers
  7 training   8 quantization + artifact   9 evaluation   10 main
"""
from __future__ import annotations

import base64, copy, difflib, glob, io, json, lzma, math, os, platform, struct, sys, time, zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 1. Configuration: (name, default, help). The README table is generated from it.
# =============================================================================
CONFIG = [
    # run / io
    ("RUN_ID", "", "run name; default: a timestamp"),
    ("RUN_PRESET", "", "'tiny' (CPU seconds), 'demo' (data/demo, one GPU minutes) or '' (record)"),
    ("ARTIFACT_DIR", "", "output folder; default runs/<RUN_ID>"),
    ("DATA_PATH", "./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", "folder of fineweb_{train,val}_*.bin shards"),
    ("TOKENIZER_PATH", "", "SentencePiece model; default DATA_PATH/tokenizer.model (needed only without a byte sidecar)"),
    ("SEED", 42, "random seed"),
    ("MAX_TRAIN_SHARDS", 0, "use only the first N train shards (0 = all)"),
    ("VAL_MAX_TOKENS", 0, "diagnostics: score only the first N val tokens (0 = all; the TTT score always uses all)"),
    # model
    ("VOCAB_SIZE", 8192, "vocabulary size"),
    ("MODEL_DIM", 512, "model width"),
    ("NUM_LAYERS", 11, "physical layers"),
    ("NUM_HEADS", 8, "query heads"),
    ("NUM_KV_HEADS", 4, "key/value heads (GQA)"),
    ("MLP_MULT", 4, "MLP hidden = MLP_MULT * MODEL_DIM"),
    ("ROPE_DIMS", 16, "rotary dims per head (partial RoPE)"),
    ("ROPE_BASE", 10000.0, "RoPE base"),
    ("QK_GAIN_INIT", 5.0, "initial learned per-head query gain"),
    ("LEAKY_SLOPE", 0.5, "MLP activation: leaky_relu(x, slope)^2"),
    ("EMBED_INIT_STD", 0.005, "tied embedding init std"),
    ("LOGIT_SOFTCAP", 30.0, "logit softcap c: c*tanh(z/c)"),
    ("ASYM_SOFTCAP", False, "learned separate caps for positive / negative logits (PR #1923)"),
    ("SMEAR_DIMS", 12, "input dims of the SmearGate and attention-output gates"),
    ("ATTN_GATE_SCALE", 0.5, "scale of the sparse attention output gate"),
    ("XSA", True, "gated exclusive self-attention on all layers"),
    ("NUM_LOOPS", 2, "extra passes over layers LOOP_START..LOOP_END (depth recurrence)"),
    ("LOOP_START", 3, "first looped layer"),
    ("LOOP_END", 5, "last looped layer (inclusive)"),
    ("LOOP_START_FRAC", 0.35, "training progress at which looping switches on"),
    ("PARALLEL_START", 8, "first layer with two parallel residual lanes (>= NUM_LAYERS: off)"),
    # training
    ("ITERATIONS", 20000, "max steps (the wallclock usually stops first)"),
    ("MAX_WALLCLOCK_SECONDS", 600.0, "training budget incl. GPTQ calibration; 0 = step-based schedule"),
    ("GPTQ_RESERVE_SECONDS", 10.0, "part of the budget kept for Hessian collection"),
    ("TRAIN_BATCH_TOKENS", 786432, "global tokens per step"),
    ("TRAIN_SEQ_LEN", 2048, "attention window within packed documents"),
    ("GRAD_ACCUM_STEPS", 0, "micro-steps per step per rank; 0 = 8 // WORLD_SIZE"),
    ("WARMUP_STEPS", 20, "compile warm-up steps per loop setting; their state is discarded"),
    ("WARMDOWN_FRAC", 0.85, "fraction of training in linear LR warm-down"),
    ("MIN_LR", 0.1, "LR multiplier floor at the end of warm-down"),
    ("MATRIX_LR", 0.026, "Muon learning rate"),
    ("MUON_MOMENTUM", 0.97, "Muon momentum"),
    ("MUON_MOMENTUM_WARMUP_START", 0.92, "Muon momentum at step 0"),
    ("MUON_MOMENTUM_WARMUP_STEPS", 1500, "steps of Muon momentum warm-up"),
    ("MUON_WD", 0.095, "Muon weight decay"),
    ("MUON_NS_STEPS", 5, "Newton-Schulz (Polar Express) steps"),
    ("EMBED_LR", 0.03, "AdamW lr of the tied embedding"),
    ("EMBED_WD", 0.085, "AdamW weight decay of the embedding"),
    ("SCALAR_LR", 0.02, "AdamW lr of scalars and gates"),
    ("SCALAR_WD", 0.02, "AdamW weight decay of scalars and gates"),
    ("GRAD_CLIP_NORM", 0.3, "global grad-norm clip (0 = off)"),
    ("EMA_DECAY", 0.9965, "EMA of weights, applied at the end (0 = off)"),
    ("TRAIN_LOG_EVERY", 50, "log every N steps"),
    ("VAL_LOSS_EVERY", 0, "diagnostic val eval every N steps (0 = end only)"),
    ("COMPILE", True, "torch.compile the model (GPU)"),
    ("FUSED_CE", True, "Triton fused softcapped cross-entropy (GPU, symmetric cap)"),
    ("ATTN_BACKEND", "auto", "auto | fa3 | fa4 | varlen | sdpa"),
    # quantization / artifact
    ("QUANTIZE", True, "GPTQ + compress + evaluate the artifact"),
    ("GPTQ_CALIB_BATCHES", 16, "training batches (of TRAIN_BATCH_TOKENS) for Hessians"),
    ("GPTQ_BLOCK", 128, "GPTQ block size"),
    ("GPTQ_DAMP", 0.01, "GPTQ damping (fraction of mean diag)"),
    ("CLIP_K_MLP", 11.5, "SDClip k for MLP matrices"),
    ("CLIP_K_ATTN", 13.0, "SDClip k for attention matrices"),
    ("CLIP_K_OTHER", 12.85, "SDClip k for other matrices"),
    ("CLIP_K_EMBED", 14.0, "SDClip k for the embedding"),
    ("MATRIX_BITS", 6, "bits of GPTQ matrices"),
    ("EMBED_BITS", 7, "bits of the embedding"),
    ("AWQ_LITE", True, "one int8 64-column salient group per matrix"),
    ("LQER_TOP_K", 3, "matrices with a rank-LQER_RANK error correction"),
    ("LQER_RANK", 4, "LQER rank"),
    ("ARTIFACT_LIMIT", 16000000, "bytes: model + code must stay below"),
    # evaluation
    ("EVAL_BUDGET_SECONDS", 600.0, "evaluation budget from artifact load to the final number"),
    ("SLIDING_EVAL", False, "diagnostic sliding-window eval (stride EVAL_STRIDE)"),
    ("EVAL_STRIDE", 64, "sliding-window stride"),
    ("TTT_MODE", "phased", "phased | full | off"),
    ("TTT_CHUNK", 48, "tokens scored per TTT step"),
    ("TTT_CONTEXT", 2048, "context window of TTT scoring"),
    ("TTT_BATCH_DOCS", 64, "documents per LoRA batch"),
    ("TTT_LORA_RANK", 80, "LoRA rank"),
    ("TTT_LORA_LR", 1e-4, "LoRA AdamW lr"),
    ("TTT_LORA_WD", 0.5, "LoRA AdamW weight decay"),
    ("PHASED_TTT_PREFIX_DOCS", 2500, "documents whose scored prefix feeds the global SGD phases"),
    ("PHASED_TTT_PHASES", 3, "global SGD phases"),
    ("TTT_SGD_LR", 1e-3, "global phase SGD lr"),
    ("TTT_SGD_MOMENTUM", 0.9, "global phase SGD momentum"),
    ("TTT_SGD_CHUNK_TOKENS", 32768, "tokens per global SGD step"),
    ("FULL_TTT_LR", 0.005, "TTT_MODE=full: SGD lr"),
    ("FULL_TTT_EPOCHS", 3, "TTT_MODE=full: epochs per chunk"),
    ("NGRAM_TILT", False, "token-only n-gram tilt (PR #2018)"),
    ("NGRAM_ORDER", 16, "tokens hashed into the n-gram key"),
    ("NGRAM_THRESHOLD", 0.8, "min share of the top follower"),
    ("NGRAM_BOOST", 2.625, "tilt b"),
    ("CALIBRATE", False, "static logit calibration on training tokens (PR #1924)"),
    # submission
    ("SUBMISSION_NAME", "", "submission.json name"),
    ("SUBMISSION_AUTHOR", "", "submission.json author"),
    ("SUBMISSION_GITHUB_ID", "", "submission.json github_id"),
]
PRESETS = {
    "tiny": dict(DATA_PATH="./data/demo", VOCAB_SIZE=1024, MODEL_DIM=64, NUM_LAYERS=5, NUM_HEADS=4, NUM_KV_HEADS=2,
                 ROPE_DIMS=8, LOOP_START=1, LOOP_END=2, PARALLEL_START=3, ITERATIONS=12, MAX_WALLCLOCK_SECONDS=0.0,
                 TRAIN_BATCH_TOKENS=2048, TRAIN_SEQ_LEN=128, WARMUP_STEPS=2, TRAIN_LOG_EVERY=4, COMPILE=False,
                 GPTQ_CALIB_BATCHES=2, VAL_MAX_TOKENS=8192, TTT_CONTEXT=128, TTT_CHUNK=32, TTT_BATCH_DOCS=8,
                 TTT_LORA_RANK=4, PHASED_TTT_PREFIX_DOCS=16, TTT_SGD_CHUNK_TOKENS=1024, MUON_MOMENTUM_WARMUP_STEPS=10,
                 EMA_DECAY=0.9, EVAL_BUDGET_SECONDS=120.0),
    "demo": dict(DATA_PATH="./data/demo", VOCAB_SIZE=1024, NUM_LAYERS=9, LOOP_START=3, LOOP_END=4, PARALLEL_START=6,
                 MODEL_DIM=384, NUM_HEADS=6, NUM_KV_HEADS=3, MAX_WALLCLOCK_SECONDS=150.0, TRAIN_BATCH_TOKENS=131072,
                 TRAIN_SEQ_LEN=1024, TTT_CONTEXT=1024, PHASED_TTT_PREFIX_DOCS=100, EVAL_BUDGET_SECONDS=120.0),
}
KNOWN_FOREIGN = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "OMP_NUM_THREADS"}


def _parse(name, default, raw):
    if isinstance(default, bool):
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
    else:
        try:
            return type(default)(raw)
        except ValueError:
            pass
    raise SystemExit(f"error: environment variable {name}={raw!r} is not a valid {type(default).__name__} "
                     f"(default {default!r}); fix or unset it")


class Config:
    """Values from CONFIG, overridden by RUN_PRESET, overridden by explicit env vars."""

    def __init__(self, env=None):
        env = dict(os.environ if env is None else env)
        names = {n: d for n, d, _ in CONFIG}
        preset = env.get("RUN_PRESET", "")
        if preset and preset not in PRESETS:
            raise SystemExit(f"error: RUN_PRESET={preset!r} is unknown; use one of {sorted(PRESETS)} or leave it unset")
        self.values = {n: d for n, d in names.items()}
        self.values.update(PRESETS.get(preset, {}))
        for n, d in names.items():
            if n in env:
                self.values[n] = _parse(n, d, env[n])
        self.warnings = []
        for key in env:  # typo detection: a var that looks like ours but is not
            if key in names or key in KNOWN_FOREIGN or not key.isupper():
                continue
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
            if close:
                self.warnings.append(f"warning: environment variable {key} is not a setting of train_gpt.py; "
                                     f"did you mean {close[0]}? (it is ignored)")

    def __getattr__(self, k):
        try:
            return self.__dict__["values"][k.upper()]
        except KeyError:
            raise AttributeError(k) from None


# =============================================================================
# 2. Runtime: distributed setup, logging
# =============================================================================
@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    master: bool
    log_path: Path | None = None

    def log(self, msg: str, console=True):
        if not self.master:
            return
        if console:
            print(msg, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(msg + "\n")


def setup_runtime() -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world, local_rank, device, rank == 0)


def all_reduce_(t, op=None):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# =============================================================================
# 3. Data: challenge shards (256 x int32 header, uint16 tokens) and packed batches
# =============================================================================
SHARD_MAGIC, SHARD_VERSION, BOS_ID = 20240520, 1, 1


def read_shard(path) -> np.ndarray:
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=256)
    if header.size < 256 or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise SystemExit(f"error: {path} is not a challenge shard (bad header); rebuild it with prepare_caseops_data.py")
    n = int(header[2])
    if path.stat().st_size != 1024 + 2 * n:
        raise SystemExit(f"error: {path} holds {path.stat().st_size} bytes, header says {n} tokens; the file is truncated")
    return np.memmap(path, dtype="<u2", mode="r", offset=1024, shape=(n,))


def list_shards(data_path, split, limit=0):
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_[0-9]*.bin")))
    if not files:
        raise SystemExit(f"error: no fineweb_{split}_*.bin in DATA_PATH={data_path}; build it with "
                         f"`python prepare_caseops_data.py --demo` (demo) or `--download` (record data)")
    return files[:limit] if limit else files


def segment_bounds(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """cu_seqlens of a flat token chunk: a segment starts at every BOS and every seq_len tokens within a doc."""
    n = len(tokens)
    starts = np.flatnonzero(tokens == BOS_ID)
    starts = np.union1d(starts, [0]) if n else starts
    ends = np.append(starts[1:], n)
    parts = [np.arange(s, e, seq_len) for s, e in zip(starts, ends)]
    return np.append(np.concatenate(parts) if parts else np.zeros(0, np.int64), n).astype(np.int32)


class TokenStream:
    """Reads the train shards in order as one endless stream (wraps around)."""

    def __init__(self, files):
        self.files, self.idx, self.pos = files, 0, 0
        self.tokens = read_shard(files[0])

    def take(self, n):
        out = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.idx = (self.idx + 1) % len(self.files)
                self.tokens, self.pos = read_shard(self.files[self.idx]), 0
            k = min(n, len(self.tokens) - self.pos)
            out.append(np.asarray(self.tokens[self.pos:self.pos + k]))
            self.pos, n = self.pos + k, n - k
        return np.concatenate(out)

    def state(self):
        return (self.idx, self.pos)

    def restore(self, s):
        if s[0] != self.idx:
            self.tokens = read_shard(self.files[s[0]])
        self.idx, self.pos = s


class TrainLoader:
    """Each step reads one contiguous span of TRAIN_BATCH_TOKENS + 1 tokens, cuts it into world*accum equal
    micro-chunks, and gives rank r the chunks r, r+world, ... so the global batch does not depend on the split."""

    def __init__(self, cfg, rt, accum):
        self.stream = TokenStream(list_shards(cfg.data_path, "train", cfg.max_train_shards))
        self.world, self.rank, self.accum, self.seq_len, self.device = rt.world, rt.rank, accum, cfg.train_seq_len, rt.device
        n_chunks = rt.world * accum
        if cfg.train_batch_tokens % n_chunks:
            raise SystemExit(f"error: TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} is not divisible by "
                             f"WORLD_SIZE*GRAD_ACCUM_STEPS={n_chunks}")
        self.micro = cfg.train_batch_tokens // n_chunks
        self.cu_len = self.micro // 64 + self.micro // self.seq_len + 2
        self.vocab = cfg.vocab_size

    def next_step(self):
        """List of (x, y, cu_seqlens) for this rank's micro-steps of one global step."""
        span = self.stream.take(self.world * self.accum * self.micro + 1)
        if span.max() >= self.vocab:
            raise SystemExit(f"error: token id {int(span.max())} in the train shards is >= VOCAB_SIZE={self.vocab}; "
                             f"set VOCAB_SIZE to the tokenizer's vocabulary")
        self.stream.pos -= 1 if self.stream.pos > 0 else 0  # the target of the last token is the next step's first
        out = []
        for a in range(self.accum):
            c = a * self.world + self.rank
            chunk = span[c * self.micro:(c + 1) * self.micro + 1].astype(np.int64)
            out.append(self.to_device(chunk[:-1], chunk[1:]))
        return out

    def to_device(self, x, y):
        cu = segment_bounds(x, self.seq_len)
        while len(cu) > self.cu_len:
            self.cu_len *= 2
        cu = np.pad(cu, (0, self.cu_len - len(cu)), constant_values=len(x))
        dev = self.device
        pin = dev.type == "cuda"
        t = lambda a, dt: (torch.from_numpy(a).to(dt).pin_memory() if pin else torch.from_numpy(a).to(dt)).to(dev, non_blocking=True)
        return t(x, torch.int64), t(y, torch.int64), t(cu, torch.int32)


def load_val(cfg, rt):
    """Val tokens and per-token original byte counts (sidecar, else computed from the tokenizer)."""
    files = list_shards(cfg.data_path, "val")
    tokens = np.concatenate([np.asarray(read_shard(f)) for f in files]).astype(np.int64)
    side = sorted(glob.glob(os.path.join(cfg.data_path, "fineweb_val_bytes_[0-9]*.bin")))
    if side:
        nbytes = np.concatenate([np.asarray(read_shard(f)) for f in side]).astype(np.int64)
        if len(nbytes) != len(tokens):
            raise SystemExit(f"error: byte sidecar in {cfg.data_path} has {len(nbytes)} entries for {len(tokens)} val tokens; "
                             f"rebuild the dataset")
        source = "sidecar"
    else:
        nbytes, source = token_bytes_from_tokenizer(cfg, tokens), "tokenizer"
    if tokens.max() >= cfg.vocab_size:
        raise SystemExit(f"error: val token id {int(tokens.max())} >= VOCAB_SIZE={cfg.vocab_size}")
    if tokens[0] != BOS_ID:
        raise SystemExit(f"error: val stream in {cfg.data_path} does not start with BOS (id {BOS_ID})")
    rt.log(f"val: {len(tokens):,} tokens, {int(nbytes.sum()):,} bytes ({source}), {int((tokens == BOS_ID).sum()):,} docs")
    return tokens, nbytes


def token_bytes_from_tokenizer(cfg, tokens):
    """SPEC 1.4: piece UTF-8 length, leading '▁' = one space unless after a boundary, byte pieces count 1."""
    import sentencepiece as spm
    path = cfg.tokenizer_path or os.path.join(cfg.data_path, "tokenizer.model")
    if not os.path.exists(path):
        raise SystemExit(f"error: no byte sidecar in {cfg.data_path} and no tokenizer at {path}; set TOKENIZER_PATH")
    sp = spm.SentencePieceProcessor(model_file=path)
    n = sp.get_piece_size()
    base, space, boundary = np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, bool)
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            space[i] = piece.startswith("\u2581")
            base[i] = len(piece.lstrip("\u2581").encode()) + max(0, len(piece) - len(piece.lstrip("\u2581")) - 1)
    prev_boundary = np.concatenate([[True], boundary[tokens[:-1]]])
    return base[tokens] + (space[tokens] & ~prev_boundary)


# =============================================================================
# 4. Kernels: attention backends, fused softcapped cross-entropy (Triton + eager fallback)
# =============================================================================
def pick_attention(requested: str, device) -> str:
    if device.type != "cuda":
        if requested not in ("auto", "sdpa"):
            raise SystemExit(f"error: ATTN_BACKEND={requested} needs a GPU; use auto or sdpa")
        return "sdpa"
    have = {}
    try:
        import flash_attn_interface  # noqa: F401  (FlashAttention-3)
        have["fa3"] = True
    except Exception:
        pass
    try:
        from flash_attn.cute import flash_attn_varlen_func  # noqa: F401  (flash-attn-4)
        have["fa4"] = torch.cuda.get_device_capability(device)[0] >= 9
    except Exception:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        have["varlen"] = True
    except Exception:
        pass
    have["sdpa"] = True
    if requested == "auto":
        return next(b for b in ("fa3", "fa4", "varlen", "sdpa") if have.get(b))
    if not have.get(requested):
        raise SystemExit(f"error: ATTN_BACKEND={requested} is not importable here; available: {sorted(k for k in have if have[k])}")
    return requested


def varlen_attention(q, k, v, cu, max_len, backend):
    """Causal attention within segments. q: (T, H, D), k/v: (T, KV, D), cu: int32 cu_seqlens."""
    if backend == "fa3":
        import flash_attn_interface as fa3
        out = fa3.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        return out[0] if isinstance(out, tuple) else out
    if backend == "fa4":
        from flash_attn.cute import flash_attn_varlen_func
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
        return out[0] if isinstance(out, tuple) else out
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn
        kw = dict(is_causal=True) if "is_causal" in VARLEN_PARAMS else dict(window_size=(-1, 0))
        if "enable_gqa" in VARLEN_PARAMS:
            kw["enable_gqa"] = q.shape[1] != k.shape[1]
        elif q.shape[1] != k.shape[1]:
            k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)
    # masked SDPA: exact reference, O(T^2) memory (CPU, tests)
    T = q.shape[0]
    ar = torch.arange(T, device=q.device)
    seg = torch.searchsorted(cu, ar.to(cu.dtype), right=True)
    mask = (seg[:, None] == seg[None, :]) & (ar[None, :] <= ar[:, None])
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


try:
    import inspect
    from torch.nn.attention.varlen import varlen_attn as _va
    VARLEN_PARAMS = set(inspect.signature(_va).parameters)
except Exception:
    VARLEN_PARAMS = set()


def softcap_logits(z, cap_pos, cap_neg=None):
    if cap_neg is None:
        return cap_pos * torch.tanh(z / cap_pos)
    return torch.where(z >= 0, cap_pos * torch.tanh(z / cap_pos), cap_neg * torch.tanh(z / cap_neg))


def softcap_ce_eager(z, y, cap):
    """Reference: per-token NLL of softcapped logits (fp32)."""
    return F.cross_entropy(softcap_logits(z.float(), cap), y, reduction="none")


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _softcap_ce_fwd(Z, Y, LOSS, LSE, stride, V, cap: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        zp = Z + row.to(tl.int64) * stride
        m, s = tl.full((), -float("inf"), tl.float32), tl.full((), 0.0, tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            z = tl.load(zp + cols, mask=cols < V, other=0.0).to(tl.float32)
            e = tl.exp(2.0 * z / cap)
            c = cap * (1.0 - 2.0 / (e + 1.0))
            c = tl.where(cols < V, c, -float("inf"))
            m_new = tl.maximum(m, tl.max(c, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        y = tl.load(Y + row)
        zy = tl.load(zp + y).to(tl.float32)
        cy = cap * (1.0 - 2.0 / (tl.exp(2.0 * zy / cap) + 1.0))
        tl.store(LOSS + row, lse - cy)
        tl.store(LSE + row, lse)

    @triton.jit
    def _softcap_ce_bwd(Z, Y, LSE, G, DZ, stride, V, cap: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        zp = Z + row.to(tl.int64) * stride
        dp = DZ + row.to(tl.int64) * stride
        lse, y, g = tl.load(LSE + row), tl.load(Y + row), tl.load(G + row)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            z = tl.load(zp + cols, mask=cols < V, other=0.0).to(tl.float32)
            th = 1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0)
            p = tl.exp(cap * th - lse)
            d = (p - tl.where(cols == y, 1.0, 0.0)) * (1.0 - th * th) * g
            tl.store(dp + cols, d.to(DZ.dtype.element_ty), mask=cols < V)
    HAVE_TRITON = True
except Exception:
    HAVE_TRITON = False


class SoftcapCE(torch.autograd.Function):
    """Per-token NLL of cap*tanh(z/cap) without materializing the capped logits. Triton on GPU; the same math
    in torch elsewhere (the CPU tests compare both the torch path and autograd of softcap_ce_eager)."""

    @staticmethod
    def forward(ctx, z, y, cap):
        z = z.contiguous()
        if z.is_cuda and HAVE_TRITON:
            loss = torch.empty(z.shape[0], device=z.device, dtype=torch.float32)
            lse = torch.empty_like(loss)
            _softcap_ce_fwd[(z.shape[0],)](z, y, loss, lse, z.stride(0), z.shape[1], cap, BLOCK=1024)
        else:
            c = softcap_logits(z.float(), cap)
            lse = torch.logsumexp(c, -1)
            loss = lse - c.gather(1, y[:, None])[:, 0]
        ctx.save_for_backward(z, y, lse)
        ctx.cap = cap
        return loss

    @staticmethod
    def backward(ctx, g):
        z, y, lse = ctx.saved_tensors
        cap = ctx.cap
        g = g.float().contiguous()
        if z.is_cuda and HAVE_TRITON:
            dz = torch.empty_like(z)
            _softcap_ce_bwd[(z.shape[0],)](z, y, lse, g, dz, z.stride(0), z.shape[1], cap, BLOCK=1024)
        else:
            th = torch.tanh(z.float() / cap)
            p = torch.exp(cap * th - lse[:, None])
            p[torch.arange(len(y)), y] -= 1.0
            dz = (p * (1 - th * th) * g[:, None]).to(z.dtype)
        return dz, None, None


# =============================================================================
# 5. Model
# =============================================================================
def rms_norm(x, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def lora_linear(mod, x, ad):
    """mod(x) plus an optional per-sequence low-rank adapter ad = (A (B, in, r), Bm (B, r, out)); x: (B, T, in)."""
    y = mod(x)
    if ad is not None:
        y = y + torch.bmm(torch.bmm(x, ad[0].to(x.dtype)), ad[1].to(x.dtype))
    return y


class Rotary(nn.Module):
    def __init__(self, rope_dims, base, max_len=1 << 16):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims)
        f = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        self.register_buffer("cos", f.cos(), persistent=False)
        self.register_buffer("sin", f.sin(), persistent=False)
        self.rope_dims = rope_dims

    def forward(self, x, pos):  # x: (B, T, H, D); rotate the first rope_dims dims
        r = self.rope_dims
        cos, sin = self.cos[pos][:, :, None, :].to(x.dtype), self.sin[pos][:, :, None, :].to(x.dtype)
        x1, x2, rest = x[..., :r // 2], x[..., r // 2:r], x[..., r:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], -1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, h, kv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.h, self.kv, self.hd = h, kv, d // h
        self.q, self.k = nn.Linear(d, d, bias=False), nn.Linear(d, kv * self.hd, bias=False)
        self.v, self.o = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, d, bias=False)
        self.q_gain = nn.Parameter(torch.full((h,), cfg.qk_gain_init))
        self.xsa_alpha = nn.Parameter(torch.zeros(h)) if cfg.xsa else None
        self.gate_w = nn.Parameter(torch.zeros(h, cfg.smear_dims))
        self.gate_scale, self.gate_dims = cfg.attn_gate_scale, cfg.smear_dims

    def forward(self, x, ctx, ad):
        B, T, _ = x.shape
        q = lora_linear(self.q, x, ad.get("q")).view(B, T, self.h, self.hd)
        k = lora_linear(self.k, x, ad.get("k")).view(B, T, self.kv, self.hd)
        v = lora_linear(self.v, x, ad.get("v")).view(B, T, self.kv, self.hd)
        q, k = ctx.rotary(rms_norm(q), ctx.pos), ctx.rotary(rms_norm(k), ctx.pos)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = varlen_attention(q.reshape(B * T, self.h, self.hd), k.reshape(B * T, self.kv, self.hd),
                             v.reshape(B * T, self.kv, self.hd), ctx.cu, ctx.max_len, ctx.backend).view(B, T, self.h, self.hd)
        if self.xsa_alpha is not None:  # y -= tanh(alpha_h) (y . v_hat) v_hat, v_hat of the head's KV group
            vh = F.normalize(v.float(), dim=-1).repeat_interleave(self.h // self.kv, 2).to(y.dtype)
            y = y - torch.tanh(self.xsa_alpha).to(y.dtype)[:, None] * (y * vh).sum(-1, keepdim=True) * vh
        gate = torch.sigmoid(self.gate_scale * x[..., :self.gate_dims] @ self.gate_w.to(x.dtype).T)  # (B, T, H)
        y = y * gate[..., None]
        return lora_linear(self.o, y.reshape(B, T, self.h * self.hd), ad.get("o"))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.up = nn.Linear(cfg.model_dim, cfg.mlp_mult * cfg.model_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_mult * cfg.model_dim, cfg.model_dim, bias=False)
        self.slope = cfg.leaky_slope

    def forward(self, x, ad):
        return lora_linear(self.down, F.leaky_relu(self.up(x), self.slope).square(), ad.get("mlp"))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        d = cfg.model_dim
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.ln_scale = 1.0 / math.sqrt(layer + 1)
        self.parallel = layer >= cfg.parallel_start
        if self.parallel:  # lane_k = r_k * lane_k + p_k0 * attn_out + p_k1 * mlp_out
            self.lane_r = nn.Parameter(torch.full((2,), 1.1))
            self.lane_p = nn.Parameter(torch.ones(2, 2))

    def forward(self, lanes, x0, ctx, ad):
        m = self.resid_mix.to(x0.dtype)
        x_in = m[0] * lanes[0] + m[1] * x0
        a = self.attn_scale.to(x0.dtype) * self.attn(rms_norm(x_in) * self.ln_scale, ctx, ad)
        if not self.parallel:
            x = x_in + a
            return [x + self.mlp_scale.to(x0.dtype) * self.mlp(rms_norm(x) * self.ln_scale, ad)]
        src = lanes[1] if len(lanes) > 1 else lanes[0]
        f = self.mlp_scale.to(x0.dtype) * self.mlp(rms_norm(src) * self.ln_scale, ad)
        r, p = self.lane_r.to(x0.dtype), self.lane_p.to(x0.dtype)
        return [r[0] * x_in + p[0, 0] * a + p[0, 1] * f, r[1] * src + p[1, 0] * a + p[1, 1] * f]


@dataclass
class Ctx:
    rotary: Rotary
    pos: torch.Tensor
    cu: torch.Tensor
    max_len: int
    backend: str


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, L = cfg.model_dim, cfg.num_layers
        if d % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads or (d // cfg.num_heads) < cfg.rope_dims:
            raise SystemExit("error: MODEL_DIM must divide into NUM_HEADS heads of >= ROPE_DIMS dims, "
                             "and NUM_HEADS must be a multiple of NUM_KV_HEADS")
        if not (0 <= cfg.loop_start <= cfg.loop_end < L):
            raise SystemExit(f"error: need 0 <= LOOP_START <= LOOP_END < NUM_LAYERS={L}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.smear_w, self.smear_lam = nn.Parameter(torch.zeros(cfg.smear_dims)), nn.Parameter(torch.zeros(1))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.orders = {lp: self.layer_order(lp) for lp in (False, True)}
        n_skip = max(min(len(o) // 2, len(o) - len(o) // 2) for o in self.orders.values())
        self.skip_w, self.skip_g = nn.Parameter(torch.ones(n_skip, d)), nn.Parameter(torch.zeros(n_skip, d))
        if cfg.asym_softcap:
            self.cap_pos = nn.Parameter(torch.tensor(float(cfg.logit_softcap)))
            self.cap_neg = nn.Parameter(torch.tensor(float(cfg.logit_softcap)))
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base)
        self.looping = False
        self.attn_backend = "sdpa"
        self.reset_parameters()

    def layer_order(self, looping):
        c = self.cfg
        mid = list(range(c.loop_start, c.loop_end + 1)) * (1 + (c.num_loops if looping else 0))
        return list(range(c.loop_start)) + mid + list(range(c.loop_end + 1, c.num_layers))

    def reset_parameters(self):
        nn.init.normal_(self.embed.weight, std=self.cfg.embed_init_std)
        for b in self.blocks:
            for lin in (b.attn.q, b.attn.k, b.attn.v, b.mlp.up):
                nn.init.orthogonal_(lin.weight)
            nn.init.zeros_(b.attn.o.weight)
            nn.init.zeros_(b.mlp.down.weight)

    def hidden(self, ids, cu, max_len, adapters=None):
        """Final normalized hidden states (B, T, d). ids: (B, T); cu: cu_seqlens over the flattened B*T tokens."""
        B, T = ids.shape
        ad = adapters or {}
        ar = torch.arange(B * T, device=ids.device)
        start = cu[(torch.searchsorted(cu, ar.to(cu.dtype), right=True) - 1).clamp_min(0)]
        pos = (ar - start).view(B, T)
        ctx = Ctx(self.rotary, pos, cu, max_len, self.attn_backend)
        x = self.embed(ids)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # SmearGate: x_t += lam * sigmoid(w . x_t[:k]) * x_{t-1}, never across a segment start (BOS)
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1) * (pos > 0)[..., None].to(x.dtype)
        g = torch.sigmoid(x[..., :self.smear_w.numel()] @ self.smear_w.to(x.dtype))[..., None]
        x = rms_norm(x + self.smear_lam.to(x.dtype) * g * prev)
        x0, lanes, skips = x, [x], []
        order = self.orders[self.looping]
        n_enc = len(order) // 2
        for i, li in enumerate(order):
            if i >= n_enc and skips:  # U-Net decoder: mix in the matching encoder output (LIFO)
                j = i - n_enc
                s = self.skip_w[j].to(x.dtype) * skips.pop()
                lanes = [torch.lerp(s, ln, torch.sigmoid(self.skip_g[j]).to(x.dtype)) for ln in lanes]
            lanes = self.blocks[li](lanes, x0, ctx, {k: v[li] for k, v in ad.items() if k != "head"})
            if i < n_enc:
                skips.append(lanes[0])
        h = lanes[0] if len(lanes) == 1 else 0.5 * (lanes[0] + lanes[1])
        return rms_norm(h)

    def logits(self, h, adapters=None):
        """Raw (uncapped) logits h @ E^T (+ LoRA on the head)."""
        z = F.linear(h, self.embed.weight.to(h.dtype))
        if adapters and "head" in adapters:
            A, Bm = adapters["head"]
            z = z + torch.bmm(torch.bmm(h, A.to(h.dtype)), Bm.to(h.dtype))
        return z

    def capped(self, z):
        if self.cfg.asym_softcap:
            return softcap_logits(z.float(), self.cap_pos, self.cap_neg)
        return softcap_logits(z.float(), self.cfg.logit_softcap)

    def forward(self, ids, targets, cu, max_len, adapters=None, fused_ce=False):
        """Per-token NLL (B, T) in nats."""
        z = self.logits(self.hidden(ids, cu, max_len, adapters), adapters)
        if fused_ce and not self.cfg.asym_softcap:
            return SoftcapCE.apply(z.reshape(-1, z.shape[-1]), targets.reshape(-1), float(self.cfg.logit_softcap)).view(targets.shape)
        return F.cross_entropy(self.capped(z).flatten(0, 1), targets.reshape(-1), reduction="none").view(targets.shape)


# =============================================================================
# 6. Optimizers: Muon (Polar Express, MuonEq-R, sharded across ranks) and AdamW
# =============================================================================
POLAR_EXPRESS = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
                 (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
                 (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
                 (3.3184196573706015, -2.488488024314874, 0.51004894012372),
                 (2.300652019954817, -1.6689039845747493, 0.4188073119525673)]


def orthogonalize(G, steps):
    """Batched approximate polar factor of G (n, r, c) by Polar Express Newton-Schulz iterations."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-7)
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).float()


class Muon:
    """Matrices grouped by shape; with W ranks each group is padded to a multiple of W, grads are reduce-scattered,
    every rank orthogonalizes its slice (momentum kept only for it) and the updates are all-gathered."""

    def __init__(self, params, cfg, world, rank):
        self.cfg, self.world, self.rank = cfg, world, rank
        groups = {}
        for p in params:
            groups.setdefault(tuple(p.shape), []).append(p)
        self.groups = list(groups.values())
        self.momentum = [None] * len(self.groups)
        self.lr, self.mom = cfg.matrix_lr, cfg.muon_momentum

    def shard_grads(self):
        """Summed-over-ranks grads of this rank's slice, per group (call after backward)."""
        out = []
        for ps in self.groups:
            n_pad = -(-len(ps) // self.world) * self.world
            g = torch.stack([p.grad for p in ps] + [torch.zeros_like(ps[0])] * (n_pad - len(ps)))
            if self.world > 1:
                part = torch.empty((n_pad // self.world, *g.shape[1:]), device=g.device, dtype=g.dtype)
                dist.reduce_scatter_tensor(part, g, op=dist.ReduceOp.AVG)
                g = part
            out.append(g)
        return out

    @torch.no_grad()
    def step(self, shards, clip_coef):
        for gi, (ps, g) in enumerate(zip(self.groups, shards)):
            g = g * clip_coef
            if self.momentum[gi] is None:
                self.momentum[gi] = torch.zeros_like(g)
            buf = self.momentum[gi]
            buf.mul_(self.mom).add_(g)
            u = g + self.mom * buf  # Nesterov
            u = u / (u.norm(dim=-1, keepdim=True) + 1e-7)  # MuonEq-R: row-normalize first
            u = orthogonalize(u, self.cfg.muon_ns_steps) * math.sqrt(max(1.0, ps[0].shape[0] / ps[0].shape[1]))
            if self.world > 1:
                full = torch.empty((u.shape[0] * self.world, *u.shape[1:]), device=u.device, dtype=u.dtype)
                dist.all_gather_into_tensor(full, u.contiguous())
                u = full
            for i, p in enumerate(ps):
                p.mul_(1 - self.lr * self.cfg.muon_wd).add_(u[i].to(p.dtype), alpha=-self.lr)

    def state_dict(self):
        return {"momentum": [None if m is None else m.clone() for m in self.momentum]}

    def load_state_dict(self, s):
        self.momentum = [None if m is None else m.clone() for m in s["momentum"]]


def split_params(model):
    """(muon matrices, embedding, scalars): every parameter in exactly one group."""
    matrices, embed, scalars = [], [], []
    for name, p in model.named_parameters():
        if name == "embed.weight":
            embed.append(p)
        elif p.ndim == 2 and name.startswith("blocks.") and any(f".{k}.weight" in name for k in ("q", "k", "v", "o", "up", "down")):
            matrices.append(p)
        else:
            scalars.append(p)
    return matrices, embed, scalars


def build_optimizers(model, cfg, rt):
    matrices, embed, scalars = split_params(model)
    fused = rt.device.type == "cuda"
    adam = torch.optim.AdamW([dict(params=embed, lr=cfg.embed_lr, weight_decay=cfg.embed_wd, base_lr=cfg.embed_lr),
                              dict(params=scalars, lr=cfg.scalar_lr, weight_decay=cfg.scalar_wd, base_lr=cfg.scalar_lr)],
                             betas=(0.9, 0.99), eps=1e-8, fused=fused)
    return Muon(matrices, cfg, rt.world, rt.rank), adam


# =============================================================================
# 7. Training
# =============================================================================
def lr_multiplier(frac, cfg):
    """1 until 1 - WARMDOWN_FRAC, then linear down to MIN_LR at frac = 1."""
    start = 1.0 - cfg.warmdown_frac
    if frac <= start:
        return 1.0
    return max(cfg.min_lr, 1.0 - (1.0 - cfg.min_lr) * min(1.0, (frac - start) / max(cfg.warmdown_frac, 1e-9)))


def muon_momentum(step, cfg):
    t = min(1.0, step / max(1, cfg.muon_momentum_warmup_steps))
    return (1 - t) * cfg.muon_momentum_warmup_start + t * cfg.muon_momentum


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


class Trainer:
    def __init__(self, cfg, rt, model):
        self.cfg, self.rt, self.model = cfg, rt, model
        self.accum = cfg.grad_accum_steps or max(1, 8 // rt.world)
        self.loader = TrainLoader(cfg, rt, self.accum)
        self.muon, self.adam = build_optimizers(model, cfg, rt)
        self.adam_params = [p for g in self.adam.param_groups for p in g["params"]]
        self.loss_fn = model
        if cfg.compile and rt.device.type == "cuda":
            self.loss_fn = torch.compile(model, dynamic=False)
        self.fused_ce = cfg.fused_ce and rt.device.type == "cuda" and HAVE_TRITON
        self.ema = None

    def budget(self):
        c = self.cfg
        return max(1e-9, c.max_wallclock_seconds - c.gptq_reserve_seconds) if c.max_wallclock_seconds > 0 else 0.0

    def progress(self, step, elapsed):
        b = self.budget()
        return elapsed / b if b else step / max(1, self.cfg.iterations)

    def train_step(self, step, frac):
        cfg, model = self.cfg, self.model
        mult = lr_multiplier(frac, cfg)
        self.muon.lr, self.muon.mom = cfg.matrix_lr * mult, muon_momentum(step, cfg)
        for g in self.adam.param_groups:
            g["lr"] = g["base_lr"] * mult
        total = torch.zeros((), device=self.rt.device)
        for x, y, cu in self.loader.next_step():
            with autocast(self.rt.device):
                loss = self.loss_fn(x[None], y[None], cu, cfg.train_seq_len, fused_ce=self.fused_ce).mean()
            (loss / self.accum).backward()
            total += loss.detach() / self.accum
        shards = self.muon.shard_grads()
        if self.rt.world > 1:
            flat = torch.cat([p.grad.flatten() for p in self.adam_params])
            dist.all_reduce(flat, op=dist.ReduceOp.AVG)
            off = 0
            for p in self.adam_params:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad)); off += p.numel()
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        clip = 1.0
        if cfg.grad_clip_norm > 0:
            sq = torch.stack([s.float().square().sum() for s in shards]).sum()
            sq = all_reduce_(sq)
            sq = sq + torch.stack([p.grad.float().square().sum() for p in self.adam_params]).sum()
            clip = torch.clamp(cfg.grad_clip_norm / (sq.sqrt() + 1e-6), max=1.0)
            for p in self.adam_params:
                p.grad.mul_(clip)
        self.muon.step(shards, clip)
        self.adam.step()
        model.zero_grad(set_to_none=True)
        if self.ema is not None:  # EMA with the usual warm-up, so short runs average recent weights only
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach().float() for p in model.parameters()], 1 - d)
        return total

    def warmup(self):
        """Compile both loop settings; every trace of these steps (weights, optimizer, data position) is undone."""
        if self.cfg.warmup_steps <= 0:
            return
        saved = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.adam.state_dict()),
                 self.muon.state_dict(), self.loader.stream.state())
        for looping in (False, True):
            self.model.looping = looping
            for s in range(self.cfg.warmup_steps):
                self.train_step(s, 0.0)
        self.model.load_state_dict(saved[0]); self.adam.load_state_dict(saved[1])
        self.muon.load_state_dict(saved[2]); self.loader.stream.restore(saved[3])
        self.model.looping = False
        self.model.zero_grad(set_to_none=True)

    def run(self, summary):
        cfg, rt, model = self.cfg, self.rt, self.model
        t_start = time.perf_counter()
        self.warmup()
        sync(rt.device)
        rt.log(f"warm-up done in {time.perf_counter() - t_start:.1f}s (time to step 1 since process start: "
               f"{time.perf_counter() - PROCESS_START:.1f}s)")
        summary["startup_s"] = round(time.perf_counter() - PROCESS_START, 2)
        if cfg.ema_decay > 0:
            self.ema = [p.detach().float().clone() for p in model.parameters()]
        step, elapsed, tok_phase = 0, 0.0, {False: [0, 0.0], True: [0, 0.0]}
        t0 = time.perf_counter()
        budget = self.budget()
        while step < cfg.iterations:
            frac = self.progress(step, elapsed)
            if budget and frac >= 1.0:
                break
            looping = cfg.num_loops > 0 and frac >= cfg.loop_start_frac
            if looping != model.looping:
                model.looping = looping
                rt.log(f"step {step}: depth recurrence on (layers {cfg.loop_start}-{cfg.loop_end} x{cfg.num_loops + 1})")
            ts = time.perf_counter()
            loss = self.train_step(step, frac)
            step += 1
            log_now = step <= 5 or step % cfg.train_log_every == 0 or step == cfg.iterations
            if log_now or budget:
                sync(rt.device)
            dt = time.perf_counter() - ts
            elapsed = time.perf_counter() - t0
            tok_phase[looping][0] += cfg.train_batch_tokens; tok_phase[looping][1] += dt
            if budget:  # all ranks stop together: the max of the elapsed times decides
                e = torch.tensor([elapsed], device=rt.device)
                elapsed = float(all_reduce_(e, dist.ReduceOp.MAX)[0]) if rt.world > 1 else elapsed
            if log_now:
                lv = float(loss)
                if not math.isfinite(lv):
                    raise SystemExit(f"error: training loss is {lv} at step {step}; lower the learning rates")
                eta = (budget - elapsed) if budget else elapsed / step * (cfg.iterations - step)
                rt.log(f"step {step} loss {lv:.4f} tok/s {cfg.train_batch_tokens / dt:,.0f} "
                       f"elapsed {elapsed:.1f}s eta {max(0.0, eta):.1f}s lr_mult {lr_multiplier(frac, cfg):.3f}")
        sync(rt.device)
        train_time = time.perf_counter() - t0
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, model.parameters()):
                    p.copy_(e.to(p.dtype))
        tps = {k: (v[0] / v[1] if v[1] else None) for k, v in tok_phase.items()}
        summary.update(steps=step, train_time_s=round(train_time, 2),
                       tokens_per_s=round(step * cfg.train_batch_tokens / max(train_time, 1e-9)),
                       tokens_per_s_before_loop=tps[False] and round(tps[False]),
                       tokens_per_s_looping=tps[True] and round(tps[True]),
                       peak_mem_mib=round(torch.cuda.max_memory_allocated() / 2**20) if rt.device.type == "cuda" else None)
        rt.log(f"training done: {step} steps in {train_time:.1f}s, {summary['tokens_per_s']:,} tok/s "
               f"(before looping {summary['tokens_per_s_before_loop']}, looping {summary['tokens_per_s_looping']})")
        return t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROCESS_START = time.perf_counter()


# =============================================================================
# 8. Quantization and the artifact
# =============================================================================
# ---- Post-training quantization: GPTQ + SDClip, AWQ-lite, LQER (SPEC section 4) ----
# Pure functions on tensors (CPU or CUDA), fp32 math. Packed layout, per quantized matrix <n>:
#   <n>.q int8 [rows, cols]    <n>.s fp16 [rows]      dequant W = q * s (row scale)
#   <n>.hs fp16 [rows], <n>.hcols int16 [64]          AWQ-lite int8 columns: W[:, hcols] = q[:, hcols] * hs
#   <n>.la int8 [rows, r] in {-2,-1,0,1}, <n>.las fp16 [1], <n>.lb int8 [r, cols] in [-8, 7],
#   <n>.lbs fp16 [r, ceil(cols/64)]                   LQER: W += (la * las) @ (lb * lbs per 64-col group)
# Everything else ('small': <= 65,536 values, not 2D, or integer) is stored under its own name:
# fp16 for float tensors, unchanged for integer ones.
class QuantSpec:
    """Quantization settings; every attribute can be overridden by keyword (e.g. from env vars)."""
    clip = {'mlp': 11.5, 'attn': 13.0, 'other': 12.85, 'embed': 14.0}  # SDClip k per category
    qmax, qmax_embed, qmax_gate, awq_qmax = 31, 63, 127, 127  # int6 / int7 / int8 / int8
    small_numel = 65536  # tensors with at most this many values stay fp16
    embed_name = 'embed.weight'  # tied embedding = LM head
    awq, awq_group = True, 64
    lqer_top_k, lqer_rank, lqer_group = 3, 4, 64
    lqer_hessian = True  # fit LQER in the Hessian metric where H exists (else plain Frobenius)
    block, damp = 128, 0.01

    def __init__(self, **kw):
        self.clip = dict(self.clip)
        for k, v in kw.items():
            if not hasattr(self, k):
                raise AttributeError(f'unknown quant setting {k}')
            setattr(self, k, v)

    def is_gate(self, name):  # attention output gate weights -> int8 per row
        return 'attn' in name and 'gate' in name

    def category(self, name, t):
        if not t.is_floating_point() or t.dim() != 2:
            return 'small'
        if self.is_gate(name):
            return 'gate'
        if t.numel() <= self.small_numel:
            return 'small'
        if name == self.embed_name:
            return 'embed'
        return 'mlp' if 'mlp' in name else 'attn' if 'attn' in name else 'other'


def _row_scale(W, clip_k, qmax):
    """SDClip: s = k * std(row) / qmax, rounded to its stored fp16 value."""
    return (clip_k * W.std(dim=1) / qmax).clamp_min(1e-7).half()


def _round(w, s, qmax):
    return torch.round(w / s).clamp_(-qmax, qmax)


def gptq_quantize(W, H, qmax, clip_k, block=128, damp=0.01, hi_cols=None, hi_qmax=127):
    """GPTQ with per-row SDClip scales. H=None means identity (plain rounding).
    hi_cols: columns quantized at hi_qmax with their own row scale (same clip range) in the same pass.
    Returns (q int8 [rows, cols], scale fp16 [rows], hi_scale fp16 [rows] or None)."""
    W = W.detach().float().clone()
    rows, cols = W.shape
    s16 = _row_scale(W, clip_k, qmax)
    hs16 = None if hi_cols is None else _row_scale(W, clip_k, hi_qmax)
    s, hs = s16.float(), None if hs16 is None else hs16.float()
    hi = torch.zeros(cols, dtype=torch.bool, device=W.device)
    if hi_cols is not None:
        hi[hi_cols.to(W.device).long()] = True
    if H is None:
        Q = _round(W, s[:, None], qmax)
        if hs is not None:
            Q[:, hi] = _round(W[:, hi], hs[:, None], hi_qmax)
        return Q.to(torch.int8), s16, hs16
    H = H.detach().float().to(W.device).clone()
    d = H.diagonal()
    perm = torch.argsort(d, descending=True, stable=True)
    dead = d == 0  # never-active inputs: decoupled unit diagonal, so they are simply rounded
    H[dead, dead] = d[~dead].mean() if bool((~dead).any()) else 1.0
    W, H, hi_p = W[:, perm], H[perm][:, perm], hi[perm].tolist()
    lam = damp * H.diagonal().mean()
    for _ in range(6):  # damping (raised if H is numerically not positive definite)
        H.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                break
        lam = lam * 10
    else:
        raise RuntimeError('GPTQ: Hessian is not positive definite even after damping')
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        for j in range(i2 - i1):
            sc, qm = (hs, hi_qmax) if hi_p[i1 + j] else (s, qmax)
            q = _round(W1[:, j], sc, qm)
            Q[:, i1 + j] = q
            Err[:, j] = (W1[:, j] - q * sc) / U1[j, j]
            W1[:, j + 1:].addr_(Err[:, j], U1[j, j + 1:], alpha=-1)  # feedback inside the block
        W[:, i2:].addmm_(Err, U[i1:i2, i2:], alpha=-1)  # feedback to later blocks
    return Q[:, torch.argsort(perm)].to(torch.int8), s16, hs16


def awq_salient_group(W, H, group=64):
    """Aligned group of `group` columns with the largest summed (activation RMS x mean |w|)."""
    ng = W.shape[1] // group
    if H is None or ng == 0:
        return None
    sal = H.diagonal().float().to(W.device).clamp_min(0).sqrt() * W.detach().float().abs().mean(0)
    g = int(sal[:ng * group].view(ng, group).sum(1).argmax())
    return torch.arange(g * group, (g + 1) * group, device=W.device)


def _metric(H, damp=0.01):
    """L with H + damp*mean(diag)*I = L L^T, so that tr(E H E^T) = ||E L||^2 (None: Frobenius)."""
    if H is None:
        return None
    H = H.detach().float()
    L, info = torch.linalg.cholesky_ex(H + damp * H.diagonal().mean() * torch.eye(H.shape[0], device=H.device))
    return L if info == 0 else None


def lqer_factors(E, rank=4, b_group=64, H=None):
    """Rank-r correction of E. A = top-r left singular vectors of E (of E L if H is given: the
    output-error metric GPTQ minimizes), orthonormal columns of equal norm so one scale suits all,
    as int2 {-2,-1,0,1} (a 4-level grid: lower MSE than ternary for the same 2 bits); B is then
    refit by least squares to the quantized A (optimal in any metric), so it absorbs the singular
    values and A's rounding, and stored as int4 with fp16 scales per (row, 64-column group).
    Returns (la int8 [rows, r], las fp16 [1], lb int8 [r, cols], lbs fp16 [r, groups])."""
    E = E.detach().float()
    rows, cols = E.shape
    L = _metric(None if H is None else H.to(E.device))
    EM = E if L is None else E @ L
    r = min(rank, rows, cols)
    U = torch.linalg.svd(EM, full_matrices=False)[0][:, :r]
    U = U * torch.where((U ** 3).sum(0) > 0, -1.0, 1.0)  # put each column's long tail on the -2 side
    best = None
    for c in torch.linspace(0.5, 2.0, 16).tolist():  # pick A's scale by the refit error
        las = (c * U.pow(2).mean().sqrt()).clamp_min(1e-7).half().view(1)
        la = torch.round(U / las.float()).clamp_(-2, 1)
        P = torch.linalg.pinv(la * las.float())
        err = float((EM - (la * las.float()) @ (P @ EM)).norm())
        if best is None or err < best[0]:
            best = (err, la, las, P @ E)
    _, la, las, B = best
    ng = -(-cols // b_group)
    Bg = torch.nn.functional.pad(B, (0, ng * b_group - cols)).view(r, ng, b_group)
    lbs = (Bg.abs().amax(-1) / 7).clamp_min(1e-7).half()
    lb = torch.round(Bg / lbs.float()[..., None]).clamp_(-8, 7).view(r, -1)[:, :cols]
    return la.to(torch.int8), las, lb.to(torch.int8).contiguous(), lbs


def lqer_apply(la, las, lb, lbs, b_group=64):
    cols = lb.shape[1]
    B = lb.float() * lbs.float().repeat_interleave(b_group, dim=1)[:, :cols]
    return (la.float() * las.float()) @ B


def _dequant(p, name, b_group=64):
    q = p[name + '.q'].float()
    W = q * p[name + '.s'].float()[:, None]
    if name + '.hs' in p:
        c = p[name + '.hcols'].long()
        W[:, c] = q[:, c] * p[name + '.hs'].float()[:, None]
    if name + '.la' in p:
        W += lqer_apply(*(p[name + k] for k in ('.la', '.las', '.lb', '.lbs')), b_group)
    return W


def _rel(E, W, H=None):
    """||E|| / ||W||: Frobenius, or the output norm sqrt(tr(E H E^T)) when H is given."""
    if H is None:
        return float(E.norm() / W.norm().clamp_min(1e-12))
    H = H.float().to(E.device)
    return float((((E @ H) * E).sum() / ((W @ H) * W).sum().clamp_min(1e-24)).clamp_min(0).sqrt())


def quantize_state(state, hessians, spec=None):
    """state: name -> tensor; hessians: name -> H [in, in] (missing -> identity).
    Returns (packed dict of int8/int16/fp16 tensors, stats). stats: 'cat' name -> category,
    'rel' / 'hrel' name -> relative Frobenius / output (H-weighted) error, 'lqer' name -> (rel, hrel)
    after the correction (hrel None without H)."""
    spec = spec or QuantSpec()
    out, errs = {}, {}
    stats = {'cat': {}, 'rel': {}, 'hrel': {}, 'lqer': {}}
    for name, t in state.items():
        cat = stats['cat'][name] = spec.category(name, t)
        if cat == 'small':
            out[name] = t.detach().half() if t.is_floating_point() else t.detach().clone()
            continue
        W, H = t.detach().float(), hessians.get(name)
        if cat == 'gate':
            s = (W.abs().amax(1) / spec.qmax_gate).clamp_min(1e-7).half()
            out[name + '.q'], out[name + '.s'] = _round(W, s.float()[:, None], spec.qmax_gate).to(torch.int8), s
        else:
            hc = awq_salient_group(W, H, spec.awq_group) if spec.awq else None
            qmax = spec.qmax_embed if cat == 'embed' else spec.qmax
            q, s, hs = gptq_quantize(W, H, qmax, spec.clip[cat], spec.block, spec.damp, hc, spec.awq_qmax)
            out[name + '.q'], out[name + '.s'] = q, s
            if hs is not None:
                out[name + '.hs'], out[name + '.hcols'] = hs, hc.to(torch.int16)
        E = W - _dequant(out, name)
        errs[name], stats['rel'][name] = float(E.norm()), _rel(E, W)
        if H is not None:
            stats['hrel'][name] = _rel(E, W, H)
    for name in sorted(errs, key=errs.get, reverse=True)[:spec.lqer_top_k]:
        W, H = state[name].detach().float(), hessians.get(name)
        Hm = H if spec.lqer_hessian else None
        E = W - _dequant(out, name)
        f = lqer_factors(E, spec.lqer_rank, spec.lqer_group, Hm)
        R = E - lqer_apply(*f, spec.lqer_group)
        if _rel(R, W, Hm) < _rel(E, W, Hm):  # keep only a correction that helps
            out.update({name + k: v for k, v in zip(('.la', '.las', '.lb', '.lbs'), f)})
            stats['lqer'][name] = (_rel(R, W), None if H is None else _rel(R, W, H))
    return out, stats


def dequantize_state(packed, spec=None):
    """Float tensors exactly as evaluation uses them (fp32; integer tensors unchanged)."""
    g = (spec or QuantSpec()).lqer_group
    qn = {k[:-2] for k in packed if k.endswith('.q')}
    out = {}
    for k, v in packed.items():
        base, _, suf = k.rpartition('.')
        if base in qn:
            if suf == 'q':
                out[base] = _dequant(packed, base, g)
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return out


class HessianHook:
    """Accumulates H += X^T X (fp32) and the row count for every call of each module (depth
    recurrence adds every pass). Keys are '<module name>.weight'. `add` also serves functional
    uses (the tied LM head: add('embed.weight', final_hidden)). Sum H and n over ranks if needed."""

    def __init__(self, named_modules):
        self.H, self.n, self._handles = {}, {}, []
        for mname, m in named_modules:
            w = getattr(m, 'weight', None)
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                key = mname + '.weight'
                self._handles.append(m.register_forward_hook(lambda mod, inp, out, k=key: self.add(k, inp[0])))

    @torch.no_grad()
    def add(self, key, x):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if key not in self.H:
            self.H[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.n[key] = 0
        self.H[key].addmm_(x.T, x)
        self.n[key] += x.shape[0]

    def hessians(self):
        return {k: H / max(self.n[k], 1) for k, H in self.H.items()}

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def quant_spec(cfg):
    return QuantSpec(clip={"mlp": cfg.clip_k_mlp, "attn": cfg.clip_k_attn, "other": cfg.clip_k_other, "embed": cfg.clip_k_embed},
                     qmax=2 ** (cfg.matrix_bits - 1) - 1, qmax_embed=2 ** (cfg.embed_bits - 1) - 1, awq=cfg.awq_lite,
                     lqer_top_k=cfg.lqer_top_k, lqer_rank=cfg.lqer_rank, block=cfg.gptq_block, damp=cfg.gptq_damp)


@torch.no_grad()
def collect_hessians(model, loader, cfg, rt, deadline):
    """H = X^T X / n of every Linear input (every looped pass) and of the final hidden state (tied head), from up to
    GPTQ_CALIB_BATCHES training batches, stopping early at the training deadline (at least one batch)."""
    hook = HessianHook([(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    n_done = 0
    try:
        for b in range(cfg.gptq_calib_batches):
            for x, y, cu in loader.next_step():
                with autocast(rt.device):
                    hook.add("embed.weight", model.hidden(x[None], cu, cfg.train_seq_len))
            n_done += 1
            stop = torch.tensor([float(time.perf_counter() >= deadline)], device=rt.device)
            if float(all_reduce_(stop, dist.ReduceOp.MAX)[0]) > 0:
                break
    finally:
        hook.remove()
    for k in sorted(hook.H):
        all_reduce_(hook.H[k])
        n = torch.tensor([float(hook.n[k])], device=rt.device)
        hook.n[k] = float(all_reduce_(n)[0])
    return hook.hessians(), n_done


def model_state(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_dequantized(model, packed, cfg):
    deq = dequantize_state(packed, quant_spec(cfg))
    sd = model.state_dict()
    missing = set(sd) ^ set(deq)
    if missing:
        raise SystemExit(f"error: the artifact does not match this model configuration (tensors {sorted(missing)[:4]}...); "
                         f"evaluate with the settings it was trained with")
    model.load_state_dict({k: deq[k].to(sd[k].dtype) for k in sd})
    return model


def wrap_code(src: str):
    """The code as it would be submitted: minified (python-minifier, if installed), brotli, base85, exec stub.
    linecache gets the source so Triton's @jit (inspect.getsource) still works. Returns (wrapped bytes, method)."""
    import brotli
    method = "python-minifier + brotli + base85"
    try:
        import python_minifier
        src = python_minifier.minify(src, remove_annotations=False, remove_literal_statements=True, rename_globals=False,
                                     hoist_literals=False)
    except ImportError:
        method = "brotli + base85 of the unminified source (python-minifier missing: an upper bound)"
    blob = base64.b85encode(brotli.compress(src.encode(), quality=11)).decode()
    stub = ("import brotli,base64,linecache as L\n"
            f's=brotli.decompress(base64.b85decode("{blob}")).decode();L.cache["train_gpt.py"]=(len(s),None,'
            's.splitlines(True),"train_gpt.py");exec(compile(s,"train_gpt.py","exec"))\n')
    return stub.encode(), method


# =============================================================================
# 9. Evaluation. Every val token but the first is a target exactly once. A "document" is the input range
#    [BOS_d, BOS_{d+1}) whose targets are the tokens after it (the last doc ends one token early).
# =============================================================================
def doc_ranges(tokens):
    starts = np.flatnonzero(tokens == BOS_ID)
    ends = np.append(starts[1:], len(tokens) - 1)
    return [(int(s), int(e)) for s, e in zip(starts, ends) if e > s]


class Scorer:
    """Scores rows (in_start, in_end, score_from) of the val stream: inputs tokens[in_start:in_end], targets shifted
    by one, NLL counted for input positions >= score_from. Rows are right-padded into one (B, L) batch whose
    segments are the rows, so no row sees another (cu_seqlens)."""

    def __init__(self, model, tokens, nbytes, device, fused_ce=False):
        self.model, self.device, self.fused_ce = model, device, fused_ce
        self.tokens = torch.from_numpy(tokens).to(device)
        self.nbytes = torch.from_numpy(nbytes).to(device)

    def batch(self, rows):
        L = max(e - s for s, e, _ in rows)
        B = len(rows)
        ar = torch.arange(L, device=self.device)
        starts = torch.tensor([s for s, _, _ in rows], device=self.device)
        lens = torch.tensor([e - s for s, e, _ in rows], device=self.device)
        froms = torch.tensor([f - s for s, _, f in rows], device=self.device)
        idx = (starts[:, None] + ar[None]).clamp_max(len(self.tokens) - 2)
        valid = ar[None] < lens[:, None]
        scored = valid & (ar[None] >= froms[:, None])
        cu = torch.arange(0, B * L + 1, L, device=self.device, dtype=torch.int32)
        return self.tokens[idx], self.tokens[idx + 1], cu, L, scored, self.nbytes[idx + 1]

    def nll(self, rows, adapters=None):
        """(per-token NLL (B, L) fp32, scored mask, target bytes): grads flow when enabled."""
        x, y, cu, L, scored, nb = self.batch(rows)
        with autocast(self.device):
            loss = self.model(x, y, cu, L, adapters=adapters, fused_ce=self.fused_ce)
        return loss.float(), scored, nb


@torch.no_grad()
def eval_windows(scorer, rows, rt, batch_tokens):
    """Sum of NLL / bytes / count over rows, split across ranks; returns (val_loss, val_bpb, tokens, bytes)."""
    tot = torch.zeros(3, device=rt.device, dtype=torch.float64)
    mine = rows[rt.rank::rt.world]
    i = 0
    while i < len(mine):
        L = max(e - s for s, e, _ in mine[i:i + 1])
        n = max(1, batch_tokens // max(L, 1))
        chunk = mine[i:i + n]
        loss, scored, nb = scorer.nll(chunk)
        tot += torch.stack([(loss * scored).sum().double(), (nb * scored).sum().double(), scored.sum().double()])
        i += n
    all_reduce_(tot)
    nll, nbytes, count = (float(v) for v in tot)
    return nll / count, nll / math.log(2) / nbytes, int(count), int(nbytes)


def plain_rows(tokens, seq_len, limit=0):
    """Non-overlapping windows of seq_len within documents, longest first."""
    rows = []
    for s, e in doc_ranges(tokens[:limit + 1] if limit else tokens):
        rows += [(a, min(a + seq_len, e), a) for a in range(s, e, seq_len)]
    return sorted(rows, key=lambda r: r[0] - r[1])


def sliding_rows(tokens, window, stride, limit=0):
    """Each target scored once with up to `window` tokens of its own document as context."""
    rows = []
    for s, e in doc_ranges(tokens[:limit + 1] if limit else tokens):
        rows.append((s, min(s + window, e), s))
        for a in range(s + window, e, stride):
            b = min(a + stride, e)
            rows.append((max(s, b - window), b, a))
    return sorted(rows, key=lambda r: r[0] - r[1])


# =============================================================================
# 10. Main
# =============================================================================
def broadcast_bytes(blob, rt):
    """Rank 0's bytes to every rank (all ranks evaluate the artifact file rank 0 wrote)."""
    if rt.world == 1:
        return blob
    obj = [blob]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def build_artifact(model, hessians, cfg, rt, out_dir, summary):
    """GPTQ + compression on rank 0; writes model.ptz, logs sizes; returns an error message if over the limit."""
    t = time.perf_counter()
    packed, qstats = quantize_state(model_state(model), hessians, quant_spec(cfg))
    summary["gptq_s"] = round(time.perf_counter() - t, 2)
    worst = sorted(qstats["hrel"].items(), key=lambda kv: -kv[1])[:3]
    rt.log(f"GPTQ: {len(qstats['rel'])} tensors in {summary['gptq_s']}s; LQER on {sorted(qstats['lqer'])}; "
           f"largest output errors {[(k, round(v, 4)) for k, v in worst]}")
    t = time.perf_counter()
    blob = pack_state({k: v.cpu() for k, v in packed.items()})
    summary["compress_s"] = round(time.perf_counter() - t, 2)
    code, method = wrap_code(Path(__file__).read_text())
    if rt.master:
        (out_dir / "model.ptz").write_bytes(blob)
        (out_dir / "train_gpt_wrapped.py").write_bytes(code)
    total = len(blob) + len(code)
    summary.update(artifact_bytes=len(blob), code_bytes=len(code), code_raw_bytes=len(Path(__file__).read_bytes()),
                   bytes_total=total, code_method=method)
    rt.log(f"artifact: model {len(blob):,} B (compressed in {summary['compress_s']}s) + code {len(code):,} B ({method}) "
           f"= {total:,} B; limit {cfg.artifact_limit:,} B")
    if total >= cfg.artifact_limit:
        return (f"error: artifact total {total:,} B >= ARTIFACT_LIMIT {cfg.artifact_limit:,} B: the submission is too "
                f"large; lower MATRIX_BITS/EMBED_BITS, raise CLIP_K_*, or shrink the model")
    return None


def submission_record(summaries, cfg):
    """submission.json in the shape of the challenge's records; several seeds -> mean and std."""
    bpbs = [s["val_bpb"] for s in summaries]
    s0 = summaries[0]
    mean = float(np.mean(bpbs))
    return dict(name=cfg.submission_name or "parameter-golf-kit", author=cfg.submission_author, github_id=cfg.submission_github_id,
                val_bpb=round(mean, 6), val_bpb_std=round(float(np.std(bpbs, ddof=1)), 6) if len(bpbs) > 1 else None,
                val_loss=round(float(np.mean([s["val_loss"] for s in summaries])), 6),
                bytes_total=max(s.get("bytes_total") or 0 for s in summaries),
                seeds=[dict(seed=s["seed"], val_bpb=s["val_bpb"], val_loss=s["val_loss"], bytes_total=s.get("bytes_total"),
                            steps=s.get("steps"), train_wallclock_s=s.get("train_wallclock_s"),
                            eval_time_s=s.get("eval_time_s")) for s in summaries],
                hardware=f"{s0['world_size']}x {s0.get('gpu')}", software=dict(torch=s0.get("torch"), python=platform.python_version()),
                date=time.strftime("%Y-%m-%d"))


def write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def main():
    cfg = Config()
    rt = setup_runtime()
    if rt.device.type != "cuda" and cfg.run_preset != "tiny":
        raise SystemExit("error: no CUDA GPU found; on a CPU-only machine only RUN_PRESET=tiny runs "
                         "(set RUN_PRESET=tiny, or run on a GPU machine)")
    if rt.world not in (1, 2, 4, 8) and not cfg.grad_accum_steps:
        raise SystemExit(f"error: WORLD_SIZE={rt.world}: use 1, 2, 4 or 8 GPUs, or set GRAD_ACCUM_STEPS")
    run_id = cfg.run_id or time.strftime("%Y%m%d_%H%M%S")
    out_dir = Path(cfg.artifact_dir or os.path.join("runs", run_id))
    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "log.txt").write_text("")
        rt.log_path = out_dir / "log.txt"
    for w in cfg.warnings:
        rt.log(w)
    rt.log(f"train_gpt.py run {run_id}: world {rt.world} device {rt.device} torch {torch.__version__} "
           f"python {platform.python_version()}")
    rt.log("config: " + json.dumps(cfg.values, sort_keys=True))
    torch.manual_seed(cfg.seed); np.random.seed(cfg.seed)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    summary = dict(run_id=run_id, world_size=rt.world, seed=cfg.seed, config=cfg.values, ttt_val_bpb=None,
                   gpu=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
                   torch=torch.__version__)
    model = GPT(cfg).to(rt.device)
    model.attn_backend = summary["attention_backend"] = pick_attention(cfg.attn_backend, rt.device)
    n_params = sum(p.numel() for p in model.parameters())
    summary["parameters"] = n_params
    rt.log(f"model: {n_params:,} parameters, attention backend {model.attn_backend}")
    val_tokens, val_bytes = load_val(cfg, rt)
    trainer = Trainer(cfg, rt, model)
    t_train0 = trainer.run(summary)
    deadline = t_train0 + cfg.max_wallclock_seconds if cfg.max_wallclock_seconds > 0 else float("inf")
    model.looping = cfg.num_loops > 0
    micro = cfg.train_batch_tokens // max(1, rt.world * trainer.accum)
    hessians = None
    if cfg.quantize:  # calibration belongs to the training budget
        t = time.perf_counter()
        hessians, n_cal = collect_hessians(model, trainer.loader, cfg, rt, deadline)
        summary["hessian_s"] = round(time.perf_counter() - t, 2)
        rt.log(f"GPTQ Hessians: {n_cal} batches in {summary['hessian_s']}s")
    summary["train_wallclock_s"] = round(time.perf_counter() - t_train0, 2)
    rt.log(f"training wallclock incl. calibration: {summary['train_wallclock_s']}s")
    loss, bpb, n, nb = eval_windows(Scorer(model, val_tokens, val_bytes, rt.device),
                                    plain_rows(val_tokens, cfg.train_seq_len, cfg.val_max_tokens), rt, micro)
    summary.update(pre_quant_val_bpb=bpb, pre_quant_val_loss=loss, val_loss=loss, val_bpb=bpb, val_tokens=n, val_bytes=nb)
    rt.log(f"pre-quant val_loss {loss:.5f} val_bpb {bpb:.5f} ({n:,} tokens, {nb:,} bytes)")
    failure = None
    if cfg.quantize:
        failure = build_artifact(model, hessians, cfg, rt, out_dir, summary)
        t_eval0 = time.perf_counter()
        eval_model = GPT(cfg).to(rt.device)
        eval_model.attn_backend, eval_model.looping = model.attn_backend, cfg.num_loops > 0
        blob = (out_dir / "model.ptz").read_bytes() if rt.master else None
        load_dequantized(eval_model, unpack_state(broadcast_bytes(blob, rt)), cfg)
        del model
        summary.update(run_evaluation(eval_model, val_tokens, val_bytes, cfg, rt, t_eval0,
                                      lambda k: [b for _ in range(k) for b in trainer.loader.next_step()]))
        summary.update(val_loss=summary.get("ttt_val_loss") or summary["quant_val_loss"],
                       val_bpb=summary.get("ttt_val_bpb") or summary["quant_val_bpb"])
    if rt.master:
        write_json(out_dir / "summary.json", summary)
        write_json(out_dir / "submission.json", submission_record([summary], cfg))
    rt.log(f"final val_bpb {summary['val_bpb']:.5f} (val_loss {summary['val_loss']:.5f}); summary: {out_dir / 'summary.json'}")
    if failure:
        raise SystemExit(failure)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
