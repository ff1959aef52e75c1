"""Parameter Golf 10-minute / 16 MB track: one-file training, GPTQ quantization,
compression and score-first TTT evaluation of a small GPT.

Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py   (1, 2, 4 or 8 GPUs)
Every knob is an environment variable (see CONFIG below / README.md).
Sections, in pipeline order:
  1 config   2 runtime   3 data   4 kernels   5 model   6 optimizers
  7 training   8 quantization + artifact   9 evaluation   10 main
"""
from __future__ import annotations

import ast, atexit, base64, contextlib, copy, difflib, glob, io, json, lzma, math, os, platform, struct, subprocess, sys, tempfile, time, zlib
PROCESS_START = time.perf_counter()  # start-up is counted from here, before torch is imported
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
try:
    import brotli
except ImportError:  # needed only to write / read the artifact: pip install brotli
    brotli = None
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
    ("VAL_MAX_TOKENS", 0, "diagnostics: score only the first N val tokens (0 = all; the scores of TTT, NGRAM_TILT and "
                           "CALIBRATE always use all; without them the run then has no valid result)"),
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
    ("WARMUP_STEPS", 1, "compile warm-up steps per loop setting; their state is discarded"),
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
    ("COMPILE", True, "torch.compile for training (GPU)"),
    ("COMPILE_SCOPE", "model", "model: compile the whole model (fastest steps) | blocks: one block graph reused by every "
                               "layer (faster start-up, slower steps)"),
    ("COMPILE_HELPER", True, "GPU: a second process compiles the loop-off training graph into the inductor cache while "
                             "this one compiles the looping graph (COMPILE_SCOPE=model)"),
    ("FUSED_CE", True, "Triton fused softcapped cross-entropy (GPU, symmetric cap)"),
    ("EAGER_KERNELS", True, "GPU: Triton kernels for the elementwise work of eager (uncompiled) forwards and backwards: "
                            "TTT's LoRA steps and evaluation (residual mixes + norms, q/k norm + rotary, XSA + gate, "
                            "LeakyReLU^2), and TTT's linears with adapters as one autograd node each (LoraLinears)"),
    ("ATTN_BACKEND", "auto", "auto (fa3; else fa4 for training, self-checked; else varlen on GPU; sdpa on CPU; evaluation "
                             "and TTT use fa4 only when named) | fa3 | fa4 | varlen | sdpa"),
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
    ("QUANT_SMALL_NUMEL", 65536, "tensors with at most this many values are stored in fp16"),
    ("ARTIFACT_LIMIT", 16000000, "bytes: model + code must stay below"),
    ("ARTIFACT_FIT", True, "if over the limit, widen every SDClip k just enough to fit (logged) instead of failing"),
    ("ARTIFACT_MARGIN", 0.002, "ARTIFACT_FIT aims this fraction below the limit"),
    # evaluation
    ("EVAL_ARTIFACT", "", "path of a model.ptz: skip training and evaluate it with these eval settings (shape settings "
                          "as in the run that wrote it); writes summary.json, no submission"),
    ("EVAL_BUDGET_SECONDS", 600.0, "evaluation budget from artifact load to the final number"),
    ("SLIDING_EVAL", False, "diagnostic sliding-window eval (stride EVAL_STRIDE)"),
    ("EVAL_STRIDE", 64, "sliding-window stride"),
    ("EVAL_BATCH_TOKENS", 131072, "padded tokens per forward of plain / sliding / score-only evaluation"),
    ("TTT_MODE", "phased", "phased | full | off"),
    ("TTT_CHUNK", 48, "tokens scored per TTT step"),
    ("TTT_CONTEXT", 2048, "context window of TTT scoring"),
    ("TTT_BATCH_DOCS", 64, "documents per LoRA batch"),
    ("TTT_MAX_BATCH_TOKENS", 65536, "padded tokens per LoRA forward (a chunk step splits its documents beyond)"),
    ("TTT_CUDA_GRAPHS", True, "GPU: run each LoRA step shape as a CUDA graph, captured on first use (TTT 2.6x faster on an H200)"),
    ("TTT_PAD_ROWS", "x8", "CUDA-graph row counts of the LoRA forwards: x8 (exact up to 16, then multiples of 8) | pow2 "
                           "(powers of two: more padding, fewer graphs; 2.4% slower on the bench val)"),
    ("TTT_LORA_RANK", 80, "LoRA rank"),
    ("TTT_LORA_LR", 1e-4, "LoRA AdamW lr"),
    ("TTT_LORA_WD", 0.5, "LoRA AdamW weight decay"),
    ("PHASED_TTT_PREFIX_DOCS", 2500, "documents whose scored prefix feeds the global SGD phases"),
    ("PHASED_TTT_PHASES", 3, "global SGD phases"),
    ("PHASED_TTT_CUMULATIVE", True, "phase k trains on all prefix docs scored so far (else on its own group only)"),
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
    ("CALIBRATE_BATCHES", 4, "training micro-batches read for the calibration fit"),
    ("CALIBRATE_TOKENS", 32768, "training tokens (sampled from those batches) the calibration is fitted on"),
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
                 EMA_DECAY=0.9, EVAL_BUDGET_SECONDS=120.0, EVAL_BATCH_TOKENS=4096, CALIBRATE_BATCHES=1,
                 QUANT_SMALL_NUMEL=1024),
    "demo": dict(DATA_PATH="./data/demo", VOCAB_SIZE=1024, NUM_LAYERS=9, LOOP_START=3, LOOP_END=4, PARALLEL_START=6,
                 MODEL_DIM=384, NUM_HEADS=6, NUM_KV_HEADS=3, ITERATIONS=120, MAX_WALLCLOCK_SECONDS=0.0,
                 TRAIN_BATCH_TOKENS=32768, GRAD_ACCUM_STEPS=1,
                 TRAIN_SEQ_LEN=1024, TTT_CONTEXT=1024, PHASED_TTT_PREFIX_DOCS=100, EVAL_BUDGET_SECONDS=120.0,
                 COMPILE_SCOPE="blocks"),
}
KNOWN_FOREIGN = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "OMP_NUM_THREADS"}


FAMILIES = {"TTT", "PHASED", "GPTQ", "LQER", "MUON", "NGRAM", "QUANT", "XSA", "EMA", "AWQ", "EMBED", "MATRIX", "SCALAR",
            "CLIP", "LOOP", "ROPE", "QK", "SMEAR", "ATTN", "ARTIFACT", "CALIBRATE", "SUBMISSION", "EVAL", "VAL", "TRAIN",
            "DATA"}
ALIASES = {"PHASED_TTT_ENABLED": "TTT_MODE=phased", "TTT_ENABLED": "TTT_MODE (phased | full | off)",
           "SLIDING_WINDOW_ENABLED": "SLIDING_EVAL", "NGRAM_ENABLED": "NGRAM_TILT", "DATA_DIR": "DATA_PATH"}
REMOVED = {"TTT_COMPILE": "the eager TTT kernels (EAGER_KERNELS, the default) are faster without a compile"}
POS = (1, None)  # numeric settings: inclusive (low, high), None = no bound (1 << 16: uint16 token ids, the rotary table)
BOUNDS = dict(SEED=(0, 2**32 - 1), VOCAB_SIZE=(2, 1 << 16), MODEL_DIM=POS, NUM_LAYERS=POS, NUM_HEADS=POS, NUM_KV_HEADS=POS,
              MLP_MULT=POS, ROPE_DIMS=(0, None), NUM_LOOPS=(0, None), LOOP_START_FRAC=(0, 1), ITERATIONS=POS,
              MAX_WALLCLOCK_SECONDS=(0, None), GPTQ_RESERVE_SECONDS=(0, None), TRAIN_BATCH_TOKENS=POS, TRAIN_SEQ_LEN=(1, 1 << 16),
              GRAD_ACCUM_STEPS=(0, None), WARMUP_STEPS=(0, None), WARMDOWN_FRAC=(0, 1), MIN_LR=(0, 1),
              MUON_MOMENTUM=(0, 1), MUON_MOMENTUM_WARMUP_START=(0, 1), MUON_MOMENTUM_WARMUP_STEPS=(0, None),
              MUON_NS_STEPS=(1, 5), GRAD_CLIP_NORM=(0, None), EMA_DECAY=(0, 0.99999), TRAIN_LOG_EVERY=POS,
              VAL_LOSS_EVERY=(0, None), GPTQ_CALIB_BATCHES=POS, GPTQ_BLOCK=POS, GPTQ_DAMP=(0, None), MATRIX_BITS=(2, 8),
              EMBED_BITS=(2, 8), LQER_TOP_K=(0, None), LQER_RANK=POS, QUANT_SMALL_NUMEL=(0, None), ARTIFACT_LIMIT=POS,
              ARTIFACT_MARGIN=(0, 0.5), EVAL_BUDGET_SECONDS=(0, None), EVAL_STRIDE=POS, EVAL_BATCH_TOKENS=POS,
              TTT_CHUNK=POS, TTT_CONTEXT=(1, 1 << 16), TTT_BATCH_DOCS=POS, TTT_MAX_BATCH_TOKENS=POS, TTT_LORA_RANK=POS,
              PHASED_TTT_PREFIX_DOCS=(0, None), PHASED_TTT_PHASES=(0, None), TTT_SGD_CHUNK_TOKENS=POS,
              FULL_TTT_EPOCHS=POS, NGRAM_ORDER=POS, NGRAM_THRESHOLD=(0, 1), CALIBRATE_BATCHES=POS, CALIBRATE_TOKENS=POS,
              MAX_TRAIN_SHARDS=(0, None), VAL_MAX_TOKENS=(0, None))


def looks_like(key, names):
    """The setting `key` was probably meant as, or None: a close spelling, or a
    name of one of our families (same first two words, or a family word)."""
    close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, names, n=1, cutoff=0.8)
    if close:
        return close[0]
    words = key.split("_")
    same = [n for n in names if n.split("_")[:2] == words[:2] and len(words) > 1] or \
           [n for n in names if words[0] in FAMILIES and n.split("_")[0] == words[0]]
    return (difflib.get_close_matches(key, same, n=1, cutoff=0.0) or [None])[0] if same else None


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
            close = looks_like(key, names)
            if key in REMOVED:
                self.warnings.append(f"warning: environment variable {key} was removed ({REMOVED[key]}); it is ignored")
            elif close:
                self.warnings.append(f"warning: environment variable {key} is not a setting of train_gpt.py; "
                                     f"did you mean {close}? (it is ignored)")
        v = self.values
        for n, (lo, hi) in BOUNDS.items():
            if (lo is not None and v[n] < lo) or (hi is not None and v[n] > hi):
                rule = f"{lo} <= {n} <= {hi}" if hi is not None else f"{n} >= {lo}"
                raise SystemExit(f"error: {n}={v[n]!r} is out of range; use {rule}")
        d, h = v["MODEL_DIM"], v["NUM_HEADS"]
        if d % h or h % v["NUM_KV_HEADS"] or d // h < v["ROPE_DIMS"]:
            raise SystemExit("error: MODEL_DIM must divide into NUM_HEADS heads of >= ROPE_DIMS dims, "
                             "and NUM_HEADS must be a multiple of NUM_KV_HEADS")
        if not (0 <= v["LOOP_START"] <= v["LOOP_END"] < v["NUM_LAYERS"]):
            raise SystemExit(f"error: need 0 <= LOOP_START <= LOOP_END < NUM_LAYERS={v['NUM_LAYERS']}")
        if not 1 <= v["SMEAR_DIMS"] <= v["MODEL_DIM"]:
            raise SystemExit(f"error: SMEAR_DIMS={v['SMEAR_DIMS']} must be between 1 and MODEL_DIM={v['MODEL_DIM']} (the "
                             f"gates read the first SMEAR_DIMS dims)")
        if v["ROPE_DIMS"] % 2:
            raise SystemExit(f"error: ROPE_DIMS={v['ROPE_DIMS']} must be even (rotary turns pairs of dims)")
        if v["TTT_CHUNK"] > v["TTT_CONTEXT"]:
            raise SystemExit(f"error: TTT_CHUNK={v['TTT_CHUNK']} must be <= TTT_CONTEXT={v['TTT_CONTEXT']} (each chunk "
                             f"is scored in one window of TTT_CONTEXT tokens)")
        if v["EVAL_STRIDE"] > min(v["TRAIN_SEQ_LEN"], v["TTT_CONTEXT"]):
            raise SystemExit(f"error: EVAL_STRIDE={v['EVAL_STRIDE']} must be <= TRAIN_SEQ_LEN={v['TRAIN_SEQ_LEN']} and "
                             f"TTT_CONTEXT={v['TTT_CONTEXT']} (the windows it scores)")

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


def setup_torch(rt):  # backend flags (the compile helper sets the same, so its cache entries match)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # The training graph holds SoftcapCE, an autograd.Function, and AOTAutograd's on-disk cache skips such graphs by
    # default, so the graph the compile helper wrote was traced again (15 s instead of 3 on an H200). Its key covers the
    # traced forward and backward and the Triton kernels' source, so an edited function or kernel is not served stale.
    import torch._functorch.config as functorch_config
    if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):  # older torch: only slower
        functorch_config.autograd_cache_allow_custom_autograd_functions = True


def fresh_kernel_side_table():
    """torch.compile numbers the constant arguments of user Triton kernels (the fused CE) in a per-process table, and
    the numbers are part of the AOTAutograd cache key: a graph traced after another one (the loop-off graph after the
    looping one) never matched the entry the compile helper, a fresh process, wrote. So each warm-up compile starts
    from an empty table: only tracing and compiling read it (the backward's compile runs at the first backward), and
    the previous setting's full step has compiled both of its graphs by then."""
    try:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        kernel_side_table.reset_table()
    except (ImportError, AttributeError):  # another torch: only the cache hit is lost
        pass


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
            out.append(packed_batch(chunk[:-1], chunk[1:], self.seq_len, self.device))
        return out


def packed_batch(x, y, seq_len, dev):
    """(x, y, cu_seqlens) on the device. cu_seqlens is exact, not padded to a fixed length: each padding entry is an
    empty segment that the attention kernels still launch blocks for. Its length is marked dynamic, so one compiled
    graph serves all."""
    pin = dev.type == "cuda"
    t = lambda a, dt: (torch.from_numpy(a).to(dt).pin_memory() if pin else torch.from_numpy(a).to(dt)).to(dev, non_blocking=True)
    cu = t(segment_bounds(x, seq_len), torch.int32)
    torch._dynamo.maybe_mark_dynamic(cu, 0)
    return t(x, torch.int64), t(y, torch.int64), cu


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
    if any(0xE001 <= ord(c) <= 0xE004 for i in range(n) for c in sp.id_to_piece(i)):  # the CaseOps operators
        raise SystemExit(f"error: no byte sidecar in {cfg.data_path}, and {path} is a CaseOps tokenizer: its pieces do not "
                         f"give the original text's bytes; rebuild the data with prepare_caseops_data.py (it writes "
                         f"fineweb_val_bytes_*.bin)")
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
def available_backends(device) -> dict:
    have = {"sdpa": True}
    if device.type != "cuda":
        return have
    try:
        import flash_attn_interface  # noqa: F401  (FlashAttention-3)
        have["fa3"] = True
    except Exception:
        pass
    # FA4 builds its kernels on first use (seconds each); with its on-disk cache the compile helper and later runs on
    # this machine load them instead (FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=0 turns it off)
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    try:
        from flash_attn.cute import flash_attn_varlen_func  # noqa: F401  (flash-attn-4)
        have["fa4"] = torch.cuda.get_device_capability(device)[0] >= 9
    except Exception as e:  # noqa: BLE001  (installed but broken, e.g. a CUTLASS DSL wheel without `cutlass`): say why
        if not isinstance(e, ModuleNotFoundError) or e.name not in ("flash_attn", "flash_attn.cute"):
            FA4_IMPORT_ERROR[:] = [f"{type(e).__name__}: {str(e)[:200]}"]
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        have["varlen"] = True
    except Exception:
        pass
    return have


def attention_heads(cfg):  # (query heads, KV heads, head dim): the shapes the attention self-check runs at
    return cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads


def pick_attention(requested: str, device, training=True, heads=(8, 4, 64), log=print) -> str:
    """auto: fa3, else fa4 for training (after a self-check against SDPA), else varlen (GPU), else sdpa. fa4 serves
    evaluation and TTT only when named: its kernels under TTT's CUDA graphs have not been checked on a GPU here."""
    have = available_backends(device)
    if FA4_IMPORT_ERROR and training and requested == "auto" and not have.get("fa3"):
        log(f"attention backend fa4 skipped: flash-attn-4 is installed but does not import ({FA4_IMPORT_ERROR[0]})")
    if requested == "auto":
        for b in ("fa3", "fa4", "varlen", "sdpa"):
            if have.get(b) and (b != "fa4" or training and attention_agrees(b, device, heads, log)):
                return b
    if not have.get(requested):
        raise SystemExit(f"error: ATTN_BACKEND={requested} is not available here (needs a GPU, or the package is not "
                         f"importable); available: {sorted(k for k in have if have[k])}"
                         + (f"; flash-attn-4 import: {FA4_IMPORT_ERROR[0]}" if requested == "fa4" and FA4_IMPORT_ERROR else ""))
    if requested == "fa4":  # define the custom op now: defining it while torch.compile traces would break the graph
        fa4_op()
    return requested


def agree_attention(choice, rt):
    """The training backend of every rank. Each rank picks its own (fa4's self-check runs on each GPU); where the
    picks differ, all take the one latest in auto's order (fa3, fa4, varlen, sdpa), which the others passed over."""
    if rt.world <= 1 or not dist.is_initialized():
        return choice
    picks = [None] * rt.world
    dist.all_gather_object(picks, choice)
    agreed = max(picks, key=("fa3", "fa4", "varlen", "sdpa").index)
    if len(set(picks)) > 1:
        rt.log(f"warning: the ranks picked the attention backends {picks} (a self-check failed on some GPU); "
               f"all train with {agreed}")
    return agreed


def attention_agrees(backend, device, heads, log):
    """Whether backend's forward and gradients on a small packed batch match fp32 masked SDPA (rel. error < 2e-2)."""
    h, kv, d = heads
    try:  # eager calls: varlen_attention defines the fa4 op itself
        gen = torch.Generator(device=device).manual_seed(0)
        cu = torch.tensor([0, 100, 300, 512], dtype=torch.int32, device=device)
        qkv, g = [torch.randn(512, n, d, generator=gen, device=device) for n in (h, kv, kv)], None
        res = []
        for b, dt in ((backend, torch.bfloat16), ("sdpa", torch.float32)):
            x = [t.to(dt).requires_grad_() for t in qkv]
            out = varlen_attention(*x, cu, 512, b)
            g = torch.randn(out.shape, generator=gen, device=device) if g is None else g
            res.append([out.detach(), *torch.autograd.grad(out, x, g.to(out.dtype))])
        err = max(float((a.float() - r).norm() / r.norm()) for a, r in zip(*res))
        if err < 2e-2:
            return True
        log(f"attention backend {backend} skipped: relative error {err:.1e} against SDPA")
    except Exception as e:  # noqa: BLE001  (a kernel that fails to build or run on this GPU)
        log(f"attention backend {backend} skipped: {type(e).__name__}: {str(e)[:200]}")
    return False


def varlen_attention(q, k, v, cu, max_len, backend):
    """Causal attention within segments. q: (T, H, D), k/v: (T, KV, D), cu: int32 cu_seqlens."""
    if backend == "fa3":
        import flash_attn_interface as fa3
        out = fa3.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        return out[0] if isinstance(out, tuple) else out
    if backend == "fa4":
        return fa4_op()(q, k, v, cu, max_len)[0]
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn
        kw = dict(is_causal=True) if "is_causal" in VARLEN_PARAMS else dict(window_size=(-1, 0))
        if "enable_gqa" in VARLEN_PARAMS:
            kw["enable_gqa"] = q.shape[1] != k.shape[1]
        # else: the FlashAttention-2 kernel behind it takes fewer KV heads as they are (GQA), checked against SDPA on
        # an H200 by tests/gpu_attn_bench.py: same error as with repeated heads, attention fwd+bwd 8% faster
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)
    # masked SDPA (CPU, tests): whole segments are grouped into blocks of about
    # SDPA_BLOCK tokens, so cost grows with the block, not with the batch
    bounds, outs, lo = cu.tolist(), [], 0
    while lo < len(bounds) - 1:
        hi = lo + 1
        while hi < len(bounds) - 1 and bounds[hi + 1] - bounds[lo] <= SDPA_BLOCK:
            hi += 1
        a, b = bounds[lo], bounds[hi]
        lo = hi
        if a == b:
            continue
        ar = torch.arange(a, b, device=q.device)
        seg = torch.searchsorted(cu, ar.to(cu.dtype), right=True)
        mask = (seg[:, None] == seg[None, :]) & (ar[None, :] <= ar[:, None])
        outs.append(F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                                   attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1]).transpose(0, 1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


SDPA_BLOCK = 1024
_FA4, FA4_IMPORT_ERROR = [], []


def fa4_op():
    """FlashAttention-4 (CuTe DSL) varlen causal attention as a torch custom op with its own backward, so that
    torch.compile keeps one graph around it (FA4's autograd.Function would break the graph at every layer).
    Returns op(q, k, v, cu, max_len) -> (out, lse). GQA is native: k/v keep their NUM_KV_HEADS heads."""
    if _FA4:
        return _FA4[0]
    from flash_attn.cute import interface as fa4
    kw = lambda cu, n: dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n)

    @torch.library.custom_op("pgolf::fa4_fwd", mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = fa4._flash_attn_fwd(q, k, v, causal=True, return_lse=True, **kw(cu, max_len))[:2]
        return out, lse

    @fwd.register_fake
    def _(q, k, v, cu, max_len):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    @torch.library.custom_op("pgolf::fa4_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            cu: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv = fa4._flash_attn_bwd(q, k, v, out, dout, lse, None, True, 0.0, **kw(cu, max_len))[:3]
        return dq, dk, dv

    @bwd.register_fake
    def _(dout, q, k, v, out, lse, cu, max_len):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4], *output)
        ctx.max_len = inputs[4]

    def backward(ctx, dout, dlse):
        q, k, v, cu, out, lse = ctx.saved_tensors
        return (*bwd(dout.contiguous(), q, k, v, out, lse, cu, ctx.max_len), None, None)
    fwd.register_autograd(backward, setup_context=setup)
    _FA4.append(fwd)
    return fwd


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

    @triton.jit  # n is specialized (multiple of 16 or not): the mask then lets the loads be vectorized
    def _leaky_sq(U, G, OUT, n, slope, BACK: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        u = tl.load(U + i, mask=i < n, other=0.0).to(tl.float32)
        a = tl.where(u > 0, u, slope * u)
        if BACK:  # d/du leaky(u)^2 = 2 leaky(u) leaky'(u)
            r = 2.0 * tl.load(G + i, mask=i < n, other=0.0).to(tl.float32) * tl.where(u > 0, a, slope * a)
        else:
            r = a * a
        tl.store(OUT + i, r.to(OUT.dtype.element_ty), mask=i < n)

    @triton.jit(do_not_specialize=["n"])  # one build serves every size
    def _xsa_gate(Y, V, T, GATE, G_OUT, OUT, DV, DGATE, n, GROUP: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                  BACK: tl.constexpr, BLOCK: tl.constexpr):
        """Rows are (token, head) pairs, BLOCK of them (whole KV groups) per program; v of row r is row r // GROUP."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, D)
        m = (r < n)[:, None]
        y = tl.load(Y + r[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        v = tl.load(V + (r // GROUP)[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        nv = tl.maximum(tl.sqrt(tl.sum(v * v, 1)), 1e-12)
        vh = v / nv[:, None]
        t = tl.load(T + r % H, mask=r < n, other=0.0)
        gt = tl.load(GATE + r, mask=r < n, other=0.0).to(tl.float32)
        s = tl.sum(y * vh, 1)
        y2 = y - (t * s)[:, None] * vh
        if BACK:
            g = tl.load(G_OUT + r[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(DGATE + r, tl.sum(g * y2, 1).to(DGATE.dtype.element_ty), mask=r < n)
            g2 = g * gt[:, None]
            c = tl.sum(g2 * vh, 1)
            tl.store(OUT + r[:, None] * D + d[None, :], (g2 - (t * c)[:, None] * vh).to(OUT.dtype.element_ty), mask=m)
            dvh = -t[:, None] * (s[:, None] * g2 + c[:, None] * y)
            dv = (dvh - vh * tl.sum(dvh * vh, 1)[:, None]) / nv[:, None]  # through v / |v|
            dv = tl.sum(tl.reshape(dv, (BLOCK // GROUP, GROUP, D)), 1)  # the heads of a group share v
            rv = tl.program_id(0).to(tl.int64) * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
            tl.store(DV + rv[:, None] * D + d[None, :], dv.to(DV.dtype.element_ty), mask=(rv < n // GROUP)[:, None])
        else:
            tl.store(OUT + r[:, None] * D + d[None, :], (y2 * gt[:, None]).to(OUT.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["n"])  # one build serves every size
    def _qk_norm_rope(X, G, COS, SIN, POS, GAIN, OUT, n, H: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                      HAS_GAIN: tl.constexpr, BACK: tl.constexpr, BLOCK: tl.constexpr):
        """Rows are (token, head) pairs: rms_norm, the first R dims rotated (pairs c, c + R/2), times the head's gain."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        c = tl.arange(0, D)
        m = (r < n)[:, None]
        first, rot = c < R // 2, c < R
        partner = tl.where(first, c + R // 2, tl.where(rot, c - R // 2, c))
        pos = tl.load(POS + r // H, mask=r < n, other=0)
        f = pos[:, None] * (R // 2) + tl.where(first, c, c - R // 2)[None, :]
        cs = tl.load(COS + f, mask=m & rot[None, :], other=1.0)
        sn = tl.load(SIN + f, mask=m & rot[None, :], other=0.0) * tl.where(first, -1.0, 1.0)[None, :]
        if HAS_GAIN:
            gn = tl.load(GAIN + r % H, mask=r < n, other=1.0)[:, None]
        else:
            gn = tl.full((BLOCK, 1), 1.0, tl.float32)
        x = tl.load(X + r[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 1) / D + 1e-6)[:, None]
        if BACK:  # rotation by -angle, then the rms_norm backward
            g = tl.load(G + r[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32) * gn
            gp = tl.load(G + r[:, None] * D + partner[None, :], mask=m, other=0.0).to(tl.float32) * gn
            dxh = g * cs - gp * sn
            xh = x * rstd
            out = rstd * (dxh - xh * (tl.sum(dxh * xh, 1) / D)[:, None])
        else:
            xp = tl.load(X + r[:, None] * D + partner[None, :], mask=m, other=0.0).to(tl.float32)
            out = (x * cs + xp * sn) * rstd * gn
        tl.store(OUT + r[:, None] * D + c[None, :], out.to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _mix_weight(W, c, K: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):  # (1, DP): 0 = weight 1, 1 = a
        if K == 2:  # scalar, 2 = per channel
            w = tl.load(W + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
        elif K == 1:
            w = tl.load(W + c * 0).to(tl.float32)[None, :]
        else:
            w = tl.full((1, DP), 1.0, tl.float32)
        return w

    @triton.jit(do_not_specialize=["n"])  # one build serves every size
    def _mix_norm(X1, X2, X3, W1, W2, W3, GY, GN, Y, NRM, D1, D2, D3, n, s, D: tl.constexpr, DP: tl.constexpr,
                  K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, NX: tl.constexpr, NORM: tl.constexpr,
                  BACK: tl.constexpr, BLOCK: tl.constexpr):
        """y = w1 x1 + w2 x2 (+ w3 x3), weights of kinds K (_mix_weight); with NORM also rms_norm(y) * s. Backward:
        dx_i = w_i (gy + the rms_norm backward of gn), from y recomputed. Rows of D channels, DP = D rounded up to a
        power of two (Triton's block sizes), the rest masked."""
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        c = tl.arange(0, DP)
        m = (r < n)[:, None] & (c < D)[None, :]
        off = r[:, None] * D + c[None, :]
        w1, w2 = _mix_weight(W1, c, K1, D, DP), _mix_weight(W2, c, K2, D, DP)
        y = w1 * tl.load(X1 + off, mask=m, other=0.0).to(tl.float32) + w2 * tl.load(X2 + off, mask=m, other=0.0).to(tl.float32)
        if NX == 3:
            w3 = _mix_weight(W3, c, K3, D, DP)
            y += w3 * tl.load(X3 + off, mask=m, other=0.0).to(tl.float32)
        y = y.to(Y.dtype.element_ty).to(tl.float32)  # the norm sees the stored (rounded) y, as unfused
        if NORM:
            rstd = tl.rsqrt(tl.sum(y * y, 1) / D + 1e-6)[:, None]
        if BACK:
            g = tl.load(GY + off, mask=m, other=0.0).to(tl.float32)
            if NORM:
                gn = tl.load(GN + off, mask=m, other=0.0).to(tl.float32) * s
                yh = y * rstd
                g += rstd * (gn - yh * (tl.sum(gn * yh, 1) / D)[:, None])
            tl.store(D1 + off, (w1 * g).to(D1.dtype.element_ty), mask=m)
            tl.store(D2 + off, (w2 * g).to(D2.dtype.element_ty), mask=m)
            if NX == 3:
                tl.store(D3 + off, (w3 * g).to(D3.dtype.element_ty), mask=m)
        else:
            tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)
            if NORM:
                tl.store(NRM + off, (y * rstd).to(NRM.dtype.element_ty).to(tl.float32) * s, mask=m)
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


def eager_kernels(t, triton_needed=True):
    """Whether the eager kernels below run: CUDA tensors outside torch.compile (whose own fusion serves training);
    they cut the elementwise passes of TTT's eager LoRA steps. The tests set EAGER_KERNELS_ANYWHERE to run them on
    the CPU (the Triton ones in Triton's interpreter; LoraLinears is plain torch and needs no triton)."""
    return (HAVE_TRITON or not triton_needed) and (t.is_cuda or EAGER_KERNELS_ANYWHERE) and not torch.compiler.is_compiling()


EAGER_KERNELS_ANYWHERE = False


@contextlib.contextmanager
def frozen(model):
    """The model's parameters without gradient for the duration (eager forwards then run the kernels below: TTT,
    GPTQ calibration), their requires_grad restored after."""
    req = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)


class LeakySq(torch.autograd.Function):
    """leaky_relu(u, slope)^2: one pass forward, one backward (fp32 math, rounded once)."""

    @staticmethod
    def forward(ctx, u, slope):
        u = u.contiguous()
        h, grid = torch.empty_like(u), (triton.cdiv(u.numel(), 1024),)
        _leaky_sq[grid](u, u, h, u.numel(), slope, BACK=False, BLOCK=1024)
        ctx.save_for_backward(u)
        ctx.slope = slope
        return h

    @staticmethod
    def backward(ctx, g):
        u, = ctx.saved_tensors
        du, grid = torch.empty_like(u), (triton.cdiv(u.numel(), 1024),)
        _leaky_sq[grid](u, g.contiguous(), du, u.numel(), ctx.slope, BACK=True, BLOCK=1024)
        return du, None


class XSAGate(torch.autograd.Function):
    """(y - t_h (y . v_hat) v_hat) * gate, v_hat = v / |v| of the head's KV group: one pass forward, one backward.
    y (B, T, H, D), v (B, T, KV, D), t = tanh(alpha) (H,) fp32 without gradient, gate (B, T, H)."""

    @staticmethod
    def forward(ctx, y, v, t, gate):
        y, v, gate = y.contiguous(), v.contiguous(), gate.contiguous()
        n, group = y.numel() // y.shape[-1], y.shape[2] // v.shape[2]
        ctx.grid, ctx.args = (triton.cdiv(n, 16 * group),), dict(n=n, GROUP=group, H=y.shape[2], D=y.shape[-1],
                                                                   BLOCK=16 * group)  # whole KV groups per program
        out = torch.empty_like(y)
        _xsa_gate[ctx.grid](y, v, t, gate, y, out, y, gate, BACK=False, **ctx.args)
        ctx.save_for_backward(y, v, t, gate)
        return out

    @staticmethod
    def backward(ctx, g):
        y, v, t, gate = ctx.saved_tensors
        dy, dv, dgate = torch.empty_like(y), torch.empty_like(v), torch.empty_like(gate)
        _xsa_gate[ctx.grid](y, v, t, gate, g.contiguous(), dy, dv, dgate, BACK=True, **ctx.args)
        return dy, dv, None, dgate


class QKNormRope(torch.autograd.Function):
    """rotate(rms_norm(x)) * gain: one pass forward, one backward. x (B, T, H, D); cos / sin: Rotary's fp32 tables
    (positions x rope_dims / 2); pos (B, T); gain (H,) fp32 without gradient, or None."""

    @staticmethod
    def forward(ctx, x, cos, sin, pos, gain):
        x, pos = x.contiguous(), pos.contiguous()
        out, n = torch.empty_like(x), x.numel() // x.shape[-1]
        ctx.args = dict(n=n, H=x.shape[2], D=x.shape[3], R=2 * cos.shape[1], HAS_GAIN=gain is not None, BLOCK=16)
        _qk_norm_rope[(triton.cdiv(n, 16),)](x, x, cos, sin, pos, x if gain is None else gain, out, BACK=False, **ctx.args)
        ctx.save_for_backward(x, cos, sin, pos, gain)
        return out

    @staticmethod
    def backward(ctx, g):
        x, cos, sin, pos, gain = ctx.saved_tensors
        dx = torch.empty_like(x)
        _qk_norm_rope[(triton.cdiv(ctx.args["n"], 16),)](x, g.contiguous(), cos, sin, pos, x if gain is None else gain, dx,
                                                         BACK=True, **ctx.args)
        return dx, None, None, None, None


class LoraLinears(torch.autograd.Function):
    """ys_i = x @ W_i^T (+ (x @ A_i) @ B_i where has[i]) for linears sharing x (B, T, in), base weights W_i without
    gradient (TTT). One autograd node: the gradient of x accumulates inside the GEMMs (beta = 1) instead of an add
    kernel per further consumer of x (five for q, k, v with adapters). Adapters in any dtype; their gradients come
    back in it (computed in x's dtype, as through lora_linear's casts)."""

    @staticmethod
    def forward(ctx, x, has, *wab):
        n, dt = len(has), x.dtype
        Ws, ab = [w.to(dt) for w in wab[:n]], iter(wab[n:])
        ads = [(next(ab), next(ab)) if h else None for h in has]
        ys, xas = [], []
        for W, ad in zip(Ws, ads):
            y = (x.reshape(-1, x.shape[-1]) @ W.T).view(*x.shape[:-1], W.shape[0])
            if ad is not None:
                xas.append(torch.bmm(x, ad[0].to(dt)))
                y = torch.baddbmm(y, xas[-1], ad[1].to(dt))
            ys.append(y)
        ctx.has, ctx.dtypes = has, [t.dtype for t in wab[n:]]
        ctx.save_for_backward(x, *Ws, *xas, *wab[n:])
        return tuple(ys)

    @staticmethod
    def backward(ctx, *gs):
        x, *rest = ctx.saved_tensors
        n, dt = len(ctx.has), x.dtype
        Ws, xas, ab = rest[:n], iter(rest[n:n + sum(ctx.has)]), iter(rest[n + sum(ctx.has):])
        dx, dab, want = None, [], ctx.needs_input_grad[0]  # (the first block's input has no gradient)
        for g, W, h in zip(gs, Ws, ctx.has):
            g = g.contiguous()
            if want:
                g2 = g.view(-1, W.shape[0])
                dx = (g2 @ W).view(x.shape) if dx is None else dx.view(g2.shape[0], -1).addmm_(g2, W).view(x.shape)
            if h:
                A, Bm = next(ab), next(ab)
                t = torch.bmm(g, Bm.to(dt).mT)
                dab += [torch.bmm(x.mT, t), torch.bmm(next(xas).mT, g)]
                if want:
                    dx.baddbmm_(t, A.to(dt).mT)
        return (dx, None, *[None] * n, *[d.to(t) for d, t in zip(dab, ctx.dtypes)])


class MixNorm(torch.autograd.Function):
    """y = sum_i w_i * x_i over 2 or 3 inputs of one shape (last dim D); each weight None (1), a 0-dim tensor or a
    (D,) tensor, without gradient; with a scale s (a Python float) also rms_norm(y) * s, rounded as unfused. One pass
    each way."""

    @staticmethod
    def launch(ctx, xs, outs, gy=None, gn=None):
        """Forward: outs = (y, rms_norm(y) * s or y); backward (gy given): outs = the gradients of xs."""
        x1, back = xs[0], gy is not None
        w = [x1 if w is None else w for w in ctx.ws] + [x1]  # unused pointers: any tensor
        y, nrm = (x1, x1) if back else outs
        d = list(outs) + [x1] if back else [x1] * 3
        _mix_norm[(triton.cdiv(ctx.args["n"], 8),)](x1, xs[1], xs[-1], w[0], w[1], w[2], gy if back else x1,
                                                    gn if back else x1, y, nrm, d[0], d[1], d[2], BACK=back, **ctx.args)

    @staticmethod
    def forward(ctx, s, ws, *xs):
        xs = [x.contiguous() for x in xs]
        D = xs[0].shape[-1]
        kinds = [0 if w is None else 1 if w.dim() == 0 else 2 for w in ws] + [0]
        ctx.ws, ctx.args = ws, dict(n=xs[0].numel() // D, s=1.0 if s is None else s, D=D, DP=triton.next_power_of_2(D), K1=kinds[0], K2=kinds[1],
                                    K3=kinds[2], NX=len(xs), NORM=s is not None, BLOCK=8)
        y = torch.empty_like(xs[0])
        nrm = torch.empty_like(y) if s is not None else y
        MixNorm.launch(ctx, xs, (y, nrm))
        ctx.save_for_backward(*xs)
        return (y, nrm) if s is not None else y

    @staticmethod
    def backward(ctx, gy, gn=None):
        xs = ctx.saved_tensors
        ds = [torch.empty_like(x) for x in xs]
        gy = gy.contiguous()
        MixNorm.launch(ctx, xs, ds, gy, gy if gn is None else gn.contiguous())
        return (None, None, *ds)


# =============================================================================
# 5. Model
# =============================================================================
def rms_norm(x, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def lora_linear(mod, x, ad):
    """mod(x) plus an optional per-sequence low-rank adapter ad = (A (B, in, r), Bm (B, r, out)); x: (B, T, in)."""
    y = mod(x)
    if ad is not None:
        y = torch.baddbmm(y, torch.bmm(x, ad[0].to(x.dtype)), ad[1].to(x.dtype))  # the add in the GEMM
    return y


def lora_linears(mods, x, ads, eager, post=lambda y: y):
    """[post(lora_linear(mod, x, ad))] for linears that share x. Eagerly with frozen base weights and adapters (TTT):
    one LoraLinears node. Otherwise the torch expressions, in the order the compiled training graph has them."""
    if eager and not mods[0].weight.requires_grad and any(a is not None for a in ads) and eager_kernels(x, False):
        has = tuple(a is not None for a in ads)
        return [post(y) for y in LoraLinears.apply(x, has, *[m.weight for m in mods], *[t for a in ads if a is not None for t in a])]
    return [post(lora_linear(m, x, a)) for m, a in zip(mods, ads)]


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
        pow2 = lambda n: n & (n - 1) == 0
        self.eager = cfg.eager_kernels
        self.xsa_kernel = cfg.eager_kernels and cfg.xsa and pow2(h // kv) and pow2(self.hd)  # Triton: powers of two
        self.qk_kernel = cfg.eager_kernels and pow2(self.hd)

    def gate(self, x):  # (B, T, H)
        return torch.sigmoid(self.gate_scale * x[..., :self.gate_dims] @ self.gate_w.to(x.dtype).T)

    def forward(self, x, ctx, ad):
        B, T, _ = x.shape
        q, k, v = lora_linears((self.q, self.k, self.v), x, (ad.get("q"), ad.get("k"), ad.get("v")), self.eager,
                               lambda y: y.view(B, T, -1, self.hd))
        if self.qk_kernel and not self.q_gain.requires_grad and eager_kernels(q):  # no gradient for the gain
            tables = ctx.rotary.cos, ctx.rotary.sin, ctx.pos
            q, k = QKNormRope.apply(q, *tables, self.q_gain.float()), QKNormRope.apply(k, *tables, None)
        else:
            q, k = ctx.rotary(rms_norm(q), ctx.pos), ctx.rotary(rms_norm(k), ctx.pos)
            q = q * self.q_gain.to(q.dtype)[:, None]
        y = varlen_attention(q.reshape(B * T, self.h, self.hd), k.reshape(B * T, self.kv, self.hd),
                             v.reshape(B * T, self.kv, self.hd), ctx.cu, ctx.max_len, ctx.backend).view(B, T, self.h, self.hd)
        if self.xsa_kernel and not self.xsa_alpha.requires_grad and eager_kernels(y):  # no gradient for alpha
            y = XSAGate.apply(y, v, torch.tanh(self.xsa_alpha).float(), self.gate(x))
        else:  # (the torch path keeps its order: the compiled training graph is the same as before the kernels)
            if self.xsa_alpha is not None:  # y -= tanh(alpha_h) (y . v_hat) v_hat, v_hat of the head's KV group
                vh = F.normalize(v.float(), dim=-1).repeat_interleave(self.h // self.kv, 2).to(y.dtype)
                y = y - torch.tanh(self.xsa_alpha).to(y.dtype)[:, None] * (y * vh).sum(-1, keepdim=True) * vh
            y = y * self.gate(x)[..., None]
        return lora_linears((self.o,), y.reshape(B, T, self.h * self.hd), (ad.get("o"),), self.eager)[0]


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.up = nn.Linear(cfg.model_dim, cfg.mlp_mult * cfg.model_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_mult * cfg.model_dim, cfg.model_dim, bias=False)
        self.slope, self.eager = cfg.leaky_slope, cfg.eager_kernels

    def forward(self, x, ad):
        u = self.up(x)
        h = LeakySq.apply(u, self.slope) if self.eager and eager_kernels(u) else F.leaky_relu(u, self.slope).square()
        return lora_linears((self.down,), h, (ad.get("mlp"),), self.eager)[0]


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        d = cfg.model_dim
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        # a buffer, not a float: one compiled block graph then serves every layer
        self.register_buffer("ln_scale", torch.tensor(1.0 / math.sqrt(layer + 1)), persistent=False)
        self.ln_scale_f = float(self.ln_scale)  # the same fp32 value as a Python float, for eager calls
        self.parallel, self.eager = layer >= cfg.parallel_start, cfg.eager_kernels
        if self.parallel:  # lane_k = r_k * lane_k + p_k0 * attn_out + p_k1 * mlp_out
            self.lane_r = nn.Parameter(torch.full((2,), 1.1))
            self.lane_p = nn.Parameter(torch.ones(2, 2))

    def norm(self, x):  # rms_norm(x) * ln_scale, the product rounded once as with a Python float
        if torch.compiler.is_compiling() or self.ln_scale.dtype != torch.float32:  # a tensor: one compiled block graph
            # serves every layer (and a model cast to another dtype rounds the scale as before)
            return (rms_norm(x).float() * self.ln_scale).to(x.dtype)
        return rms_norm(x) * self.ln_scale_f  # eager (TTT): the same numbers, one kernel instead of three

    def mix(self, xs, ws, norm=False):
        """sum_i w_i * xs[i]; each ws[i] None (1), a tensor or (tensor, index), in the activations' dtype. norm: also
        self.norm(sum), or None where the caller takes it (self.normed). Eagerly, weights without gradient (TTT): one
        Triton pass, norm included. Otherwise (training, the compiled graphs): the torch terms, in the order of the
        expressions they replace, so that the compiled training graph is node for node the one without the kernels."""
        pick = lambda w: w[0][w[1]] if isinstance(w, tuple) else w
        if self.eager and not self.resid_mix.requires_grad and eager_kernels(xs[0]):
            return MixNorm.apply(self.ln_scale_f if norm else None, tuple(map(pick, ws)), *xs)
        y = None
        for x, w in zip(xs, ws):
            t = x if w is None else pick(w) * x
            y = t if y is None else y + t
        return (y, None) if norm else y

    def normed(self, x, h):  # h: mix's norm of x, or None
        return self.norm(x) if h is None else h

    def forward(self, lanes, x0, ctx, ad):
        dt = x0.dtype
        m = self.resid_mix.to(dt)
        x_in, h = self.mix([lanes[0], x0], [(m, 0), (m, 1)], norm=True)
        sa = self.attn_scale.to(dt)
        y = self.attn(self.normed(x_in, h), ctx, ad)
        if not self.parallel:
            x, h = self.mix([x_in, y], [None, sa], norm=True)
            sm = self.mlp_scale.to(dt)
            return [self.mix([x, self.mlp(self.normed(x, h), ad)], [None, sm])]
        a = sa * y
        src = lanes[1] if len(lanes) > 1 else lanes[0]
        f = self.mlp_scale.to(dt) * self.mlp(self.norm(src), ad)
        r, p = self.lane_r.to(dt), self.lane_p.to(dt)
        return [self.mix([x_in, a, f], [(r, 0), (p, (0, 0)), (p, (0, 1))]),
                self.mix([src, a, f], [(r, 1), (p, (1, 0)), (p, (1, 1))])]


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
        d, L = cfg.model_dim, cfg.num_layers  # shapes checked by Config
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
        self.block_fns = None  # training: compiled callables standing in for self.blocks (COMPILE_SCOPE=blocks)
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

    def hidden(self, ids, cu, max_len, adapters=None, sel=None):
        """Final normalized hidden states (B, T, d), or (B, K, d) at the positions sel (B, K). ids: (B, T); cu:
        cu_seqlens over the flattened B*T tokens."""
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
            lanes = (self.block_fns or self.blocks)[li](lanes, x0, ctx, {k: v[li] for k, v in ad.items() if k != "head"})
            if i < n_enc:
                skips.append(lanes[0])
        h = lanes[0] if len(lanes) == 1 else 0.5 * (lanes[0] + lanes[1])
        if sel is not None:
            h = h.gather(1, sel[..., None].expand(-1, -1, h.shape[-1]))
        return rms_norm(h)

    def logits(self, h, adapters=None):
        """Raw (uncapped) logits h @ E^T (+ LoRA on the head)."""
        z = F.linear(h, self.embed.weight.to(h.dtype))
        if adapters and "head" in adapters:
            A, Bm = adapters["head"]
            z = torch.baddbmm(z, torch.bmm(h, A.to(h.dtype)), Bm.to(h.dtype))
        return z

    def capped(self, z):
        if self.cfg.asym_softcap:
            return softcap_logits(z.float(), self.cap_pos, self.cap_neg)
        return softcap_logits(z.float(), self.cfg.logit_softcap)

    def forward(self, ids, targets, cu, max_len, adapters=None, fused_ce=False, sel=None):
        """Per-token NLL (B, T) in nats; with sel (B, K), only at those positions (targets (B, K))."""
        z = self.logits(self.hidden(ids, cu, max_len, adapters, sel), adapters)
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
            torch._foreach_mul_(ps, 1 - self.lr * self.cfg.muon_wd)  # one launch per group, not two per matrix
            torch._foreach_add_(ps, u[:len(ps)].to(ps[0].dtype).unbind(0), alpha=-self.lr)

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


def compile_blocks(model, backend="inductor"):
    """One compiled callable per block. They share Block.forward's code, so one graph per block kind (serial, first
    parallel, later parallel; inputs with or without grad) serves every layer, hence the higher recompile limits."""
    for k in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, k):
            setattr(torch._dynamo.config, k, max(getattr(torch._dynamo.config, k), 64))
    return [torch.compile(b, dynamic=False, backend=backend) for b in model.blocks]


def cache_counts(since=None):
    """Graph lookups in torch.compile's on-disk caches (AOTAutograd's, then inductor's FX graph cache) by outcome, so
    far or since an earlier count: the warm-up log shows whether a compile loaded the helper's entries."""
    c = torch._dynamo.utils.counters
    n = {f"{name} {w}": c[group][f"{key}_{w}"] for name, group, key in (
        ("AOTAutograd", "aot_autograd", "autograd_cache"), ("FX graph", "inductor", "fxgraph_cache")) for w in ("hit", "miss", "bypass")}
    return {k: v - since[k] for k, v in n.items()} if since else n


def start_compile_helper(cfg, rt, attn):
    """`python train_gpt.py compile-helper GPU ATTN` in the background, with this process's settings, GPU and training
    attention backend ATTN (picked here, so the helper skips the self-check): one per rank, because the inductor cache
    keys hold the device index. Started once the backend is known, so that its own set-up overlaps this one's."""
    import torch._inductor.config
    if not (cfg.compile and cfg.compile_scope == "model" and cfg.compile_helper and rt.device.type == "cuda"
            and cfg.warmup_steps > 0 and torch._inductor.config.fx_graph_cache):
        return None  # without the FX graph cache it would only cost memory
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "compile-helper", str(rt.local_rank), attn],
                            stdout=log, stderr=log)
    proc.log, proc.t0 = log, time.perf_counter() - PROCESS_START
    atexit.register(lambda: proc.poll() is None and proc.kill())  # the run ended early: no orphan
    return proc


def join_compile_helper(proc, rt, timeout=900):
    """Wait for the helper; returns its own timing line (set-up, compile), or None if it failed (then this process
    compiles the graph itself: slower start-up, same training)."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.seek(0)
    lines = proc.log.read().decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        rt.log(f"warning: the compile helper failed (exit {proc.returncode}): {' | '.join(lines[-3:])[-400:]}; "
               f"compiling here instead (COMPILE_HELPER=0 skips the helper)")
        return None
    done = [x[len("compile helper: "):] for x in lines if x.startswith("compile helper: ")]
    return "; ".join([f"started {proc.t0:.1f}s after process start"] + done[-1:])


def compile_helper(gpu, attn=None, backend="inductor"):
    """The helper's work; only the compile cache it writes is used: the loop-off training graph of this
    configuration with attention backend attn (default: ATTN_BACKEND's choice), compiled by one forward and backward
    of a synthetic micro-batch of the real shapes (micro_loss, as in training). Without a GPU (tests) on the CPU."""
    cfg = Config()
    device = torch.device("cuda", gpu) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":  # a share of the GPU: out of memory, the helper fails, never the run beside it
        torch.cuda.set_device(device)
        torch.cuda.set_per_process_memory_fraction(0.4, device)
    rt = Runtime(0, int(os.environ.get("WORLD_SIZE", "1")), gpu, device, False)
    setup_torch(rt)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    model.attn_backend = pick_attention(attn or cfg.attn_backend, device, True, attention_heads(cfg), lambda m: None)
    n = cfg.train_batch_tokens // (rt.world * grad_accum(cfg, rt))
    x = torch.randint(0, cfg.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(0)).numpy()
    x[::997] = BOS_ID
    t1 = time.perf_counter()
    micro_loss(torch.compile(model, dynamic=False, backend=backend), packed_batch(x[:-1], x[1:], cfg.train_seq_len, device),
               cfg, fused_ce_on(cfg, device)).backward()
    sync(device)
    print(f"compile helper: set-up {t1 - PROCESS_START:.1f}s (imports included), compile + 1 step "
          f"{time.perf_counter() - t1:.1f}s", flush=True)


def fused_ce_on(cfg, device):
    return cfg.fused_ce and device.type == "cuda" and HAVE_TRITON


def micro_loss(loss_fn, batch, cfg, fused_ce):
    """Mean loss of one packed micro-batch (x, y, cu) through the (compiled) model: the call every compiled training
    graph comes from."""
    x, y, cu = batch
    with autocast(x.device):
        return loss_fn(x[None], y[None], cu, cfg.train_seq_len, fused_ce=fused_ce).mean()


def grad_accum(cfg, rt):  # micro-batches per step and rank: 1, 2, 4 or 8 GPUs train the same global batch
    return cfg.grad_accum_steps or max(1, 8 // rt.world)


class Trainer:
    def __init__(self, cfg, rt, model, helper=None):
        self.cfg, self.rt, self.model, self.helper = cfg, rt, model, helper  # helper: start_compile_helper's process
        self.accum = grad_accum(cfg, rt)
        self.loader = TrainLoader(cfg, rt, self.accum)
        self.muon, self.adam = build_optimizers(model, cfg, rt)
        self.adam_params = [p for g in self.adam.param_groups for p in g["params"]]
        self.loss_fn, self.block_fns = model, None
        if cfg.compile and rt.device.type == "cuda":
            if cfg.compile_scope == "model":
                self.loss_fn = torch.compile(model, dynamic=False)
            elif cfg.compile_scope == "blocks":  # the modules stay eager for calibration and evaluation
                self.block_fns = compile_blocks(model)
            else:
                raise SystemExit(f"error: COMPILE_SCOPE={cfg.compile_scope!r}; use blocks or model")
        # the wallclock stop needs one agreed clock; a CPU group agrees without waiting for the GPU queue
        self.clock_group = dist.new_group(backend="gloo") if rt.world > 1 else None
        self.fused_ce = fused_ce_on(cfg, rt.device)
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
        for batch in self.loader.next_step():
            loss = micro_loss(self.loss_fn, batch, cfg, self.fused_ce)
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
            norms = lambda ts: torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32)).square().sum()
            grads = [p.grad for p in self.adam_params]  # multi-tensor kernels: a few launches, not three per tensor
            sq = all_reduce_(norms(shards)) + norms(grads)
            clip = torch.clamp(cfg.grad_clip_norm / (sq.sqrt() + 1e-6), max=1.0)
            torch._foreach_mul_(grads, clip)
        self.muon.step(shards, clip)
        self.adam.step()
        model.zero_grad(set_to_none=True)
        if self.ema is not None:  # EMA with the usual warm-up, so short runs average recent weights only
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach().float() for p in model.parameters()], 1 - d)
        return total

    def warmup(self):
        """Compile both loop settings, the looping graph first while a helper process compiles the other into the
        inductor cache (COMPILE_HELPER); every trace of these steps (weights, optimizer, data position) is undone."""
        cfg, rt = self.cfg, self.rt
        if cfg.warmup_steps <= 0:
            return
        saved = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.adam.state_dict()),
                 self.muon.state_dict(), self.loader.stream.state())
        for looping in (True, False):
            if not looping and cfg.eager_kernels and (cfg.quantize or cfg.ttt_mode != "off"):
                t, fns = time.perf_counter(), self.model.block_fns  # Triton builds the eager forward kernels (GPTQ
                self.model.block_fns = None  # calibration, TTT) off the clocks, while the helper may still compile
                with frozen(self.model), torch.no_grad(), autocast(rt.device):
                    x, _, cu = next(iter(self.loader.next_step()))
                    self.model.hidden(x[None], cu, cfg.train_seq_len)
                self.model.block_fns = fns
                sync(rt.device)
                rt.log(f"warm-up: one forward with frozen weights (builds the eager kernels) in {time.perf_counter() - t:.1f}s")
            t = time.perf_counter()
            if not looping and self.helper is not None:  # the helper's cache entries are written: this compile loads them
                info = join_compile_helper(self.helper, rt)
                rt.log(f"warm-up: waited {time.perf_counter() - t:.1f}s for the compile helper" + (f" ({info})" if info else ""))
            t, counts = time.perf_counter(), cache_counts()
            fresh_kernel_side_table()
            self.model.looping = looping
            for s in range(cfg.warmup_steps):
                self.train_step(s, 0.0)
            sync(rt.device)
            compiled = self.loss_fn is not self.model or self.block_fns is not None
            caches = ", ".join(f"{k} {v}" for k, v in cache_counts(counts).items() if v) or "not used"
            rt.log(f"warm-up, looping {'on' if looping else 'off'}: {'compile + ' * compiled}{cfg.warmup_steps} steps in "
                   f"{time.perf_counter() - t:.1f}s" + compiled * f" (compile caches: {caches})")
        self.model.load_state_dict(saved[0]); self.adam.load_state_dict(saved[1])
        self.muon.load_state_dict(saved[2]); self.loader.stream.restore(saved[3])
        self.model.looping = False
        self.model.zero_grad(set_to_none=True)

    def run(self, summary):
        cfg, rt, model = self.cfg, self.rt, self.model
        t_start = time.perf_counter()
        model.block_fns = self.block_fns
        self.warmup()
        sync(rt.device)
        rt.log(f"warm-up done in {time.perf_counter() - t_start:.1f}s (time to step 1 since process start: "
               f"{time.perf_counter() - PROCESS_START:.1f}s, of it set-up before warm-up {t_start - PROCESS_START:.1f}s)")
        summary["startup_s"] = round(time.perf_counter() - PROCESS_START, 2)
        if cfg.ema_decay > 0:
            self.ema = [p.detach().float().clone() for p in model.parameters()]
        budget, cuda = self.budget(), rt.device.type == "cuda"
        logged = lambda s: s <= 5 or s % cfg.train_log_every == 0 or s == cfg.iterations
        clock = dict(elapsed=0.0, dt=0.0, done=time.perf_counter(), log_el=0.0, log_step=0)
        tok_phase, pending = {False: [0, 0.0], True: [0, 0.0]}, []  # pending: (step, looping, event, loss, frac)
        t0 = clock["done"]

        def retire(keep):
            """Wait until at most `keep` steps are in flight; read the clock and log as each is seen finished."""
            while len(pending) > keep:
                s_done, lp, ev, loss, fr = pending.pop(0)
                if ev is not None:
                    ev.synchronize()
                now = time.perf_counter()
                t = torch.tensor([now - t0, now - clock["done"]], dtype=torch.float64)
                if budget and self.clock_group is not None:  # every rank runs on the slowest clock
                    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.clock_group)
                clock.update(elapsed=float(t[0]), dt=float(t[1]), done=now)
                tok_phase[lp][0] += cfg.train_batch_tokens; tok_phase[lp][1] += clock["dt"]
                if logged(s_done):
                    lv, el = float(loss), clock["elapsed"]
                    if not math.isfinite(lv):
                        raise SystemExit(f"error: training loss is {lv} at step {s_done}; lower the learning rates")
                    eta = (budget - el) if budget else el / s_done * (cfg.iterations - s_done)
                    # the rate over the steps since the last log line: a single step's dt is wrong when the CPU, not
                    # the GPU, is the bottleneck (its enqueue time is then booked on the step before)
                    tps = (s_done - clock["log_step"]) * cfg.train_batch_tokens / max(el - clock["log_el"], 1e-9)
                    clock.update(log_el=el, log_step=s_done)
                    rt.log(f"step {s_done} loss {lv:.4f} tok/s {tps:,.0f} "
                           f"elapsed {el:.1f}s eta {max(0.0, eta):.1f}s lr_mult {lr_multiplier(fr, cfg):.3f}")

        step = 0
        while True:
            # one step stays in flight on the GPU while the next is enqueued; the schedule runs on the time
            # at which the queued steps will be done
            frac = self.progress(step, clock["elapsed"] + clock["dt"] * len(pending))
            if step >= cfg.iterations or (budget and frac >= 1.0):
                break
            looping = cfg.num_loops > 0 and frac >= cfg.loop_start_frac
            if looping != model.looping:
                model.looping = looping
                rt.log(f"step {step}: depth recurrence on (layers {cfg.loop_start}-{cfg.loop_end} x{cfg.num_loops + 1})")
            loss = self.train_step(step, frac)
            step += 1
            ev = torch.cuda.Event() if cuda else None
            if ev is not None:
                ev.record()
            pending.append((step, looping, ev, loss, frac))
            retire(1 if cuda and not logged(step) else 0)
        retire(0)
        sync(rt.device)
        model.block_fns = None
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
        stats['rel'][name] = _rel(E, W)
        if cat != 'gate':
            errs[name] = float(E.norm())
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


def gram(x):
    """(X^T X in fp32, rows) of x (..., d). On CUDA under autocast X is what a Linear multiplies (the autocast dtype),
    multiplied on tensor cores into fp32 (products of bf16 values are exact in fp32, as in an fp32 GEMM)."""
    x = x.detach().reshape(-1, x.shape[-1])
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32), x.shape[0]
        except (TypeError, RuntimeError):  # a torch without mm's out_dtype
            pass
    x = x.float()
    return x.T @ x, x.shape[0]


class HessianHook:
    """Accumulates H += X^T X (fp32) and the row count for every call of each module (depth
    recurrence adds every pass). Keys are '<module name>.weight'. `add` also serves functional
    uses (the tied LM head: add('embed.weight', final_hidden)). Modules called on the same input tensor one after
    the other (q, k, v) share one product. Sum H and n over ranks if needed."""

    def __init__(self, named_modules):
        self.H, self.n, self._handles, self._last = {}, {}, [], (None, -1, None)
        for mname, m in named_modules:
            w = getattr(m, 'weight', None)
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                key = mname + '.weight'
                self._handles.append(m.register_forward_hook(lambda mod, inp, out, k=key: self.add(k, inp[0])))

    @torch.no_grad()
    def add(self, key, x):
        if self._last[0] is not x or self._last[1] != x._version:  # (the same tensor, not written to since)
            self._last = (x, x._version, gram(x))
        xtx, rows = self._last[2]
        if key not in self.H:
            self.H[key] = torch.zeros_like(xtx)
            self.n[key] = 0
        self.H[key] += xtx
        self.n[key] += rows

    def hessians(self):
        return {k: H / max(self.n[k], 1) for k, H in self.H.items()}

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles, self._last = [], (None, -1, None)


# ---------------------------------------------------------------------------
# Artifact codec: self-describing container for a quantized state dict.
#   blob = MAGIC | crc32(rest) u32 | header_len u32 | header | body
#   header = brotli(JSON tensor list + b"\n" + one byte-code per frequency-table entry)
#   body = raw-stream tail | rANS words (u16 LE) | rANS final lane states (u32 LE)
# Small-alphabet integer tensors (quantized weights) are entropy coded with a
# static-table rANS coder run over many interleaved lanes (vectorized in numpy);
# each tensor may split its columns (or rows) into K buckets by variance, with one
# frequency table per bucket. Everything else (floats, wide ints, tiny tensors)
# goes byte-plane split through brotli-11 or lzma (whichever is smaller); the
# first 2 bytes per lane of that stream ride inside the rANS initial states.
# ---------------------------------------------------------------------------
CODEC_MAGIC = b"PGQ1"
CODEC_DTYPES = {str(d)[6:]: d for d in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
                                         torch.float16, torch.bfloat16, torch.float32, torch.float64)}
RANS_PB = 15  # frequency-table precision (tables sum to 2**RANS_PB)
RANS_LOW = 1 << 16  # lane state lives in [2**16, 2**32); renormalize 16 bits at a time
RANS_LANES = 2048  # max interleaved lanes
RANS_MIN_NUMEL = 1024  # smaller integer tensors go to the byte stream
CODEC_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
CODEC_BYTE_CODERS = {  # method -> (compress, decompress) for the raw byte stream; smallest wins
    "b": (lambda r: brotli.compress(r, quality=11, lgwin=24), lambda z: brotli.decompress(z)),
    "x": (lambda r: lzma.compress(r, format=lzma.FORMAT_RAW, filters=CODEC_LZMA),
          lambda z: lzma.decompress(z, format=lzma.FORMAT_RAW, filters=CODEC_LZMA))}


def _codec_entropy_bits(counts):
    """Shannon bits of each row of a count matrix, summed."""
    c = np.asarray(counts, np.float64).reshape(-1, np.shape(counts)[-1])
    tot = c.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nansum(c * np.log2(tot / c)))


def rans_normalize(counts):
    """Frequencies summing to 2**RANS_PB (>=1 where count>0) plus their one-byte codes: every entry
    but the largest keeps <=5 significant bits (code = 16*e + (f >> e)); the largest (code 255) is
    the remainder, so a table costs ~1 byte per entry before brotli."""
    c, m = np.asarray(counts, np.float64), 1 << RANS_PB
    i = int(np.argmax(c))
    for rnd in (np.round, np.floor):  # nearest first; floor always leaves room for the largest
        f = np.where(c > 0, np.maximum(1, rnd(c * m / c.sum())), 0)
        e = np.maximum(0, np.frexp(f)[1] - 5)
        f = (rnd(f / 2.0 ** e) * 2.0 ** e).astype(np.int64)
        f[i] = 0
        f[i] = m - f.sum()
        if f[i] >= 1:
            e = np.maximum(0, np.frexp(f)[1] - 5)
            codes = 16 * e + (f >> e)
            codes[i] = 255
            return f, codes.tolist()
    raise AssertionError("unreachable")


def rans_table(codes):
    """Decode one-byte table codes (see rans_normalize) into frequencies summing to 2**RANS_PB."""
    codes = np.array(list(codes), np.int64)
    e = np.maximum(0, codes // 16 - 1)
    f = (codes - 16 * e) << e
    rem = codes == 255
    f[rem] = (1 << RANS_PB) - f[~rem].sum()
    if rem.sum() != 1 or f.min() < 0 or f[rem][0] < 1:
        raise ValueError("codec: bad frequency table (corrupt artifact)")
    return f


def rans_encode(F, C, n_lanes, x0):
    """Encode symbols given per-symbol freq F and cumfreq C (uint32 arrays).
    Symbol i goes to lane i % n_lanes. Returns (u16 words, u32 final states)."""
    n = F.size
    x = x0.astype(np.uint32).copy()
    steps = -(-n // n_lanes) if n else 0
    chunks = [None] * steps
    for t in range(steps - 1, -1, -1):
        a = t * n_lanes
        xs, f = x[: min(n_lanes, n - a)], F[a: a + n_lanes]
        m = (xs >> (32 - RANS_PB)) >= f  # i.e. xs >= f << (32-pb): must emit 16 bits first
        chunks[t] = (xs[m] & 0xFFFF).astype(np.uint16)
        xs[m] >>= 16
        q, r = np.divmod(xs, f)
        xs[:] = (q << RANS_PB) + r + C[a: a + n_lanes]
    words = np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)
    return words, x


def rans_decode(words, x, base, tabs, n):
    """Inverse of rans_encode. base[i] = table_id << RANS_PB for symbol i; tabs = list of
    normalized freq arrays. Returns (uint8 symbols, final lane states)."""
    sym_lut = np.concatenate([np.repeat(np.arange(f.size, dtype=np.uint8), f) for f in tabs])
    # uint16 tables (f <= 2**15, slot - cumfreq < 2**15): half the bytes of the random gathers that dominate decoding
    f_lut = np.concatenate([f[np.repeat(np.arange(f.size), f)] for f in tabs]).astype(np.uint16)
    b_lut = np.concatenate([np.arange(1 << RANS_PB) - np.repeat(np.cumsum(f) - f, f)
                            for f in tabs]).astype(np.uint16)  # slot - cumfreq(sym)
    x, n_lanes, out, p = x.copy(), x.size, np.empty(n, np.uint8), 0
    mask = np.uint32((1 << RANS_PB) - 1)
    for a in range(0, n, max(n_lanes, 1)):
        xs = x[: min(n_lanes, n - a)]
        k = base[a: a + n_lanes] + (xs & mask)
        out[a: a + n_lanes] = sym_lut[k]
        xs[:] = f_lut[k] * (xs >> RANS_PB) + b_lut[k]  # uint16 * uint32 -> uint32
        m = xs < RANS_LOW
        cnt = int(np.count_nonzero(m))
        if p + cnt > words.size:
            raise ValueError("codec: rANS stream exhausted (corrupt blob)")
        xs[m] = (xs[m] << 16) | words[p: p + cnt]
        p += cnt
    if p != words.size:
        raise ValueError("codec: rANS stream has trailing words (corrupt blob)")
    return out, x


def _codec_axis_buckets(s2, alpha, ks=(1, 2, 4, 8)):
    """Split the columns of s2 into K buckets by column-variance rank, K minimizing estimated
    bits (entropy + ~10 bits per used table entry + log2 K per column). Returns (bits, ids, counts[K, alpha])."""
    rows, cols = s2.shape
    best, order = None, None
    for k in ks:
        if k > 1 and (rows < 64 or cols < 4 * k):
            break
        b = np.zeros(cols, np.uint8)
        if k > 1:
            if order is None:
                v = s2.astype(np.float32)
                order = np.argsort(((v - v.mean()) ** 2).mean(0), kind="stable")
            b[order] = np.arange(cols) * k // cols
        cnt = np.bincount((b.astype(np.int64) * alpha + s2).ravel(), minlength=k * alpha).reshape(k, alpha)
        bits = _codec_entropy_bits(cnt) + 10 * np.count_nonzero(cnt) + cols * math.log2(k)
        if best is None or bits < best[0]:
            best = (bits, b, cnt)
    return best


def _codec_planes(arrs):
    """Byte-plane interleave: plane k of every array with itemsize > k, k = 0, 1, ..."""
    out = []
    for k in range(max([a.shape[1] for a in arrs], default=0)):
        out += [a[:, k] for a in arrs if a.shape[1] > k]
    return np.concatenate(out).tobytes() if out else b""


def _codec_unplanes(buf, sizes):
    """Inverse of _codec_planes given (numel, itemsize) per array; returns list of uint8 arrays."""
    arrs = [np.empty((n, w), np.uint8) for n, w in sizes]
    src, p = np.frombuffer(buf, np.uint8), 0
    for k in range(max([w for _, w in sizes], default=0)):
        for a in arrs:
            if a.shape[1] > k:
                a[:, k] = src[p: p + a.shape[0]]
                p += a.shape[0]
    if p != src.size:
        raise ValueError("codec: raw stream size mismatch (corrupt blob)")
    return arrs


def pack_state(tensors):
    """Serialize {name: tensor} into a compressed, checksummed artifact (bytes)."""
    metas, raws, tabs, f_parts, c_parts = [], [], [], [], []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        dt = str(t.dtype)[6:]
        if dt not in CODEC_DTYPES:
            raise TypeError(f"codec: unsupported dtype {t.dtype} for {name!r}")
        meta = {"n": name, "d": dt, "s": list(t.shape)}
        metas.append(meta)
        if not t.is_floating_point() and t.numel() >= RANS_MIN_NUMEL:
            a = t.numpy().reshape(-1).astype(np.int64)
            lo, hi = int(a.min()), int(a.max())
            if hi - lo < 256:
                s2 = (a - lo).astype(np.uint8).reshape(-1, t.shape[-1] if t.dim() > 1 else a.size)
                # one table per bucket of columns ("c") or of rows ("r"), whichever codes smaller
                cands = [(*_codec_axis_buckets(s2, hi - lo + 1), "c"), (*_codec_axis_buckets(s2.T, hi - lo + 1), "r")]
                _, b, cnt, ax = min(cands, key=lambda c: c[0])
                ft, codes = zip(*[rans_normalize(c) for c in cnt])
                ft = np.stack(ft).astype(np.uint32)
                meta.update(lo=lo, a=hi - lo + 1, b="".join(map(str, b)) if len(cnt) > 1 else "", ax=ax)
                tabs += codes
                b = b[None, :] if ax == "c" else b[:, None]
                f_parts.append(ft[b, s2].ravel())
                c_parts.append((np.cumsum(ft, 1) - ft)[b, s2].ravel())
                continue
        raws.append(t.reshape(-1).view(torch.uint8).numpy().reshape(t.numel(), t.element_size()))
    raw = _codec_planes(raws)
    method, zraw = min(((k, c(raw)) for k, (c, _) in CODEC_BYTE_CODERS.items()), key=lambda c: len(c[1]))
    n_sym = sum(p.size for p in f_parts)
    lanes = max(1, min(RANS_LANES, n_sym // 4096)) if n_sym else 0
    side = np.frombuffer(zraw[: 2 * lanes].ljust(2 * lanes, b"\0"), ">u2")
    F = np.concatenate(f_parts) if f_parts else np.zeros(0, np.uint32)
    C = np.concatenate(c_parts) if c_parts else np.zeros(0, np.uint32)
    words, states = rans_encode(F, C, lanes, RANS_LOW + side.astype(np.uint32))
    body = zraw[2 * lanes:] + words.astype("<u2").tobytes() + states.astype("<u4").tobytes()
    head = {"v": 1, "m": method, "z": len(zraw), "w": int(words.size), "L": lanes, "t": metas}
    head = json.dumps(head, separators=(",", ":")).encode() + b"\n" + bytes(c for t in tabs for c in t)
    hz = brotli.compress(head, quality=11)
    rest = struct.pack("<I", len(hz)) + hz + body
    return CODEC_MAGIC + struct.pack("<I", zlib.crc32(rest)) + rest


def unpack_state(blob):
    """Inverse of pack_state: returns {name: tensor} bit-exactly. Raises ValueError on corruption."""
    blob = bytes(blob)
    if len(blob) < 12 or blob[:4] != CODEC_MAGIC:
        raise ValueError("codec: not a PGQ1 artifact (bad magic or too short)")
    if zlib.crc32(blob[8:]) != struct.unpack("<I", blob[4:8])[0]:
        raise ValueError("codec: checksum mismatch (corrupt or truncated artifact)")
    (hlen,) = struct.unpack("<I", blob[8:12])
    head, tab_codes = brotli.decompress(blob[12: 12 + hlen]).split(b"\n", 1)
    head = json.loads(head)
    if head.get("v") != 1:
        raise ValueError(f"codec: unsupported artifact version {head.get('v')}")
    lanes, nw, nz = head["L"], head["w"], head["z"]
    body = blob[12 + hlen:]
    tail = nz - min(nz, 2 * lanes)
    if len(body) != tail + 2 * nw + 4 * lanes:
        raise ValueError("codec: body length mismatch (corrupt artifact)")
    words = np.frombuffer(body, "<u2", nw, tail).astype(np.uint16)
    states = np.frombuffer(body, "<u4", lanes, tail + 2 * nw).astype(np.uint32)
    tabs, bases, q = [], [], 0
    for m in head["t"]:
        if "lo" in m:
            t0 = len(tabs)
            for _ in range(max(m["b"].encode(), default=48) - 47):  # K tables of m["a"] one-byte codes
                tabs.append(rans_table(tab_codes[q: q + m["a"]]))
                q += m["a"]
            cols = m["s"][-1] if len(m["s"]) > 1 else math.prod(m["s"])
            b = np.frombuffer(m["b"].encode(), np.uint8).astype(np.uint32) - 48 if m["b"] else np.zeros(1, np.uint32)
            b = b[None, :] if m["ax"] == "c" else b[:, None]
            bases.append((np.broadcast_to(t0 + b, (math.prod(m["s"]) // cols, cols)) << RANS_PB).ravel())
    if q != len(tab_codes):
        raise ValueError("codec: frequency table size mismatch (corrupt artifact)")
    base = np.concatenate(bases) if bases else np.zeros(0, np.uint32)
    syms, xf = rans_decode(words, states, base, tabs, base.size) if base.size else (base.astype(np.uint8), states)
    if np.any(xf - RANS_LOW >= 1 << 16):
        raise ValueError("codec: rANS final state check failed (corrupt artifact)")
    zraw = xf.astype(">u2").tobytes()[: min(nz, 2 * lanes)] + body[:tail]
    sizes = [(math.prod(m["s"]), CODEC_DTYPES[m["d"]].itemsize) for m in head["t"] if "lo" not in m]
    raws = iter(_codec_unplanes(CODEC_BYTE_CODERS[head["m"]][1](zraw), sizes))
    out, p = {}, 0
    for m in head["t"]:
        dt, n = CODEC_DTYPES[m["d"]], math.prod(m["s"])
        if "lo" in m:
            v = syms[p: p + n].astype(m["d"]) + np.array(m["lo"]).astype(m["d"])  # exact mod 2**bits
            p += n
            out[m["n"]] = torch.from_numpy(v).reshape(m["s"])
        else:
            out[m["n"]] = torch.from_numpy(next(raws).reshape(-1)).view(dt).reshape(m["s"])
    return out


def quant_spec(cfg, widen=1.0):
    """QuantSpec from the config; `widen` multiplies every SDClip k (coarser grid, fewer bytes)."""
    k = {"mlp": cfg.clip_k_mlp, "attn": cfg.clip_k_attn, "other": cfg.clip_k_other, "embed": cfg.clip_k_embed}
    return QuantSpec(clip={c: v * widen for c, v in k.items()},
                     qmax=2 ** (cfg.matrix_bits - 1) - 1, qmax_embed=2 ** (cfg.embed_bits - 1) - 1, awq=cfg.awq_lite,
                     lqer_top_k=cfg.lqer_top_k, lqer_rank=cfg.lqer_rank, block=cfg.gptq_block, damp=cfg.gptq_damp,
                     small_numel=cfg.quant_small_numel)


@torch.no_grad()
def collect_hessians(model, loader, cfg, rt, deadline):
    """H = X^T X / n of every Linear input (every looped pass) and of the final hidden state (tied head), from up to
    GPTQ_CALIB_BATCHES training batches, stopping before a batch that would end past the training deadline (at least
    one batch is always taken)."""
    hook = HessianHook([(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    n_done, t0 = 0, time.perf_counter()
    with frozen(model):  # forwards only: with frozen weights the eager kernels serve them
        try:
            for b in range(cfg.gptq_calib_batches):
                for x, y, cu in loader.next_step():
                    with autocast(rt.device):
                        hook.add("embed.weight", model.hidden(x[None], cu, cfg.train_seq_len))
                n_done += 1
                sync(rt.device)
                now = time.perf_counter()
                stop = torch.tensor([float(now + (now - t0) / n_done >= deadline)], device=rt.device)
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
    missing = (set(sd) ^ set(deq)) | {k for k in set(sd) & set(deq) if sd[k].shape != deq[k].shape}
    if missing:
        raise SystemExit(f"error: the artifact does not match this model configuration (tensors {sorted(missing)[:4]}...); "
                         f"evaluate with the settings it was trained with")
    model.load_state_dict({k: deq[k].to(sd[k].dtype) for k in sd})
    return model


def strip_source(src: str):
    """The source without comments and docstrings (the standard library's ast): python-minifier's stand-in."""
    tree = ast.parse(src)
    for n in ast.walk(tree):
        if (isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant) and isinstance(n.body[0].value.value, str)):
            n.body = n.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def wrap_code(src: str):
    """The code as it would be submitted: minified (python-minifier if installed, else strip_source), brotli, base85,
    exec stub. linecache gets the source so Triton's @jit (inspect.getsource) still works. Returns (bytes, method)."""
    method = "python-minifier + brotli + base85"
    try:
        import python_minifier
        src = python_minifier.minify(src, remove_annotations=False, remove_literal_statements=True, rename_globals=False,
                                     hoist_literals=False)
    except ImportError:  # about 4 KB more than python-minifier (local names kept)
        src, method = strip_source(src), "comments and docstrings stripped (python-minifier missing) + brotli + base85"
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
    segments are the rows, so no row sees another (cu_seqlens). Optional, on the scored distribution only: a static
    logit calibration `calib` = (scale, per-token bias) and n-gram tilt `hints` (per target position, -1 = none)."""

    def __init__(self, model, tokens, nbytes, device, fused_ce=False, calib=None, hints=None, boost=2.625):
        self.model, self.device, self.fused_ce = model, device, fused_ce
        self.tokens = torch.from_numpy(tokens).to(device)
        self.nbytes = torch.from_numpy(nbytes).to(device)
        self.calib, self.hints, self.boost = calib, hints, boost

    def batch(self, rows, L=None, meta=None, K=None):
        """Rows right-padded to length L (default: the longest) -> (inputs (B, L), cu, L, then at K positions per row
        from the row's first scored one (default: enough for every row; all L positions: sel None): targets, scored
        mask, target bytes, target stream positions, input positions sel (B, K)). Only scored positions need logits,
        so the LM head runs on K = TTT_CHUNK of the 2,048 positions of a TTT row. meta, the rows as a (3+, B) device
        tensor (starts, lengths, first scored offsets), may stand in for rows (CUDA graphs)."""
        if meta is None:
            meta = torch.tensor([(s, e - s, f - s) for s, e, f in rows], device=self.device).T
        L, K, B, N = L or max(e - s for s, e, _ in rows), K or max(e - f for _, e, f in rows), meta.shape[1], len(self.tokens)
        ar = torch.arange(L, device=self.device)
        x = self.tokens[(meta[0][:, None] + ar[None]).clamp_max(N - 2)]
        if K >= L:
            sel, p = None, ar[None].expand(B, L)
            scored = (p < meta[1][:, None]) & (p >= meta[2][:, None])
        else:
            p = meta[2][:, None] + ar[None, :K]
            scored, sel = p < meta[1][:, None], p.clamp_max(L - 1)
            p = sel
        tpos = (meta[0][:, None] + p).clamp_max(N - 2) + 1
        cu = torch.arange(0, B * L + 1, L, device=self.device, dtype=torch.int32)
        return x, cu, L, self.tokens[tpos], scored, self.nbytes[tpos], tpos, sel

    def forward(self, rows, adapters=None, L=None, meta=None, K=None):
        """One forward: (model NLL (B, K), grads flow when enabled; scored NLL, detached; scored mask; target bytes)."""
        x, cu, L, y, scored, nb, tpos, sel = self.batch(rows, L, meta, K)
        with autocast(self.device):
            if self.calib is None and self.hints is None:
                loss = self.model(x, y, cu, L, adapters=adapters, fused_ce=self.fused_ce, sel=sel).float()
                return loss, loss.detach(), scored, nb
            z = self.model.logits(self.model.hidden(x, cu, L, adapters, sel), adapters)
        zc = self.model.capped(z)
        loss = F.cross_entropy(zc.flatten(0, 1), y.reshape(-1), reduction="none").view(y.shape)
        with torch.no_grad():
            lp = self.logprobs(zc.detach())
            nll = -lp.gather(-1, y[..., None])[..., 0]
            if self.hints is not None:  # closed form of -log p'(y), p' = logprobs(zc, hint)
                h = self.hints[tpos]
                lph = lp.gather(-1, h.clamp_min(0)[..., None])[..., 0]
                tilted = nll - self.boost * (y == h) + torch.log1p(lph.exp() * math.expm1(self.boost))
                nll = torch.where(h >= 0, tilted, nll)
        return loss, nll, scored, nb

    def nll(self, rows, adapters=None):
        return self.forward(rows, adapters)[1:]

    def logprobs(self, zc, hint=None):
        """The full scored distribution (log) over the vocabulary from capped logits: calibration, softmax, then the
        n-gram tilt p'(a) = p(a) e^{b[a=h]} / (1 + p(h)(e^b - 1)) where hint h >= 0."""
        if self.calib is not None:
            zc = self.calib[0] * zc + self.calib[1]
        lp = zc.float().log_softmax(-1)
        if hint is not None:
            on, h = hint >= 0, hint.clamp_min(0)[..., None]
            lz = torch.log1p(lp.gather(-1, h).exp() * math.expm1(self.boost))
            tilt = self.boost * F.one_hot(h[..., 0], lp.shape[-1]) - lz
            lp = lp + torch.where(on[..., None], tilt, torch.zeros_like(tilt))
        return lp


EVAL_TRACE = None  # tests: a list receiving (event, target/stream positions, values) in execution order


def _trace(event, pos, vals=None):
    if EVAL_TRACE is not None:
        EVAL_TRACE.append((event, np.asarray(pos), None if vals is None else vals.detach().cpu().numpy()))


def row_positions(rows, scored_only=True):
    """Stream positions of the targets a set of rows scores, or of every token the rows read (inputs and targets)."""
    return np.concatenate([np.arange(f + 1 if scored_only else s, e + 1) for s, e, f in rows] or [np.zeros(0, int)])


def add_scores(tot, rows, nll, scored, nb):
    """tot += (NLL, bytes, count) of the scored positions."""
    with torch.no_grad():
        tot += torch.stack([(nll * scored).sum().double(), (nb * scored).sum().double(), scored.sum().double()])
    if EVAL_TRACE is not None:
        _trace("score", row_positions(rows), nll[scored])


def row_batches(rows, batch_tokens):
    """Rows longest first, grouped so that a padded batch holds about batch_tokens tokens."""
    rows, i = sorted(rows, key=lambda r: r[0] - r[1]), 0
    while i < len(rows):
        n = max(1, batch_tokens // max(rows[i][1] - rows[i][0], 1))
        yield rows[i:i + n]
        i += n


@torch.no_grad()
def eval_windows(scorer, rows, rt, batch_tokens):
    """Sum of NLL / bytes / count over rows, split across ranks; returns (val_loss, val_bpb, tokens, bytes)."""
    tot = torch.zeros(3, device=rt.device, dtype=torch.float64)
    with frozen(scorer.model):  # scoring only: the eager kernels serve the forwards
        for chunk in row_batches(rows[rt.rank::rt.world], batch_tokens):
            add_scores(tot, chunk, *scorer.nll(chunk))
    return totals(all_reduce_(tot))


def totals(tot):
    nll, nbytes, count = (float(v) for v in tot)
    return nll / max(count, 1), nll / math.log(2) / max(nbytes, 1), int(count), int(nbytes)


def plain_rows(tokens, seq_len, limit=0):
    """Non-overlapping windows of seq_len within documents, longest first."""
    return sliding_rows(tokens, seq_len, seq_len, limit)


def span_rows(s, lo, hi, window, stride):
    """Rows scoring input positions [lo, hi) of the document starting at s, in pieces of `stride` (the first piece
    up to s + window), each with up to `window` tokens of its own document as context. stride = window: plain."""
    rows, a = [], lo
    while a < hi:
        b = min(hi, max(a + stride, s + window))
        rows.append((max(s, b - window), b, a))
        a = b
    return rows


def sliding_rows(tokens, window, stride, limit=0):
    """Each target scored once with up to `window` tokens of its own document as context."""
    rows = [r for s, e in doc_ranges(tokens[:limit + 1] if limit else tokens) for r in span_rows(s, s, e, window, stride)]
    return sorted(rows, key=lambda r: r[0] - r[1])


class NgramTilt:
    """Token-only n-gram hints (PR #2018 / #1514): hint[j] = the token that followed the hash of tokens[j-order:j]
    in >= threshold of that key's occurrences at positions < j, else -1 (a share >= 0.5 makes it the unique top
    follower). The table is built in stream order, one block at a time: a block's hints are fixed, from the earlier
    blocks and the earlier positions of the block only, before its tokens are counted."""
    MUL, PAIR = 0x5851F42D4C957F2D, 0x2545F4914F6CDD1D  # odd 64-bit hash multipliers (int64 wrap-around)

    def __init__(self, order, threshold, block=1 << 22):
        self.order, self.thr, self.block = order, threshold, block

    def hints(self, tok):
        """tok: (N,) int64 tensor -> (N,) int64 hint per target position."""
        z = lambda *s: torch.zeros(*s, dtype=torch.long, device=tok.device)
        keys = z(len(tok))
        for d in range(self.order, 0, -1):  # polynomial hash of the previous `order` tokens (0 = before the stream)
            keys = keys * self.MUL + torch.cat([z(min(d, len(tok))), tok[:max(0, len(tok) - d)] + 1])
        self.kk, self.kv, self.pk, self.pc = z(0), z(0, 3), z(0), z(0, 1)  # key -> (total, top count, top); pair -> count
        out = z(len(tok))
        for lo in range(0, len(tok), self.block):
            hi = min(len(tok), lo + self.block)
            out[lo:hi] = self.run_block(keys[lo:hi], tok[lo:hi], np.arange(lo, hi))
        return out

    def run_block(self, K, Fv, pos):
        hint, delta = self.predict(K, Fv)
        _trace("ngram_hint", pos)
        self.count(*delta)
        _trace("ngram_update", pos)
        return hint

    @staticmethod
    def lookup(keys, vals, q, default):
        if len(keys) == 0:
            return torch.tensor(default, device=q.device).expand(len(q), len(default))
        i = torch.searchsorted(keys, q).clamp_max(len(keys) - 1)
        return torch.where((keys[i] == q)[:, None], vals[i], torch.tensor(default, device=q.device))

    def predict(self, K, Fv):
        n, dev = len(K), K.device
        ar = torch.arange(n, device=dev)
        o = torch.argsort(K, stable=True)
        Ks, Fs = K[o], Fv[o]  # grouped by key, stream order within a key
        new = torch.ones(n, dtype=torch.bool, device=dev)
        new[1:] = Ks[1:] != Ks[:-1]
        gid = new.cumsum(0) - 1
        gs = ar[new][gid]  # start of each element's key group
        tot0, max0, top0 = self.lookup(self.kk, self.kv, Ks, (0, 0, -1)).unbind(1)
        P = Ks * self.PAIR + Fs
        o2 = torch.argsort(P, stable=True)
        new2 = torch.ones(n, dtype=torch.bool, device=dev)
        new2[1:] = P[o2][1:] != P[o2][:-1]
        incl = torch.empty_like(ar)  # count of (key, follower) up to and including the element
        incl[o2] = self.lookup(self.pk, self.pc, P[o2], (0,))[:, 0] + ar - ar[new2][new2.cumsum(0) - 1] + 1
        big = n + int(max0.max()) + 2 if n else 1
        run = torch.maximum(torch.cummax(gid * big + incl, 0).values - gid * big, max0)  # top count after element
        prev = torch.where(new, max0, run.roll(1))  # top count before the element
        last = torch.cummax(torch.where(incl > prev, ar, -1), 0).values  # last element that raised the top count
        top = torch.where(last >= gs, Fs[last.clamp_min(0)], top0)
        top_prev = torch.where(new, top0, top.roll(1))
        tot = tot0 + ar - gs
        hint = torch.where((tot > 0) & (prev.double() >= self.thr * tot.double()), top_prev, -1)
        out = torch.empty_like(hint)
        out[o] = hint
        end = torch.cat([ar[new][1:] - 1, ar[-1:]])
        return out, (Ks[end], torch.stack([tot[end] + 1, run[end], top[end]], 1), P)

    def count(self, keys, vals, pairs):
        keep = ~torch.isin(self.kk, keys)
        kk, kv = torch.cat([self.kk[keep], keys]), torch.cat([self.kv[keep], vals])
        o = torch.argsort(kk)
        self.kk, self.kv = kk[o], kv[o]
        u, inv = torch.unique(torch.cat([self.pk, pairs]), return_inverse=True)
        add = torch.cat([self.pc[:, 0], torch.ones_like(pairs)])
        self.pk, self.pc = u, torch.zeros_like(u).index_add_(0, inv, add)[:, None]


CALIB_BUCKETS = 16


def fit_calibration(model, train_batches, cfg, iters=50):
    """Static calibration of the capped logits, scale * z + bias[bucket(token)] (PR #1924), fitted by L-BFGS on
    training tokens only. Buckets: CALIB_BUCKETS equal token-id ranges (BPE ids follow merge order, so frequency).
    Returns (scale, per-token bias (V,))."""
    dev, V = next(model.parameters()).device, cfg.vocab_size
    hs, ys = [], []
    with torch.no_grad():
        for x, y, cu in train_batches:
            x, y = (x[None], y[None]) if x.dim() == 1 else (x, y)
            with autocast(dev):
                hs.append(model.hidden(x, cu, cfg.train_seq_len).flatten(0, 1))
            ys.append(y.reshape(-1))
        h, y = torch.cat(hs), torch.cat(ys)
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:cfg.calibrate_tokens].to(dev)
        with autocast(dev):
            z = model.capped(model.logits(h[keep][None]))[0]
        y = y[keep]
    bucket = torch.arange(V, device=dev) * CALIB_BUCKETS // V
    s, b = torch.ones((), device=dev, requires_grad=True), torch.zeros(CALIB_BUCKETS, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([s, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(s * z + b[bucket], y)
        loss.backward()
        return loss
    before = float(F.cross_entropy(z, y))
    opt.step(closure)
    calib = (s.detach().clone(), b.detach()[bucket].clone())
    if dist.is_available() and dist.is_initialized():  # every rank uses rank 0's fit
        for t in calib:
            dist.broadcast(t, 0)
    return calib, before, float(F.cross_entropy(calib[0] * z + calib[1], y))


def lora_adamw_(ps, gs, vs, t, lr, wd, b2=0.99, eps=1e-8):
    """In place: torch.optim.AdamW(lr, betas=(0, b2), weight_decay=wd) on lists of tensors, in PyTorch's fused
    kernel (one pass over each tensor; tests compare). vs: the second moments, then as many first moments (with
    beta1 = 0 they only receive the gradient; finite, e.g. zero, at the start). t: the step count as a device tensor,
    so a CUDA graph can replay it."""
    torch._fused_adamw_(ps, gs, vs[len(ps):], vs[:len(ps)], [], [t] * len(ps), lr=lr, beta1=0.0, beta2=b2,
                        weight_decay=wd, eps=eps, amsgrad=False, maximize=False)


def lora_shapes(n, L, max_tokens, pad, rows="x8"):
    """The forwards of one LoRA chunk step over n rows of length <= L: (first row, rows, padded rows, padded length),
    at most max_tokens padded tokens each (memory). With pad (CUDA graphs), lengths are 64 ... 512 or multiples of
    256 and row counts powers of two (rows "pow2") or exact up to 16, then multiples of 8 ("x8"), so that few shapes
    recur."""
    if pad:
        L = 1 << max(6, (L - 1).bit_length()) if L <= 512 else -(-L // 256) * 256
    m = max(1, max_tokens // L)
    if pad:
        m = 1 << (m.bit_length() - 1)
    for j in range(0, n, m):
        k = min(n, j + m) - j
        b = (1 << (k - 1).bit_length() if rows == "pow2" else k if k <= 16 else -(-k // 8) * 8) if pad else k
        yield j, k, min(m, b), L


class TTT:
    """Score-first test-time training (SPEC 5). Every chunk is scored (added to the totals) before any state learns
    from it. 'phased': per-document LoRA adapters (documents batched longest first, TTT_CHUNK tokens per step) plus
    global SGD phases of the base weights over the first PHASED_TTT_PREFIX_DOCS documents in stream order, each after
    its group is fully scored. 'full': the stream in chunks, each scored (sliding windows), then all weights take SGD
    steps on it. The eval budget shrinks the work (phases, then adapter updates), never the scored tokens."""

    runs = 0  # TTT evaluations so far in this process (every rank counts alike): fresh queue keys for each
    pad_always = False  # tests: the padding of the CUDA-graph path without the graphs (CPU)

    def __init__(self, model, scorer, tokens, cfg, rt, deadline, score_rate=None):
        self.m, self.sc, self.tok, self.cfg, self.rt, self.deadline = model, scorer, tokens, cfg, rt, deadline
        TTT.runs += 1
        self.docs, self.t0 = doc_ranges(tokens), time.perf_counter()
        self.tot = torch.zeros(3, dtype=torch.float64, device=rt.device)
        self.margin = 1.0 + 0.03 * cfg.eval_budget_seconds
        self.rate = dict(score=score_rate or 1e-6, sgd=None)  # seconds per token (this rank) of scoring / base SGD
        self.adapt_log = []  # (steps, padded tokens, seconds, warmed up) of each LoRA batch
        self.shrunk, self.stats = [], dict(adapted_docs=0, score_only_docs=0, phases_done=0, full_chunks_trained=0)
        self.slots, self.t = None, torch.zeros((), device=rt.device)  # adapter slots; AdamW step count
        self.graphs = {} if cfg.ttt_cuda_graphs and rt.device.type == "cuda" else None
        self.pool = torch.cuda.graph_pool_handle() if self.graphs is not None else None
        self.pad = self.graphs is not None or TTT.pad_always
        self.warm = False  # whether a LoRA step ran before the first capture (lazy initialization, Triton builds)

    def left(self):
        return self.deadline - time.perf_counter() - self.margin

    def shrink(self, msg):
        if msg not in self.shrunk:
            self.shrunk.append(msg)
            self.rt.log(f"eval budget: {msg}")

    def agree(self, ok):  # every rank takes the same decision: no as soon as one rank is short of time
        return float(all_reduce_(torch.tensor([float(not ok)], device=self.rt.device), dist.ReduceOp.MAX)[0]) == 0

    def cost_fit(self):
        """(seconds per chunk step, per padded token) of the LoRA batches so far: least squares, both >= 0 (when
        the joint fit has a negative coefficient, the better of the two one-term fits)."""
        a = np.array(self.adapt_log, dtype=np.float64).reshape(-1, 4)
        a = a[a[:, 3] == 0] if (a[:, 3] == 0).any() else a  # the batch that warmed up has one-time costs
        coef = np.linalg.lstsq(a[:, :2], a[:, 2], rcond=None)[0] if len(a) >= 3 else [-1]
        if min(coef) >= 0:
            return coef
        one = [np.eye(2)[i] * (a[:, i] @ a[:, 2]) / max(a[:, i] @ a[:, i], 1e-30) for i in (0, 1)]
        return min(one, key=lambda c: ((a[:, :2] @ c - a[:, 2]) ** 2).sum())

    def adapt_cost(self, steps, work):
        """Seconds for a LoRA batch: per-step + per-padded-token costs fitted to the batches so far."""
        if not self.adapt_log:
            return 3 * self.rate["score"] * work
        coef = self.cost_fit()
        return float(coef[0] * steps + coef[1] * work)

    def score_rows(self, rows):
        with torch.no_grad():
            for chunk in row_batches(rows, self.cfg.eval_batch_tokens):
                add_scores(self.tot, chunk, *self.sc.nll(chunk))

    def new_adapters(self, n):
        """Adapter slots for n documents (rows of each tensor; set by reset_adapters) and their AdamW moments (second,
        then first; lora_adamw_), as flat lists in the order of self.unflat."""
        c, r, dev = self.cfg, self.cfg.ttt_lora_rank, self.rt.device
        d, kvd = c.model_dim, c.num_kv_heads * (c.model_dim // c.num_heads)
        shapes = dict(q=(d, d), k=(d, kvd), v=(d, kvd), o=(d, d), mlp=(c.mlp_mult * d, d))
        dims = [s for s in shapes.values() for _ in range(c.num_layers)] + [(d, c.vocab_size)]
        ps = [t for i, o in dims for t in (torch.empty(n, i, r, device=dev), torch.empty(n, r, o, device=dev))]
        return ps, [torch.empty_like(p) for p in ps * 2]

    @torch.no_grad()
    def reset_adapters(self):
        """In place (CUDA graphs hold the addresses): A random and small, B zero, so the adapted model starts as the
        base model; AdamW moments zero."""
        ps, vs = self.slots
        for A, B in zip(ps[0::2], ps[1::2]):
            A.normal_().div_(math.sqrt(A.shape[1]))
            B.zero_()
        torch._foreach_zero_(vs)

    def plan(self, batch):
        """(steps, padded tokens) of a LoRA batch."""
        lens, C, W = np.array([e - s for s, e in batch]), self.cfg.ttt_chunk, self.cfg.ttt_context
        c = np.arange(-(-int(lens.max()) // C))
        return len(c), int(((lens[None] > c[:, None] * C).sum(1) * np.minimum(np.minimum(W, (c + 1) * C), lens.max())).sum())

    def unflat(self, ps):
        L, it = self.cfg.num_layers, iter(zip(ps[0::2], ps[1::2]))
        ad = {k: [next(it) for _ in range(L)] for k in ("q", "k", "v", "o", "mlp")}
        ad["head"] = next(it)
        return ad

    def lora_step(self, ps, vs, meta, L, rows, train):
        """One chunk step of a slice of documents (rows of the slot tensors ps / vs): score the chunk (adds to the
        totals), then one AdamW step of each training document's adapter on it. meta: (4, B) starts, lengths,
        score-froms, train flags. The same code runs eagerly or captured in a CUDA graph (rows: trace only)."""
        leaves = [p.detach().requires_grad_(train) for p in ps]
        with torch.set_grad_enabled(train):
            loss, nll, scored, nb = self.sc.forward(rows, self.unflat(leaves), L, meta[:3], min(L, self.cfg.ttt_chunk))
        add_scores(self.tot, rows, nll, scored, nb)  # SCORE first ...
        if not train:
            return
        w = scored & (meta[3] > 0)[:, None]
        grads = torch.autograd.grad(((loss * w).sum(1) / w.sum(1).clamp_min(1)).sum(), leaves)
        if EVAL_TRACE is not None:  # ... then learn from the scored chunk
            _trace("lora_update", row_positions([r for r, t in zip(rows, meta[3].tolist()) if t], False))
        lora_adamw_(ps, grads, vs, self.t, self.cfg.ttt_lora_lr, self.cfg.ttt_lora_wd)

    def lora_batch(self, batch):
        """Per-document adapters over a batch of documents, longest first: chunk c of every document still going
        is scored, then each adapter takes one AdamW step on its document's (now scored) chunk. The documents
        still going are always the first slots, so the forwards cover slots [0, active). With CUDA graphs, row
        counts and lengths are padded (lora_shapes; rows (0, 0, 0): nothing scored or learned); padding changes no
        score (tests)."""
        C, W, n, dev = self.cfg.ttt_chunk, self.cfg.ttt_context, len(batch), self.rt.device
        batch = sorted(batch, key=lambda d: d[0] - d[1])  # the documents still going are then a prefix
        if self.slots is None or self.slots[0][0].shape[0] < n:
            self.slots = self.new_adapters(1 << (max(n, self.cfg.ttt_batch_docs) - 1).bit_length())
            if self.graphs:
                self.graphs.clear()
        self.reset_adapters()
        ps, vs = self.slots
        for c in range(self.plan(batch)[0]):
            rows = [(max(s, b - W), b, a) for s, e in batch for a in [s + c * C] if a < e for b in [min(e, a + C)]]
            train = [int(r[1] < e) for r, (_, e) in zip(rows, batch)]  # documents that go on after this chunk
            self.t.fill_(c + 1)
            for j, k, B, L in lora_shapes(len(rows), max(b - a for a, b, _ in rows), self.cfg.ttt_max_batch_tokens, self.pad,
                                          self.cfg.ttt_pad_rows):
                pr = [(s, e - s, f - s, t) for (s, e, f), t in zip(rows[j:j + k], train[j:j + k])] + [(0, 0, 0, 0)] * (B - k)
                meta = torch.tensor(pr, device=dev).T
                args = [p[j:j + B] for p in ps], [v[j:j + B] for v in vs], meta, L, rows[j:j + k]
                if self.graphs is None or not self.replay((j, B, L), *args):
                    self.lora_step(*args, any(train[j:j + k]))

    def replay(self, key, ps, vs, meta, L, rows):
        """lora_step through a CUDA graph per (first slot, rows, length), captured on first use into one shared
        memory pool (the steps run one after another on one stream; nothing a graph leaves behind is read by
        another). The first capture follows a warm-up step on copies (lazy initialization, Triton builds)."""
        g, tot = self.graphs.get(key), self.tot
        if g is None:
            try:
                if not self.warm:
                    self.warm = True
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        self.tot = tot.clone()
                        self.lora_step([p.clone() for p in ps], [v.clone() for v in vs], meta, L, rows, True)
                    torch.cuda.current_stream().wait_stream(s)
                    self.tot = tot
                g = (torch.cuda.CUDAGraph(), meta.clone())
                with torch.cuda.graph(g[0], pool=self.pool):
                    self.lora_step(ps, vs, g[1], L, rows, True)
            except RuntimeError as e:  # a kernel that cannot be captured: run eagerly (correct, slower)
                self.tot = tot
                self.rt.log(f"TTT: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); LoRA steps run eagerly")
                self.graphs = None
                return False
            self.graphs[key] = g
            self.stats["cuda_graphs"] = len(self.graphs)
        g[1].copy_(meta)
        g[0].replay()
        return True

    def sgd(self, lo, hi, opt, lr, epochs, step_tokens, clip=0.0, cosine=True):
        """Base weights learn from the scored span (inputs [lo, hi), targets (lo, hi]); each step's tokens are split
        across ranks and the gradients all-reduced, so the weights stay identical on every rank."""
        cfg, rt, params, t0 = self.cfg, self.rt, list(self.m.parameters()), time.perf_counter()
        steps = [(a, min(hi, a + step_tokens)) for a in range(lo, hi, step_tokens)] * epochs
        for p in params:
            p.requires_grad_(True)
        for k, (a, b) in enumerate(steps):
            for g in opt.param_groups:
                g["lr"] = lr * (0.5 * (1 + math.cos(math.pi * k / len(steps))) if cosine else 1.0)
            ra, rb = a + (b - a) * rt.rank // rt.world, a + (b - a) * (rt.rank + 1) // rt.world
            if rb > ra:
                cu = torch.from_numpy(segment_bounds(self.tok[ra:rb], cfg.train_seq_len)).to(rt.device)
                with torch.enable_grad(), autocast(rt.device):
                    loss = self.m(self.sc.tokens[None, ra:rb], self.sc.tokens[None, ra + 1:rb + 1], cu,
                                  cfg.train_seq_len, fused_ce=self.sc.fused_ce).sum() / (b - a)
                loss.backward()
            _trace("sgd_update", np.arange(a, b + 1))
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            if rt.world > 1:
                grads = torch.split(all_reduce_(torch.cat([g.flatten() for g in grads])), [p.numel() for p in params])
            for p, g in zip(params, grads):
                p.grad = g.view_as(p)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
        sync(rt.device)
        self.rate["sgd"] = (time.perf_counter() - t0) / max(1, (hi - lo) * epochs / rt.world)

    def sgd_cost(self, tokens):
        return tokens / self.rt.world * (self.rate["sgd"] or 3 * self.rate["score"])

    def queue(self, name, n):
        """Batch indices for this rank, pulled from a shared atomic counter in the default store (world 1: all)."""
        if self.rt.world == 1:
            yield from range(n)
            return
        store, key = dist.distributed_c10d._get_default_store(), f"ttt_queue_{TTT.runs}_{name}"
        while (i := store.add(key, 1) - 1) < n:
            yield i

    def phased(self):
        cfg, rt, W, B = self.cfg, self.rt, self.cfg.ttt_context, self.cfg.ttt_batch_docs
        P = cfg.phased_ttt_phases if cfg.phased_ttt_prefix_docs > 0 else 0
        npre = min(cfg.phased_ttt_prefix_docs, len(self.docs)) if P else 0
        cuts = [npre * i // max(P, 1) for i in range(P + 1)]
        groups = [self.docs[cuts[i]:cuts[i + 1]] for i in range(P)] + [self.docs[npre:]]
        plans = []  # per group: (batch, steps, padded tokens, tokens), longest documents first
        for g in groups:
            g = sorted(g, key=lambda d: d[0] - d[1])
            plans.append([(b, *self.plan(b), sum(e - s for s, e in b)) for b in (g[i:i + B] for i in range(0, len(g), B))])
        phases_on = P > 0
        for gi, bl in enumerate(plans):
            later = sum(t for pl in plans[gi + 1:] for *_, t in pl)
            rest = [r + later for r in np.cumsum([t for *_, t in bl][::-1])[::-1].tolist()[1:] + [0]]  # tokens after
            for bi in self.queue(gi, len(bl)):
                batch, steps, work, _ = bl[bi]
                t0 = time.perf_counter()
                if self.adapt_cost(steps, work) + rest[bi] / rt.world * self.rate["score"] <= self.left():
                    warm = self.warm
                    self.lora_batch(batch)
                    sync(rt.device)
                    self.adapt_log.append((steps, work, time.perf_counter() - t0, self.warm != warm))
                    self.stats["adapted_docs"] += len(batch)
                else:
                    self.score_rows([r for s, e in batch for r in span_rows(s, s, e, W, W)])
                    self.stats["score_only_docs"] += len(batch)
                    self.shrink("LoRA updates skipped for some document batches (projected overrun); those are scored as is")
                if bi % max(1, len(bl) // 4) == 0:
                    rt.log(f"ttt group {gi + 1}/{len(plans)} batch {bi + 1}/{len(bl)}: t {time.perf_counter() - self.t0:.1f}s "
                           f"rank0 running val_bpb {totals(self.tot)[1]:.5f}")
            if gi < P and phases_on and groups[gi] and any(groups[gi + 1:]):  # a phase helps only later groups
                lo = next(g for g in groups[:gi + 1] if g)[0][0] if cfg.phased_ttt_cumulative else groups[gi][0][0]
                hi = groups[gi][-1][1]
                rest_adapt = sum(self.adapt_cost(st, wk) for pl in plans[gi + 1:] for _, st, wk, _ in pl) / rt.world
                if not self.agree(self.sgd_cost(hi - lo) + rest_adapt <= self.left()):
                    phases_on = False
                    self.shrink(f"skipped global SGD phases {gi + 1}..{P} of {P} (projected overrun)")
                    continue
                opt = torch.optim.SGD(self.m.parameters(), lr=cfg.ttt_sgd_lr, momentum=cfg.ttt_sgd_momentum)
                self.sgd(lo, hi, opt, cfg.ttt_sgd_lr, 1, cfg.ttt_sgd_chunk_tokens)
                self.stats["phases_done"] += 1
                rt.log(f"ttt phase {gi + 1}/{P}: base SGD over the scored tokens [{lo:,}, {hi:,}], "
                       f"t {time.perf_counter() - self.t0:.1f}s")

    def full(self):
        cfg, rt, W = self.cfg, self.rt, self.cfg.ttt_context
        N, step = len(self.tok), cfg.ttt_sgd_chunk_tokens
        chunks = [(a, min(N - 1, a + step)) for a in range(0, N - 1, step)]
        starts = np.array([s for s, _ in self.docs])
        opt = torch.optim.SGD(self.m.parameters(), lr=cfg.full_ttt_lr, momentum=cfg.ttt_sgd_momentum)
        train, score_s = True, 0.0
        for k, (lo, hi) in enumerate(chunks):
            t0, rows = time.perf_counter(), []
            for s, e in self.docs[max(0, int(np.searchsorted(starts, lo, "right")) - 1):]:
                if s >= hi:
                    break
                rows += span_rows(s, max(s, lo), min(e, hi), W, cfg.eval_stride if train else W)
            self.score_rows(rows[rt.rank::rt.world])
            sync(rt.device)
            score_s += time.perf_counter() - t0
            if train and k + 1 < len(chunks):
                rest = (N - 1 - hi) * score_s / hi
                if not self.agree(self.sgd_cost((hi - lo) * cfg.full_ttt_epochs) + rest <= self.left()):
                    train = False
                    self.shrink(f"stopped full-model TTT after chunk {k + 1}/{len(chunks)} (projected overrun); "
                                f"the rest is scored with plain windows")
                    continue
                lr = cfg.full_ttt_lr * 0.5 * (1 + math.cos(math.pi * k / len(chunks)))
                self.sgd(lo, hi, opt, lr, cfg.full_ttt_epochs, 32 * cfg.train_seq_len, clip=1.0, cosine=False)
                self.stats["full_chunks_trained"] += 1

    def run(self):
        with frozen(self.m):
            self.full() if self.cfg.ttt_mode == "full" else self.phased()
        res, dt = totals(all_reduce_(self.tot)), time.perf_counter() - self.t0
        want = (len(self.tok) - 1, int(self.sc.nbytes[1:].sum()))
        if res[2:] != want:  # C4: every target exactly once
            raise SystemExit(f"error: TTT scored {res[2]:,} tokens / {res[3]:,} bytes, expected {want[0]:,} / {want[1]:,}")
        if len(self.adapt_log) >= 3:  # where LoRA time goes (rank 0's fit): seconds per chunk step and per 1k padded tokens
            coef = self.cost_fit()
            self.stats.update(lora_s_per_step=round(float(coef[0]), 5), lora_s_per_ktok=round(float(coef[1]) * 1e3, 5))
        a = np.array(self.adapt_log, dtype=np.float64).reshape(-1, 4)[:, :3].sum(0).tolist()  # summed over the ranks:
        counts = all_reduce_(torch.tensor([self.stats["adapted_docs"], self.stats["score_only_docs"], *a],  # docs, LoRA
                                          dtype=torch.float64, device=self.rt.device)).tolist()  # steps, tokens, seconds
        self.stats.update(adapted_docs=int(counts[0]), score_only_docs=int(counts[1]), lora_steps=int(counts[2]),
                          lora_padded_tokens=int(counts[3]), lora_s=round(counts[4], 2), seconds=round(dt, 2),
                          tokens_per_s=round(res[2] / dt), tokens_per_s_per_gpu=round(res[2] / dt / self.rt.world),
                          shrunk=self.shrunk + (["some ranks stopped LoRA updates"] if counts[1] and not self.shrunk else []))
        return res, self.stats


def ttt_eval(model, scorer, val_tokens, cfg, rt, budget_deadline, score_rate=None):
    """Score-first TTT (TTT_MODE phased | full) -> ((val_loss, val_bpb, scored tokens, scored bytes), stats)."""
    if cfg.ttt_mode not in ("phased", "full"):
        raise SystemExit(f"error: TTT_MODE={cfg.ttt_mode!r}; use phased, full or off")
    if cfg.ttt_pad_rows not in ("pow2", "x8"):
        raise SystemExit(f"error: TTT_PAD_ROWS={cfg.ttt_pad_rows!r}; use pow2 or x8")
    return TTT(model, scorer, val_tokens, cfg, rt, budget_deadline, score_rate).run()


def run_evaluation(model, val_tokens, val_bytes, cfg, rt, t_eval0, train_batches_fn=None):
    """Everything after the artifact is loaded (the timer started at t_eval0): plain (and sliding) diagnostics,
    calibration, n-gram hints, then the scored result (val_loss / val_bpb: TTT's, else the calibrated / tilted
    windows', else the quantized windows'); exits non-zero past EVAL_BUDGET_SECONDS."""
    model.looping = cfg.num_loops > 0
    sc = Scorer(model, val_tokens, val_bytes, rt.device, fused_ce_on(cfg, rt.device),
                boost=cfg.ngram_boost)
    res = dict(sliding_val_bpb=None, ttt_val_loss=None, ttt_val_bpb=None, ttt_tokens_per_s=None, eval_shrunk=[])

    def windows(name, rows):
        t = time.perf_counter()
        out = eval_windows(sc, rows, rt, cfg.eval_batch_tokens)
        rt.log(f"{name} val_loss {out[0]:.5f} val_bpb {out[1]:.5f} ({out[2]:,} tokens, {out[3]:,} bytes) "
               f"{time.perf_counter() - t:.1f}s")
        return out, (time.perf_counter() - t) * rt.world / max(out[2], 1)
    (loss, bpb, n, nb), score_rate = windows("quantized", plain_rows(val_tokens, cfg.train_seq_len, cfg.val_max_tokens))
    res.update(quant_val_loss=loss, quant_val_bpb=bpb, val_loss=loss, val_bpb=bpb, val_tokens=n, val_bytes=nb)
    if cfg.sliding_eval:
        rows = sliding_rows(val_tokens, cfg.train_seq_len, cfg.eval_stride, cfg.val_max_tokens)
        res["sliding_val_bpb"] = windows(f"sliding (stride {cfg.eval_stride})", rows)[0][1]
    if cfg.calibrate:
        if train_batches_fn is None:
            raise SystemExit("error: CALIBRATE=1 needs training batches (train_batches_fn)")
        sc.calib, before, after = fit_calibration(model, train_batches_fn(cfg.calibrate_batches), cfg)
        rt.log(f"calibration: scale {float(sc.calib[0]):.4f}, train-token loss {before:.5f} -> {after:.5f}")
        if before < 0.9 * res["quant_val_loss"]:
            rt.log(f"warning: the calibration's training tokens score {before:.3f} against {res['quant_val_loss']:.3f} on "
                   f"val: the model has trained on them (more than one epoch of data?), so the fit can make val worse")
    if cfg.ngram_tilt:
        t = time.perf_counter()
        sc.hints = NgramTilt(cfg.ngram_order, cfg.ngram_threshold).hints(sc.tokens)
        rt.log(f"ngram tilt: hints at {float((sc.hints >= 0).float().mean()):.2%} of positions, {time.perf_counter() - t:.1f}s")
    if cfg.ttt_mode != "off":
        (loss, bpb, n, nb), st = ttt_eval(model, sc, val_tokens, cfg, rt, t_eval0 + cfg.eval_budget_seconds, score_rate)
        rt.log(f"ttt ({cfg.ttt_mode}) val_loss {loss:.5f} val_bpb {bpb:.5f} ({n:,} tokens, {nb:,} bytes) {st['seconds']:.1f}s, "
               f"{st['tokens_per_s']:,} tok/s ({st['tokens_per_s_per_gpu']:,} per GPU); {st}")
        res.update(ttt_val_loss=loss, ttt_val_bpb=bpb, val_loss=loss, val_bpb=bpb, val_tokens=n, val_bytes=nb,
                   ttt_tokens_per_s=st["tokens_per_s"], ttt_tokens_per_s_per_gpu=st["tokens_per_s_per_gpu"],
                   ttt_stats=st, eval_shrunk=st["shrunk"])
    elif cfg.calibrate or cfg.ngram_tilt:  # without TTT the scored result: every val token, VAL_MAX_TOKENS or not
        (loss, bpb, n, nb), _ = windows("calibrated/tilted", plain_rows(val_tokens, cfg.train_seq_len))
        res.update(adjusted_val_loss=loss, adjusted_val_bpb=bpb, val_loss=loss, val_bpb=bpb, val_tokens=n, val_bytes=nb)
    res["eval_time_s"] = round(time.perf_counter() - t_eval0, 2)
    rt.log(f"eval time {res['eval_time_s']:.1f}s of the {cfg.eval_budget_seconds:.0f}s budget (from artifact load)"
           + (f"; shrunk: {res['eval_shrunk']}" if res["eval_shrunk"] else ""))
    if res["eval_time_s"] > cfg.eval_budget_seconds:
        raise SystemExit(f"error: evaluation took {res['eval_time_s']:.1f}s > EVAL_BUDGET_SECONDS={cfg.eval_budget_seconds}")
    return res


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
    if brotli is None:
        raise SystemExit("error: the artifact needs the brotli package: pip install brotli (or set QUANTIZE=0)")
    code, method = wrap_code(Path(__file__).read_text())
    widen, state = 1.0, model_state(model)
    for attempt in range(1 + 4 * cfg.artifact_fit):
        t = time.perf_counter()
        packed, qstats = quantize_state(state, hessians, quant_spec(cfg, widen))
        summary["gptq_s"] = round(time.perf_counter() - t, 2)
        worst = sorted(qstats["hrel"].items(), key=lambda kv: -kv[1])[:3]
        rt.log(f"GPTQ: {len(qstats['rel'])} tensors in {summary['gptq_s']}s (clip widen x{widen:.3f}); LQER on "
               f"{sorted(qstats['lqer'])}; largest output errors {[(k, round(v, 4)) for k, v in worst]}")
        t = time.perf_counter()
        blob = pack_state({k: v.cpu() for k, v in packed.items()})
        summary["compress_s"] = round(time.perf_counter() - t, 2)
        excess = len(blob) + len(code) - cfg.artifact_limit * (1 - cfg.artifact_margin)
        if excess <= 0 or not cfg.artifact_fit:
            break
        # a grid coarser by f saves about log2(f) bits per quantized value: widen just enough (ARTIFACT_FIT)
        n_q = sum(v.numel() for k, v in packed.items() if k.endswith(".q"))
        widen *= 2 ** max(1.1 * 8 * excess / n_q, 1e-3)  # aim a little past the limit: each try costs a GPTQ pass
        rt.log(f"artifact {len(blob) + len(code):,} B is over the limit with margin; requantizing with clip widen x{widen:.3f}")
    summary["clip_widen"] = round(widen, 4)
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


def track_notes(s):
    """Why a training run's result is not one of the 10-minute / 16 MB track (none: it is): the track trains and
    evaluates on 8xH100 SXM, at most 600 s each (the byte limit makes a result invalid: build_artifact)."""
    gpu, notes = s.get("gpu") or "", []
    if s.get("world_size") != 8 or "H100" not in gpu or "PCIe" in gpu or "NVL" in gpu:
        notes.append(f"{s.get('world_size')}x {gpu}: the track runs on 8xH100 SXM")
    for what, key in (("training", "train_wallclock_s"), ("evaluation", "eval_time_s")):
        if (s.get(key) or 0) > 600:
            notes.append(f"{what} took {s[key]:.1f}s > 600s")
    return notes


def submission_record(summaries, cfg):
    """submission.json in the shape of the challenge's records; several seeds -> mean and std; track: 10min_16mb
    when every seed's run qualifies, else non_record_16mb with the reasons."""
    bpbs = [s["val_bpb"] for s in summaries]
    s0 = summaries[0]
    mean = float(np.mean(bpbs))
    notes = list(dict.fromkeys(n for s in summaries for n in track_notes(s)))
    return dict(name=cfg.submission_name or "parameter-golf-kit", author=cfg.submission_author, github_id=cfg.submission_github_id,
                val_bpb=round(mean, 6), val_bpb_std=round(float(np.std(bpbs, ddof=1)), 6) if len(bpbs) > 1 else None,
                val_loss=round(float(np.mean([s["val_loss"] for s in summaries])), 6),
                bytes_total=max(s.get("bytes_total") or 0 for s in summaries),
                seeds=[dict(seed=s["seed"], val_bpb=s["val_bpb"], val_loss=s["val_loss"], bytes_total=s.get("bytes_total"),
                            steps=s.get("steps"), train_wallclock_s=s.get("train_wallclock_s"),
                            eval_time_s=s.get("eval_time_s")) for s in summaries],
                hardware=f"{s0['world_size']}x {s0.get('gpu')}", track="non_record_16mb" if notes else "10min_16mb",
                track_notes=notes,
                software=dict(torch=s0.get("torch"), triton=s0.get("triton"), python=s0.get("python") or platform.python_version()),
                date=time.strftime("%Y-%m-%d"))


def write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def evaluate_artifact(blob, cfg, rt, backend, val_tokens, val_bytes, t_eval0, loader):
    """What the eval timer (started at t_eval0) covers from the artifact's bytes (rank 0's) on: decode, dequantize
    into a fresh model, evaluate. loader: training batches for CALIBRATE."""
    model = GPT(cfg).to(rt.device)
    model.attn_backend, model.looping = backend, cfg.num_loops > 0
    load_dequantized(model, unpack_state(broadcast_bytes(blob, rt)), cfg)
    return run_evaluation(model, val_tokens, val_bytes, cfg, rt, t_eval0,
                          lambda k: [b for _ in range(k) for b in loader.next_step()])


def resume_train_stream(loader, artifact, rt):
    """CALIBRATE under EVAL_ARTIFACT: the train stream from where the run that wrote the artifact left it (its
    summary.json beside the artifact), so that the calibration fits on the tokens that run's own calibration read,
    which its training never saw."""
    f = Path(artifact).parent / "summary.json"
    try:
        idx, pos, name = json.loads(f.read_text())["train_stream_end"]
        ok = Path(loader.stream.files[idx]).name == name
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        rt.log(f"warning: CALIBRATE with EVAL_ARTIFACT: no train_stream_end for these train shards in {f}, so the "
               f"calibration fits on the first training batches, which the model trained on")
        return
    loader.stream.restore((idx, pos))


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
    if cfg.eval_artifact and out_dir.resolve() == Path(cfg.eval_artifact).resolve().parent:
        raise SystemExit(f"error: EVAL_ARTIFACT={cfg.eval_artifact} lies in this run's folder {out_dir}, whose log.txt and "
                         f"summary.json it would overwrite; set another RUN_ID or ARTIFACT_DIR")
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
    setup_torch(rt)
    summary = dict(run_id=run_id, world_size=rt.world, seed=cfg.seed, config=cfg.values, ttt_val_bpb=None,
                   gpu=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
                   torch=torch.__version__, python=platform.python_version(),
                   triton=triton.__version__ if HAVE_TRITON else None)
    model = GPT(cfg).to(rt.device)
    heads = attention_heads(cfg)
    model.attn_backend = summary["attention_backend"] = agree_attention(
        pick_attention(cfg.attn_backend, rt.device, True, heads, rt.log), rt)
    backend = summary["eval_attention_backend"] = pick_attention(cfg.attn_backend, rt.device, False, heads, rt.log)
    n_params = sum(p.numel() for p in model.parameters())
    summary["parameters"] = n_params
    rt.log(f"model: {n_params:,} parameters, attention backend {model.attn_backend} (evaluation and TTT: {backend})")
    # the training backend is known: the compile helper starts now, its own set-up beside the rest of this one's
    helper = None if cfg.eval_artifact else start_compile_helper(cfg, rt, model.attn_backend)
    val_tokens, val_bytes = load_val(cfg, rt)
    failure = None
    if cfg.eval_artifact:  # re-evaluate a saved artifact with this run's eval settings: no training
        path = Path(cfg.eval_artifact)
        if not path.is_file():
            raise SystemExit(f"error: EVAL_ARTIFACT={cfg.eval_artifact}: no such file; give the model.ptz a run wrote")
        t_eval0 = time.perf_counter()
        loader = TrainLoader(cfg, rt, grad_accum(cfg, rt)) if cfg.calibrate else None
        if loader is not None:
            resume_train_stream(loader, path, rt)
        del model
        summary.update(eval_artifact=str(path), artifact_bytes=path.stat().st_size, **evaluate_artifact(
            path.read_bytes() if rt.master else None, cfg, rt, backend, val_tokens, val_bytes, t_eval0, loader))
        why_not = "EVAL_ARTIFACT: a re-evaluation; the submission is that of the run that wrote the artifact"
    else:
        trainer = Trainer(cfg, rt, model, helper)
        t_train0 = trainer.run(summary)
        model.attn_backend = backend
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
        idx, pos = trainer.loader.stream.state()  # where CALIBRATE continues (also under EVAL_ARTIFACT)
        summary["train_stream_end"] = [idx, pos, Path(trainer.loader.stream.files[idx]).name]
        loss, bpb, n, nb = eval_windows(Scorer(model, val_tokens, val_bytes, rt.device),
                                        plain_rows(val_tokens, cfg.train_seq_len, cfg.val_max_tokens), rt, micro)
        summary.update(pre_quant_val_bpb=bpb, pre_quant_val_loss=loss, val_loss=loss, val_bpb=bpb, val_tokens=n, val_bytes=nb)
        rt.log(f"pre-quant val_loss {loss:.5f} val_bpb {bpb:.5f} ({n:,} tokens, {nb:,} bytes)")
        if cfg.quantize:
            failure = build_artifact(model, hessians, cfg, rt, out_dir, summary)
            t_eval0 = time.perf_counter()
            del model
            blob = (out_dir / "model.ptz").read_bytes() if rt.master else None
            summary.update(evaluate_artifact(blob, cfg, rt, backend, val_tokens, val_bytes, t_eval0, trainer.loader))
        why_not = failure or (None if cfg.quantize else "QUANTIZE=0: pre-quant diagnostic, no artifact")
        if why_not is None and summary["val_tokens"] < len(val_tokens) - 1:  # C4: a result scores every val token
            why_not = (f"VAL_MAX_TOKENS={cfg.val_max_tokens}: the result scores {summary['val_tokens']:,} of the "
                       f"{len(val_tokens) - 1:,} val tokens (with TTT, NGRAM_TILT or CALIBRATE it scores all)")
    summary["valid"], summary["not_valid_because"] = why_not is None, why_not
    if rt.master:
        write_json(out_dir / "summary.json", summary)
        if why_not is None:
            write_json(out_dir / "submission.json", submission_record([summary], cfg))
    if why_not is None:
        rt.log(f"final val_bpb {summary['val_bpb']:.5f} (val_loss {summary['val_loss']:.5f}); "
               f"summary: {out_dir / 'summary.json'}, submission: {out_dir / 'submission.json'}")
        if notes := track_notes(summary):
            rt.log(f"not a 10-minute-track result ({'; '.join(notes)}): submission.json says track non_record_16mb")
    else:
        rt.log(f"no valid result ({why_not}); val_bpb {summary['val_bpb']:.5f} is for diagnosis only; "
               f"summary: {out_dir / 'summary.json'}")
    if failure:
        raise SystemExit(failure)
    if dist.is_initialized():
        dist.destroy_process_group()


def env_table():
    """The README's environment-variable table, generated from CONFIG."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{n}` | `{d!r}` | {h} |" for n, d, h in CONFIG]
    return "\n".join(rows)


def cli(argv):
    """`python train_gpt.py merge OUT.json RUN/summary.json...`: one submission.json with mean/std over seeds;
    `python train_gpt.py env-table`: the README table. No arguments: train (torchrun)."""
    if argv[:1] == ["env-table"]:
        print(env_table())
    elif argv[:1] == ["compile-helper"] and len(argv) in (2, 3):
        os.nice(5)  # the run beside it comes first
        compile_helper(int(argv[1]), *argv[2:])
    elif argv[:1] == ["merge"] and len(argv) >= 3:
        summaries = []
        for f in argv[2:]:
            try:
                summaries.append(json.loads(Path(f).read_text()))
            except (OSError, ValueError) as e:
                raise SystemExit(f"error: cannot read summary {f}: {e}")
            if summaries[-1].get("val_bpb") is None:
                raise SystemExit(f"error: {f} has no val_bpb (the run did not finish)")
            if summaries[-1].get("valid") is False:
                raise SystemExit(f"error: {f} is not a valid result ({summaries[-1].get('not_valid_because') or 'see its log'})")
        free = {"SEED", "RUN_ID", "ARTIFACT_DIR", "DATA_PATH", "TOKENIZER_PATH", "SUBMISSION_NAME", "SUBMISSION_AUTHOR",
                "SUBMISSION_GITHUB_ID"}  # the settings a submission's seeds may differ in
        a = dict(summaries[0].get("config") or {}, world_size=summaries[0].get("world_size"))
        for f, s in zip(argv[3:], summaries[1:]):
            b = dict(s.get("config") or {}, world_size=s.get("world_size"))
            diff = [f"{k} ({a.get(k)!r} against {b.get(k)!r})" for k in sorted((a.keys() | b.keys()) - free)
                    if a.get(k) != b.get(k)]
            if diff:
                raise SystemExit(f"error: {f} differs from {argv[2]} in {', '.join(diff[:4])}: the seeds of one "
                                 f"submission share every setting but SEED (and the paths)")
        seeds = [s.get("seed") for s in summaries]
        if len(set(seeds)) < len(seeds):
            raise SystemExit(f"error: the summaries repeat a seed ({seeds}): give each run once")
        write_json(Path(argv[1]), submission_record(summaries, Config()))
        print(f"wrote {argv[1]}: val_bpb mean over {len(summaries)} seeds")
    else:
        raise SystemExit("usage: torchrun ... train_gpt.py | python train_gpt.py merge OUT.json SUMMARY.json... | "
                         "python train_gpt.py env-table")


if __name__ == "__main__":
    cli(sys.argv[1:]) if sys.argv[1:] else main()
