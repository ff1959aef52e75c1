#!/usr/bin/env python3
"""Build, verify or fetch CaseOps token shards for Parameter Golf (SPEC section 1).

  prepare_caseops_data.py --docs FILE --out DIR (--sp MODEL | --vocab-size N)
                          [--val-docs 50000] [--shard-tokens 10000000] [--workers N]
                          [--plain] [--max-train-shards K] [--keep-val-duplicates] [--force]
  prepare_caseops_data.py --verify DIR [--docs FILE]
  prepare_caseops_data.py --demo [--out DIR]
  prepare_caseops_data.py --download [--out DIR] [--max-train-shards 80]

FILE is .jsonl, .jsonl.gz or .jsonl.xz with one {"text": ...} object per line.
Documents are stripped of leading/trailing whitespace; empty ones are skipped
and counted.  The first --val-docs documents (default 50,000, the challenge's
validation set) go to val, all later ones to train; a train document whose
token sequence equals a val document's is dropped (counted in the manifest)
unless --keep-val-duplicates.  Every document starts with BOS (id 1).

DIR receives fineweb_{train,val}_NNNNNN.bin (256 int32 header: magic
20240520, version 1, token count; then uint16 tokens), the val byte sidecar
fineweb_val_bytes_NNNNNN.bin (one uint16 per val token: the original UTF-8
bytes it stands for, 0 for BOS), tokenizer.model and manifest.json (settings,
counts, sha256 of inputs and outputs).  The output does not depend on
--workers.  A DIR that holds a dataset made with other settings is refused
unless --force.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import importlib
import io
import json
import lzma
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import lossless_caps

# --------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
MAX_VOCAB = 65535

DEFAULT_VAL_DOCS = 50_000
DEFAULT_SHARD_TOKENS = 10_000_000
DEFAULT_TOKENIZER_TRAIN_CHARS = 100_000_000
TOKENIZER_TRAIN_THREADS = 8  # fixed: the trained model records its thread count
CHUNK_BYTES = 1 << 21  # input text per worker task

HF_REPO_ID = "romeerp/parameter-golf-caseops-v1"
HF_DATASET_NAME = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
HF_TOKENIZER_NAME = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
HF_REMOTE_ROOT = "datasets"
HF_TRAIN_SHARDS = 80
HF_VAL_TARGET_TOKENS = 47_851_520  # val targets after truncation to 2048-token windows
HF_VAL_SEQ_LEN = 2048
DEFAULT_DOWNLOAD_DIR = Path("data/datasets") / HF_DATASET_NAME
DEFAULT_DEMO_DIR = Path("data/demo")

SHARD_RE = re.compile(r"^fineweb_(train|val|val_bytes)_(\d{6})\.bin$")
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
PARTIAL_DIR = ".partial"


class DataError(Exception):
    """Bad input or a refused operation; the message says what and how to fix it."""


class LayoutError(DataError):
    """A dataset directory does not have the expected files/headers."""

    def __init__(self, directory, problems):
        self.problems = list(problems)
        super().__init__(f"{directory}: dataset layout check failed:\n  - " + "\n  - ".join(self.problems))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shard_name(kind: str, index: int) -> str:
    return f"fineweb_{kind}_{index:06d}.bin"


# --------------------------------------------------------------------------
# shard files
# --------------------------------------------------------------------------

def shard_header(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, n_tokens
    return header.tobytes()


def write_shard(path, tokens) -> str:
    """Write one shard; return its sha256."""
    data = np.ascontiguousarray(tokens, dtype="<u2")
    header = shard_header(len(data))
    h = hashlib.sha256(header)
    h.update(memoryview(data).cast("B"))
    with open(path, "wb") as f:
        f.write(header)
        f.write(memoryview(data).cast("B"))
    return h.hexdigest()


def read_header(path) -> tuple[int, int, int]:
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header")
    h = np.frombuffer(raw, dtype="<i4")
    return int(h[0]), int(h[1]), int(h[2])


def read_tokens(path) -> np.ndarray:
    """Tokens of a shard (memory-mapped, read-only)."""
    _, _, n = read_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def sha256_file(path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                return h.hexdigest()
            h.update(b)


class ShardWriter:
    """Streams tokens into fixed-size shards; memory is one shard buffer."""

    def __init__(self, directory: Path, kind: str, shard_tokens: int, max_shards: int | None = None):
        self.directory, self.kind = directory, kind
        self.shard_tokens, self.max_shards = shard_tokens, max_shards
        self.buf = np.empty(shard_tokens, dtype="<u2")
        self.fill = 0
        self.files: dict[str, dict] = {}
        self.tokens_written = 0
        self.full = False  # max_shards reached

    def append(self, tokens: np.ndarray) -> None:
        pos = 0
        n = len(tokens)
        while pos < n and not self.full:
            take = min(n - pos, self.shard_tokens - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        name = shard_name(self.kind, len(self.files))
        digest = write_shard(self.directory / name, self.buf[:self.fill])
        self.files[name] = {"tokens": int(self.fill), "sha256": digest}
        self.tokens_written += self.fill
        self.fill = 0
        if self.max_shards is not None and len(self.files) >= self.max_shards:
            self.full = True

    def close(self) -> None:
        """Write the last, partial shard (dropped when max_shards is reached)."""
        if self.fill and not self.full:
            self._flush()
        self.buf = np.empty(0, dtype="<u2")


def with_bos(ids: np.ndarray, lengths: np.ndarray, fill: int = BOS_ID) -> np.ndarray:
    """Concatenated documents with ``fill`` in front of each one."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.insert(ids, starts, fill)


# --------------------------------------------------------------------------
# reading documents
# --------------------------------------------------------------------------

class _HashingReader(io.RawIOBase):
    """Raw file wrapper that hashes every byte read through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.nbytes += n
        return n

    def drain(self) -> None:
        while self.read(1 << 22):
            pass

    def close(self):
        self.f.close()
        super().close()


class DocsFile:
    """Opens .jsonl / .jsonl.gz / .jsonl.xz; yields (first_line_number, bytes) blobs of whole lines."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"--docs {path}: no such file (expected a .jsonl, .jsonl.gz or .jsonl.xz "
                            f"file with one {{\"text\": ...}} object per line)")
        self.raw = _HashingReader(open(self.path, "rb"))
        buffered = io.BufferedReader(self.raw, buffer_size=1 << 20)
        name = self.path.name.lower()
        if name.endswith(".gz"):
            self.stream = gzip.GzipFile(fileobj=buffered, mode="rb")
        elif name.endswith(".xz") or name.endswith(".lzma"):
            self.stream = lzma.LZMAFile(buffered, mode="rb")
        else:
            self.stream = buffered

    def blobs(self, chunk_bytes: int | None = None):
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        line = 1
        rest = b""
        while True:
            try:
                data = self.stream.read(chunk_bytes)
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise DataError(f"--docs {self.path}: cannot decompress ({e}); is the file complete?") from e
            if not data:
                if rest:
                    yield line, rest
                return
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            blob, rest = data[:cut + 1], data[cut + 1:]
            yield line, blob
            line += blob.count(b"\n")

    def finish(self) -> tuple[str, int]:
        """Hash the rest of the file; return (sha256, size) of the file as stored."""
        self.raw.drain()
        return self.raw.sha.hexdigest(), self.raw.nbytes

    def close(self):
        try:
            self.stream.close()
        finally:
            self.raw.close()


def parse_blob(first_line: int, blob: bytes, label: str):
    """Lines of a blob -> (texts, line_numbers, n_empty). Texts are stripped."""
    lines = blob.split(b"\n")
    if blob.endswith(b"\n"):
        lines.pop()
    texts, line_nos = [], []
    n_empty = 0
    for i, raw in enumerate(lines):
        ln = first_line + i
        if not raw.strip():
            raise DataError(f"{label}:{ln}: empty line; every line must be one JSON object such as "
                            f"{{\"text\": \"...\"}} (remove the blank line)")
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}:{ln}: malformed JSON ({e.msg} at column {e.colno}); every line must be "
                            f"one JSON object such as {{\"text\": \"...\"}}") from None
        except ValueError as e:  # e.g. invalid UTF-8
            raise DataError(f"{label}:{ln}: malformed JSON ({e}); the file must be UTF-8 JSON lines") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataError(f"{label}:{ln}: no \"text\" field; every line must be a JSON object with a "
                            f"\"text\" string, e.g. {{\"text\": \"...\"}}")
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError(f"{label}:{ln}: \"text\" is a {type(text).__name__}, not a string")
        text = text.strip()
        if not text:
            n_empty += 1
            continue
        texts.append(text)
        line_nos.append(ln)
    return texts, line_nos, n_empty


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

def load_sp(model_bytes: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes)


def check_tokenizer(model_bytes: bytes, label: str, plain: bool):
    try:
        sp = load_sp(model_bytes)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on junk
        raise DataError(f"{label}: not a SentencePiece model ({e})") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise DataError(f"{label}: vocabulary of {sp.vocab_size():,} pieces is over {MAX_VOCAB:,}; "
                        f"uint16 shards cannot hold its ids (use a smaller tokenizer)")
    if sp.bos_id() != BOS_ID:
        raise DataError(f"{label}: BOS id is {sp.bos_id()}, but the shard format needs BOS = {BOS_ID}")
    if not plain:
        try:
            lossless_caps.operator_ids(sp)
        except ValueError as e:
            raise DataError(f"{label}: {e}; CaseOps needs them as user-defined symbols "
                            f"(train one with --vocab-size, or pass --plain for a non-CaseOps tokenizer)") from None
    return sp


def train_tokenizer(texts_iter, vocab_size: int, plain: bool) -> bytes:
    """Train a BPE SentencePiece model with the record line's options (SPEC 1.2)."""
    import sentencepiece as spm

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(1234)
    out = io.BytesIO()
    kwargs = dict(
        sentence_iterator=texts_iter, model_writer=out, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.999, split_digits=True, max_sentencepiece_length=16,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, add_dummy_prefix=False,
        normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
        num_threads=TOKENIZER_TRAIN_THREADS, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=1 << 20, hard_vocab_limit=True, minloglevel=2,
    )
    if not plain:
        kwargs["user_defined_symbols"] = list(lossless_caps.OPERATORS)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        raise DataError(f"tokenizer training failed ({e}); try a smaller --vocab-size or more documents") from None
    return out.getvalue()


# --------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------

_W: dict = {}


def _init_worker(model_bytes: bytes, caseops: bool, label: str) -> None:
    sp = load_sp(model_bytes)
    _W["counter"] = lossless_caps.PieceByteCounter(sp, caseops=caseops, num_threads=1)
    _W["label"] = label


def doc_hashes(ids16: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    out = []
    pos = 0
    for n in lengths.tolist():
        out.append(hashlib.blake2b(ids16[pos:pos + n].tobytes(), digest_size=16).digest())
        pos += n
    return out


def _process(task):
    """Worker task: parse, transform, tokenize and price one blob of lines."""
    first_line, blob, need_bytes = task
    label = _W["label"]
    texts, line_nos, n_empty = parse_blob(first_line, blob, label)
    doc_bytes = np.zeros(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        try:
            doc_bytes[i] = len(t.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise DataError(f"{label}:{line_nos[i]}: \"text\" is not valid Unicode ({e.reason} at "
                            f"character {e.start}: a lone surrogate escape?)") from None
    ids, lengths, counts = _W["counter"].encode_originals(texts, with_bytes=need_bytes)
    n_lines = blob.count(b"\n") + (0 if blob.endswith(b"\n") else 1)
    keep = lengths > 0  # a document the normalizer reduces to nothing has no tokens
    n_no_tokens = int((~keep).sum())
    if n_no_tokens:
        lengths = lengths[keep]
        doc_bytes = doc_bytes[keep]
        line_nos = [ln for ln, k in zip(line_nos, keep) if k]
    ids16 = ids.astype("<u2")
    return {
        "n_lines": n_lines, "n_empty": n_empty + n_no_tokens,
        "lines": np.asarray(line_nos, dtype=np.int64), "doc_bytes": doc_bytes,
        "lengths": lengths, "ids": ids16,
        "counts": None if counts is None else counts.astype(np.int64),
        "hashes": doc_hashes(ids16, lengths),
    }


class OrderedPool:
    """Runs tasks on worker processes, yields results in submission order,
    with at most ``max_pending`` tasks in flight (bounded memory)."""

    def __init__(self, workers: int, initargs: tuple):
        self.workers = max(1, int(workers))
        self.pool = None
        if self.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(self.workers, _init_worker, initargs)
        else:
            _init_worker(*initargs)

    def imap(self, tasks):
        if self.pool is None:
            for t in tasks:
                yield _process(t)
            return
        pending = collections.deque()
        it = iter(tasks)
        done = False
        max_pending = 2 * self.workers + 1
        while True:
            while not done and len(pending) < max_pending:
                try:
                    t = next(it)
                except StopIteration:
                    done = True
                    break
                pending.append(self.pool.apply_async(_process, (t,)))
            if not pending:
                return
            yield pending.popleft().get()

    def run(self, task):
        """One task, now (to redo a result)."""
        return _process(task) if self.pool is None else self.pool.apply(_process, (task,))

    def close(self, terminate: bool = False):
        if self.pool is not None:
            if terminate:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------

def _existing_dataset_files(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_file() and (SHARD_RE.match(p.name) or p.name in (MANIFEST, TOKENIZER_FILE)))


def _settings_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_output_dir(out: Path, settings: dict, force: bool) -> None:
    """Refuse to overwrite a dataset made with other settings unless ``force``."""
    files = _existing_dataset_files(out)
    if not files or force:
        return
    man = out / MANIFEST
    if not man.is_file():
        raise DataError(f"--out {out}: holds dataset files ({files[0].name}, ...) but no {MANIFEST}, so its "
                        f"settings are unknown; pass --force to replace them or choose another --out")
    try:
        old = json.loads(man.read_text()).get("settings", {})
    except (ValueError, OSError) as e:
        raise DataError(f"--out {out}: unreadable {MANIFEST} ({e}); pass --force to replace the dataset") from None
    if old.get("demo") and settings.get("demo"):
        return  # --demo may always rebuild its own dataset
    diff = _settings_diff(old, settings)
    if diff:
        raise DataError(f"--out {out}: holds a dataset built with other settings ("
                        + "; ".join(diff) + "); pass --force to replace it or choose another --out")


def _install(partial: Path, out: Path) -> None:
    """Replace the dataset files in ``out`` by those in ``partial``."""
    for p in _existing_dataset_files(out):
        p.unlink()
    for p in sorted(partial.iterdir()):
        os.replace(p, out / p.name)
    partial.rmdir()


def _tokenizer_training_texts(docs_path, val_docs: int, plain: bool, max_chars: int, info: dict):
    """Train documents (after the first val_docs non-empty ones), CaseOps-transformed, up to max_chars."""
    df = DocsFile(docs_path)
    label = str(docs_path)
    seen = 0
    used_chars = 0
    try:
        for first_line, blob in df.blobs():
            texts, line_nos, _ = parse_blob(first_line, blob, label)
            for t, ln in zip(texts, line_nos):
                seen += 1
                if seen <= val_docs:
                    continue
                if info.get("first_line") is None:
                    info["first_line"] = ln
                if used_chars >= max_chars:
                    return
                t = t if plain else lossless_caps.encode(t)
                used_chars += len(t)
                info["docs"] = info.get("docs", 0) + 1
                info["chars"] = used_chars
                yield t
    finally:
        df.close()
    if seen <= val_docs:
        raise DataError(f"--val-docs {val_docs:,} but {docs_path} holds only {seen:,} non-empty documents; "
                        f"nothing is left for training (lower --val-docs)")


def build_dataset(docs, out, *, sp_model=None, vocab_size=None, val_docs=DEFAULT_VAL_DOCS,
                  shard_tokens=DEFAULT_SHARD_TOKENS, workers=None, plain=False, force=False,
                  max_train_shards=None, keep_val_duplicates=False,
                  tokenizer_train_chars=DEFAULT_TOKENIZER_TRAIN_CHARS, demo=False, quiet=False) -> dict:
    """Build a dataset directory; returns the manifest."""
    t0 = time.time()
    say = (lambda m: None) if quiet else log
    docs, out = Path(docs), Path(out)
    workers = default_workers() if workers is None else max(1, int(workers))
    if (sp_model is None) == (vocab_size is None):
        raise DataError("give exactly one of --sp MODEL (an existing tokenizer) or --vocab-size N (train one)")
    if val_docs < 1:
        raise DataError(f"--val-docs must be at least 1 (got {val_docs})")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be at least 1 (got {shard_tokens})")
    if max_train_shards is not None and max_train_shards < 1:
        raise DataError(f"--max-train-shards must be at least 1 (got {max_train_shards})")
    if vocab_size is not None and vocab_size > MAX_VOCAB:
        raise DataError(f"--vocab-size {vocab_size:,} is over {MAX_VOCAB:,}: uint16 shards cannot hold the ids")
    if not docs.is_file():
        raise DataError(f"--docs {docs}: no such file (expected a .jsonl, .jsonl.gz or .jsonl.xz file with "
                        f"one {{\"text\": ...}} object per line)")
    model_bytes = None
    if sp_model is not None:
        sp_model = Path(sp_model)
        if not sp_model.is_file():
            raise DataError(f"--sp {sp_model}: no such file (a SentencePiece .model)")
        model_bytes = sp_model.read_bytes()
        check_tokenizer(model_bytes, f"--sp {sp_model}", plain)

    settings = {
        "docs": str(docs.resolve()), "docs_size": docs.stat().st_size,
        "transform": "none" if plain else lossless_caps.TRANSFORM_NAME,
        "tokenizer": ({"file_sha256": hashlib.sha256(model_bytes).hexdigest()} if model_bytes is not None else
                      {"train_vocab_size": vocab_size, "train_chars": tokenizer_train_chars}),
        "val_docs": val_docs, "shard_tokens": shard_tokens, "max_train_shards": max_train_shards,
        "keep_val_duplicates": bool(keep_val_duplicates), "bos_id": BOS_ID,
    }
    if demo:
        settings["demo"] = True
    check_output_dir(out, settings, force)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL_DIR
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()

    tok_info: dict = {}
    if model_bytes is None:
        say(f"training a {vocab_size}-piece BPE tokenizer on train documents of {docs} ...")
        model_bytes = train_tokenizer(
            _tokenizer_training_texts(docs, val_docs, plain, tokenizer_train_chars, tok_info), vocab_size, plain)
        check_tokenizer(model_bytes, "trained tokenizer", plain)
        say(f"  trained on {tok_info.get('docs', 0):,} documents ({tok_info.get('chars', 0):,} chars) "
            f"in {time.time() - t0:.1f}s")
    (partial / TOKENIZER_FILE).write_bytes(model_bytes)
    vocab = load_sp(model_bytes).vocab_size()

    val_w = ShardWriter(partial, "val", shard_tokens)
    vb_w = ShardWriter(partial, "val_bytes", shard_tokens)
    train_w = ShardWriter(partial, "train", shard_tokens, max_train_shards)
    counts = collections.Counter()
    val_hashes: set[bytes] = set()
    dup_lines: list[int] = []
    val_lines = [None, None]
    first_train_line = None
    label = str(docs)
    df = DocsFile(docs)
    pool = OrderedPool(workers, (model_bytes, not plain, label))
    stopped_early = False
    last_report = time.time()
    in_bytes = 0
    state = {"val_done": False}
    sent = collections.deque()  # tasks whose results are still to come

    def tasks():
        # a blob gets val byte counts while it may hold val documents: while the
        # documents before it, at most (its first line - 1) less the empty ones
        # seen so far, may be fewer than val_docs.  Empty documents still in
        # flight can make that bound too high; such a blob is redone below.
        for first_line, blob in df.blobs():
            need = not state["val_done"] and first_line - 1 - counts["empty_docs_skipped"] < val_docs
            sent.append((first_line, blob, need))
            yield sent[-1]

    try:
        for res in pool.imap(tasks()):
            task = sent.popleft()
            if res["counts"] is None and not state["val_done"] and len(res["lengths"]):
                res = pool.run((task[0], task[1], True))  # holds val documents after all
            counts["lines"] += res["n_lines"]
            counts["empty_docs_skipped"] += res["n_empty"]
            n = len(res["lengths"])
            counts["docs_read"] += n
            lengths, ids, lines = res["lengths"], res["ids"], res["lines"]
            starts = np.concatenate([[0], np.cumsum(lengths)])
            k = 0
            if not state["val_done"]:
                k = min(n, val_docs - counts["val_docs"])
                if k:
                    t_end = int(starts[k])
                    c = res["counts"][:t_end]
                    if c.max(initial=0) > 0xFFFF:
                        bad = int(np.searchsorted(starts, int(np.argmax(c)), side="right") - 1)
                        raise DataError(f"{label}:{int(lines[bad])}: one token stands for {int(c.max()):,} "
                                        f"bytes (a huge whitespace run?), more than a uint16 sidecar holds")
                    val_w.append(with_bos(ids[:t_end], lengths[:k]))
                    vb_w.append(with_bos(c, lengths[:k], fill=0))
                    val_hashes.update(res["hashes"][:k])
                    counts["val_docs"] += k
                    counts["val_tokens"] += t_end + k
                    counts["val_bytes"] += int(res["doc_bytes"][:k].sum())
                    if val_lines[0] is None:
                        val_lines[0] = int(lines[0])
                    val_lines[1] = int(lines[k - 1])
                if counts["val_docs"] == val_docs:
                    state["val_done"] = True
                    val_w.close()
                    vb_w.close()
            if k < n:
                sel = np.arange(k, n)
                if not keep_val_duplicates and val_hashes:
                    dup = np.fromiter((res["hashes"][j] in val_hashes for j in sel), dtype=bool, count=len(sel))
                    if dup.any():
                        dup_lines.extend(int(x) for x in lines[sel[dup]][:max(0, 100 - len(dup_lines))])
                        counts["train_docs_dropped_val_duplicates"] += int(dup.sum())
                        sel = sel[~dup]
                if len(sel):
                    if first_train_line is None:
                        first_train_line = int(lines[sel[0]])
                    if len(sel) == n - k:
                        tok = ids[int(starts[k]):]
                    else:
                        tok = np.concatenate([ids[int(starts[j]):int(starts[j + 1])] for j in sel])
                    train_w.append(with_bos(tok, lengths[sel]))
                    counts["train_docs"] += len(sel)
                    counts["train_docs_bytes"] += int(res["doc_bytes"][sel].sum())
                    if train_w.full:
                        stopped_early = True
                        break
            in_bytes += int(res["doc_bytes"].sum())
            if not quiet and time.time() - last_report > 10:
                last_report = time.time()
                el = time.time() - t0
                say(f"  {counts['lines']:,} lines, {counts['val_docs']:,} val / {counts['train_docs']:,} train docs, "
                    f"{in_bytes / el / 1e6:.1f} MB/s")
    except BaseException:
        pool.close(terminate=True)
        df.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    pool.close(terminate=stopped_early)

    try:
        if counts["val_docs"] < val_docs:
            raise DataError(f"--val-docs {val_docs:,} but {docs} holds only {counts['val_docs']:,} non-empty documents "
                            f"({counts['empty_docs_skipped']:,} empty ones skipped); lower --val-docs")
        if counts["train_docs"] == 0:
            raise DataError(f"{docs}: no documents left for train after the first {val_docs:,} (val); "
                            f"lower --val-docs or add documents")
        if tok_info.get("first_line") is not None and tok_info["first_line"] <= val_lines[1]:
            raise DataError(f"{docs}: a document of the val split (line {tok_info['first_line']}) was used to train "
                            f"the tokenizer because it has no tokens after normalization; remove such documents")
        train_w.close()
        docs_sha, docs_size = df.finish()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        df.close()

    files = {}
    for w in (val_w, vb_w, train_w):
        for name, meta in w.files.items():
            files[name] = meta
    tok_sha = hashlib.sha256(model_bytes).hexdigest()
    manifest = {
        "format": "parameter-golf-token-shards",
        "shard_header": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_int32s": HEADER_INTS,
                         "token_dtype": "uint16-le"},
        "settings": settings,
        "inputs": {
            "docs": {"path": str(docs), "bytes": docs_size, "sha256": docs_sha},
            "tokenizer": {"source": str(sp_model) if sp_model is not None else "trained", "sha256": tok_sha},
        },
        "tokenizer": {"file": TOKENIZER_FILE, "vocab_size": vocab, "sha256": tok_sha, "bos_id": BOS_ID,
                      "caseops": not plain, **({"trained_on": tok_info} if tok_info else {})},
        "counts": {
            "lines": counts["lines"], "empty_docs_skipped": counts["empty_docs_skipped"],
            "val_docs": counts["val_docs"], "val_tokens": counts["val_tokens"], "val_bytes": counts["val_bytes"],
            "train_docs": counts["train_docs"], "train_tokens": train_w.tokens_written,
            "train_docs_bytes": counts["train_docs_bytes"],
            "train_docs_dropped_val_duplicates": counts["train_docs_dropped_val_duplicates"],
            "val_shards": len(val_w.files), "train_shards": len(train_w.files),
        },
        "split": {"val_first_line": val_lines[0], "val_last_line": val_lines[1],
                  "train_first_line": first_train_line, "stopped_early_at_max_train_shards": stopped_early,
                  "dropped_duplicate_lines": dup_lines[:100],
                  "doc_hash": "blake2b-128 of the document's uint16-le token ids (without BOS)"},
        "files": files,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _install(partial, out)
    el = time.time() - t0
    say(f"wrote {out}: {counts['val_docs']:,} val docs ({counts['val_tokens']:,} tokens, {len(val_w.files)} shard(s)), "
        f"{counts['train_docs']:,} train docs ({train_w.tokens_written:,} tokens, {len(train_w.files)} shard(s)), "
        f"{counts['empty_docs_skipped']:,} empty skipped, {counts['train_docs_dropped_val_duplicates']:,} train docs "
        f"dropped as copies of val docs; {el:.1f}s, {in_bytes / max(el, 1e-9) / 1e6:.2f} MB/s of text")
    return manifest


# --------------------------------------------------------------------------
# layout check and verify
# --------------------------------------------------------------------------

def check_layout(directory, *, train_shards=None, val_tokens=None, require_sidecar=True,
                 require_tokenizer=True) -> dict:
    """Check the files of a dataset directory: names, headers and sizes.

    ``train_shards``: exact number of train shards expected (None: at least 1).
    ``val_tokens``: exact val token count, or an inclusive (lo, hi) range.
    Raises LayoutError listing every problem; returns a summary otherwise.
    """
    d = Path(directory)
    problems: list[str] = []
    if not d.is_dir():
        raise LayoutError(d, [f"{d} is not a directory"])
    shards: dict[str, dict[int, int]] = {"train": {}, "val": {}, "val_bytes": {}}
    for p in sorted(d.iterdir()):
        m = SHARD_RE.match(p.name)
        if not m:
            continue
        kind, idx = m.group(1), int(m.group(2))
        size = p.stat().st_size
        if size < HEADER_BYTES:
            problems.append(f"{p.name}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
            continue
        magic, version, n = read_header(p)
        if magic != SHARD_MAGIC:
            problems.append(f"{p.name}: bad header magic {magic} (expected {SHARD_MAGIC})")
            continue
        if version != SHARD_VERSION:
            problems.append(f"{p.name}: bad header version {version} (expected {SHARD_VERSION})")
            continue
        if n < 0 or size != HEADER_BYTES + 2 * n:
            problems.append(f"{p.name}: size {size:,} bytes does not match its header's {n:,} tokens "
                            f"(expected {HEADER_BYTES + 2 * max(n, 0):,}); truncated or corrupt")
            continue
        shards[kind][idx] = n
    for kind, got in shards.items():
        if got and sorted(got) != list(range(len(got))):
            missing = sorted(set(range(max(got) + 1)) - set(got))
            problems.append(f"{kind} shards are not numbered 0..{len(got) - 1}: missing {shard_name(kind, missing[0])}")
    if not shards["val"]:
        problems.append("no val shard (fineweb_val_000000.bin)")
    if not shards["train"]:
        problems.append("no train shard (fineweb_train_000000.bin)")
    if train_shards is not None and len(shards["train"]) != train_shards:
        problems.append(f"{len(shards['train'])} train shards, expected {train_shards}")
    n_val = sum(shards["val"].values())
    if require_sidecar or shards["val_bytes"]:
        if not shards["val_bytes"]:
            problems.append("no val byte sidecar (fineweb_val_bytes_000000.bin)")
        else:
            n_vb = sum(shards["val_bytes"].values())
            if n_vb != n_val or len(shards["val_bytes"]) != len(shards["val"]):
                problems.append(f"sidecar length {n_vb:,} tokens in {len(shards['val_bytes'])} file(s) does not equal "
                                f"the val token count {n_val:,} in {len(shards['val'])} file(s)")
            else:
                for i, n in shards["val"].items():
                    if shards["val_bytes"].get(i) != n:
                        problems.append(f"{shard_name('val_bytes', i)} holds {shards['val_bytes'].get(i)} tokens, "
                                        f"{shard_name('val', i)} {n}")
    if val_tokens is not None and shards["val"]:
        lo, hi = (val_tokens, val_tokens) if isinstance(val_tokens, int) else val_tokens
        if not lo <= n_val <= hi:
            want = f"{lo:,}" if lo == hi else f"{lo:,}..{hi:,}"
            problems.append(f"val holds {n_val:,} tokens, expected {want}")
    vocab = None
    if require_tokenizer:
        tp = d / TOKENIZER_FILE
        if not tp.is_file():
            problems.append(f"no {TOKENIZER_FILE}")
        else:
            try:
                vocab = load_sp(tp.read_bytes()).vocab_size()
            except Exception as e:
                problems.append(f"{TOKENIZER_FILE}: not a SentencePiece model ({e})")
    if problems:
        raise LayoutError(d, problems)
    return {"train_shards": len(shards["train"]), "train_tokens": sum(shards["train"].values()),
            "val_shards": len(shards["val"]), "val_tokens": n_val, "sidecar": bool(shards["val_bytes"]),
            "vocab_size": vocab}


def _shards(d: Path, kind: str) -> list[Path]:
    return sorted(p for p in d.iterdir() if (m := SHARD_RE.match(p.name)) and m.group(1) == kind)


def _iter_docs(paths, on_shard=None):
    """Yield (shard_name, offset, tokens) for each BOS-delimited document of a
    stream of shards (documents may continue across shards).  Tokens before
    the first BOS of the stream are yielded with offset -1.  ``on_shard`` is
    called with (path, tokens) for every shard."""
    cur = None  # [shard name, offset, list of token arrays]
    for p in paths:
        t = np.asarray(read_tokens(p))
        if on_shard is not None:
            on_shard(p, t)
        bos = np.flatnonzero(t == BOS_ID).tolist()
        head_end = bos[0] if bos else len(t)
        if cur is None and head_end > 0:
            cur = [p.name, -1, []]
        if cur is not None:
            cur[2].append(t[:head_end])
        for j, b in enumerate(bos):
            if cur is not None:
                yield cur[0], cur[1], np.concatenate(cur[2])
            end = bos[j + 1] if j + 1 < len(bos) else len(t)
            cur = [p.name, b, [t[b + 1:end]]]
    if cur is not None:
        yield cur[0], cur[1], np.concatenate(cur[2])


def _hash_tokens(t: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(t, dtype="<u2").tobytes(), digest_size=16).digest()


def verify_dataset(directory, docs=None, workers=None, quiet=False) -> list[str]:
    """Check a dataset directory; return the list of problems (empty = OK)."""
    say = (lambda m: None) if quiet else log
    d = Path(directory)
    try:
        summary = check_layout(d)
    except LayoutError as e:
        return e.problems
    problems: list[str] = []
    manifest = None
    if (d / MANIFEST).is_file():
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except ValueError as e:
            problems.append(f"{MANIFEST}: unreadable ({e})")
    model_bytes = (d / TOKENIZER_FILE).read_bytes()
    sp = load_sp(model_bytes)
    vocab = sp.vocab_size()
    caseops = True
    if manifest is not None:
        caseops = manifest.get("settings", {}).get("transform", lossless_caps.TRANSFORM_NAME) != "none"
        for name, meta in manifest.get("files", {}).items():
            p = d / name
            if not p.is_file():
                problems.append(f"{name}: listed in {MANIFEST} but missing")
            elif sha256_file(p) != meta.get("sha256"):
                problems.append(f"{name}: sha256 differs from {MANIFEST} (file changed after the build)")
        if manifest.get("files"):
            for p in sorted(d.iterdir()):
                if SHARD_RE.match(p.name) and p.name not in manifest["files"]:
                    problems.append(f"{p.name}: not listed in {MANIFEST} (not written by this build)")
        if manifest.get("tokenizer", {}).get("sha256") not in (None, hashlib.sha256(model_bytes).hexdigest()):
            problems.append(f"{TOKENIZER_FILE}: sha256 differs from {MANIFEST}")
    else:
        try:
            lossless_caps.operator_ids(sp)
        except ValueError:
            caseops = False

    # -- val stream: BOS, ids, sidecar ------------------------------------------
    val_paths, vb_paths, train_paths = _shards(d, "val"), _shards(d, "val_bytes"), _shards(d, "train")
    val = np.concatenate([np.asarray(read_tokens(p)) for p in val_paths])
    side = np.concatenate([np.asarray(read_tokens(p)) for p in vb_paths])
    if len(val) == 0 or val[0] != BOS_ID:
        problems.append("val stream does not start with BOS (id 1): its first document has no BOS")
    if val.size and int(val.max()) >= vocab:
        problems.append(f"val holds token id {int(val.max())} >= vocab size {vocab}")
    bos_pos = np.flatnonzero(val == BOS_ID)
    if side.size == val.size and np.any(side[bos_pos] != 0):
        problems.append("sidecar is not 0 at every BOS position")
    side_sum = int(side.astype(np.int64).sum())
    n_val_docs = len(bos_pos)
    if manifest is not None:
        mc = manifest.get("counts", {})
        if mc.get("val_docs") is not None and mc["val_docs"] != n_val_docs:
            problems.append(f"val holds {n_val_docs:,} BOS-delimited documents but {MANIFEST} says "
                            f"{mc['val_docs']:,} (a missing or extra BOS at a document start)")
        if mc.get("val_bytes") is not None and mc["val_bytes"] != side_sum:
            problems.append(f"sidecar sum {side_sum:,} != val bytes {mc['val_bytes']:,} recorded in {MANIFEST}")
    say(f"val: {len(val):,} tokens, {n_val_docs:,} documents, sidecar sum {side_sum:,} bytes")

    # -- val documents vs train documents (content hash of the token sequence) ------
    val_hash: dict[bytes, int] = {}
    for i, (_, off, toks) in enumerate(_iter_docs(val_paths)):
        if off >= 0:
            val_hash.setdefault(_hash_tokens(toks), i)
    leaks = []
    n_train_docs = 0
    first = True

    def check_ids(p, t):
        if t.size and int(t.max()) >= vocab:
            problems.append(f"{p.name}: token id {int(t.max())} >= vocab size {vocab}")

    for shard, off, toks in _iter_docs(train_paths, check_ids):
        if first and off < 0:
            problems.append(f"train stream does not start with BOS: {shard} begins inside a document")
        first = False
        n_train_docs += 1
        if off >= 0:
            j = val_hash.get(_hash_tokens(toks))
            if j is not None:
                leaks.append(f"val document {j} at {shard} token {off}")
    if leaks:
        problems.append(f"{len(leaks)} validation document(s) occur in the train shards (same content hash): "
                        + "; ".join(leaks[:5]) + (" ..." if len(leaks) > 5 else ""))
    say(f"train: {summary['train_tokens']:,} tokens, {n_train_docs:,} documents; "
        f"{len(leaks)} copies of val documents")

    # -- against the source documents -------------------------------------------------
    if docs is not None:
        problems += _verify_against_docs(d, Path(docs), model_bytes, caseops, val, side, n_val_docs,
                                         manifest, train_paths, workers, say)
    return problems


def _verify_against_docs(d, docs, model_bytes, caseops, val, side, n_val_docs, manifest, train_paths,
                         workers, say) -> list[str]:
    problems = []
    if not docs.is_file():
        return [f"--docs {docs}: no such file"]
    workers = default_workers() if workers is None else workers
    df = DocsFile(docs)
    pool = OrderedPool(workers, (model_bytes, caseops, str(docs)))
    pos = 0  # position in the val stream
    k = 0  # val docs checked
    doc_bytes = 0
    mismatch = None
    next_doc = None
    keep_dups = bool(manifest and manifest.get("settings", {}).get("keep_val_duplicates"))
    val_hashes = set()
    state = {"done": False}

    def tasks():
        for first_line, blob in df.blobs():
            yield first_line, blob, not state["done"]

    try:
        for res in pool.imap(tasks()):
            starts = np.concatenate([[0], np.cumsum(res["lengths"])])
            for j in range(len(res["lengths"])):
                tok = res["ids"][starts[j]:starts[j + 1]]
                ln = int(res["lines"][j])
                if k < n_val_docs:
                    exp = np.concatenate([[BOS_ID], tok])
                    got = val[pos:pos + len(exp)]
                    if mismatch is None:
                        if len(got) < len(exp) or not np.array_equal(got, exp):
                            if pos >= len(val) or val[pos] != BOS_ID:
                                mismatch = f"missing BOS at the start of val document {k} (line {ln}), val token {pos}"
                            else:
                                mismatch = (f"val document {k} (val token {pos}) is not the tokenization of "
                                            f"document {k} of {docs} (line {ln}): val must be the first "
                                            f"{n_val_docs:,} documents in file order")
                        else:
                            exp_b = np.concatenate([[0], res["counts"][starts[j]:starts[j + 1]]])
                            if not np.array_equal(side[pos:pos + len(exp_b)], exp_b):
                                bad = int(np.flatnonzero(side[pos:pos + len(exp_b)] != exp_b)[0])
                                problems.append(f"sidecar value at val token {pos + bad} (document {k}, line {ln}) "
                                                f"is {int(side[pos + bad])}, expected {int(exp_b[bad])}")
                    doc_bytes += int(res["doc_bytes"][j])
                    val_hashes.add(res["hashes"][j])
                    pos += len(exp)
                    k += 1
                    if k == n_val_docs:
                        state["done"] = True
                elif keep_dups or res["hashes"][j] not in val_hashes:
                    next_doc = (ln, tok)
                    break
            if next_doc is not None:
                break
    finally:
        pool.close(terminate=True)
        df.close()
    if mismatch:
        problems.append(mismatch)
    if k < n_val_docs:
        problems.append(f"val holds {n_val_docs:,} documents but {docs} has only {k:,} non-empty documents")
    elif pos != len(val) and not mismatch:
        problems.append(f"val stream has {len(val) - pos:,} tokens after its {n_val_docs:,} documents")
    side_sum = int(side.astype(np.int64).sum())
    if side_sum != doc_bytes:
        problems.append(f"sidecar sum {side_sum:,} != {doc_bytes:,} UTF-8 bytes of the first {k:,} "
                        f"(stripped) documents of {docs}")
    if next_doc is not None and train_paths:
        ln, tok = next_doc
        exp = np.concatenate([[BOS_ID], tok])
        head = np.asarray(read_tokens(train_paths[0]))[:len(exp)]
        if not np.array_equal(head, exp[:len(head)]):
            problems.append(f"train does not start with document {n_val_docs} of {docs} (line {ln}), "
                            f"the first one after val")
    say(f"checked {k:,} val documents against {docs}: {doc_bytes:,} bytes")
    return problems


# --------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------

class HuggingFaceHub:
    """The two network calls --download makes (tests substitute a fake)."""

    def __init__(self):
        try:
            importlib.import_module("huggingface_hub")
        except ImportError:
            raise DataError("--download needs the huggingface_hub package: pip install huggingface_hub") from None

    def list_files(self, repo_id: str) -> list[str]:
        from huggingface_hub import HfApi

        return list(HfApi().list_repo_files(repo_id, repo_type="dataset"))

    def fetch(self, repo_id: str, filename: str, local_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=str(local_dir)))


def download_caseops(out=DEFAULT_DOWNLOAD_DIR, *, repo_id=HF_REPO_ID, dataset=HF_DATASET_NAME,
                     train_shards=HF_TRAIN_SHARDS, val_tokens=None, hub=None, force=False, quiet=False) -> dict:
    """Fetch the published CaseOps export into ``out`` and check its layout."""
    say = (lambda m: None) if quiet else log
    out = Path(out)
    settings = {"source": f"hf://datasets/{repo_id}", "dataset": dataset, "train_shards": train_shards}
    check_output_dir(out, settings, force)
    hub = hub if hub is not None else HuggingFaceHub()
    files = hub.list_files(repo_id)
    prefix = f"{HF_REMOTE_ROOT}/datasets/{dataset}/"
    want = []
    for f in files:
        if not f.startswith(prefix):
            continue
        m = SHARD_RE.match(f[len(prefix):])
        if m and (m.group(1) != "train" or int(m.group(2)) < train_shards):
            want.append(f)
    n_train = sum(1 for f in want if "_train_" in f)
    if n_train < train_shards:
        raise DataError(f"{repo_id}: has {n_train} train shards under {prefix}, fewer than the {train_shards} asked for")
    tok_candidates = [f for f in files if f == f"{HF_REMOTE_ROOT}/tokenizers/{HF_TOKENIZER_NAME}"] or \
        sorted(f for f in files if f.startswith(f"{HF_REMOTE_ROOT}/tokenizers/") and "caseops" in f and f.endswith(".model"))
    if not tok_candidates:
        raise DataError(f"{repo_id}: no CaseOps tokenizer under {HF_REMOTE_ROOT}/tokenizers/")
    out.mkdir(parents=True, exist_ok=True)
    cache = out / ".hf_download"
    for i, f in enumerate(sorted(want) + [tok_candidates[0]]):
        is_tok = f == tok_candidates[0]
        dst = out / (TOKENIZER_FILE if is_tok else Path(f).name)
        if dst.is_file() and dst.stat().st_size > 0:
            continue
        say(f"  [{i + 1}/{len(want) + 1}] {f}")
        src = hub.fetch(repo_id, f, cache)
        try:
            os.replace(src, dst)  # same file system: a rename
        except OSError:
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    shutil.rmtree(cache, ignore_errors=True)
    if out.parent.name == "datasets":  # the usual data/datasets/<name> layout: also data/tokenizers/<name>.model
        tdir = out.parent.parent / "tokenizers"
        tdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / TOKENIZER_FILE, tdir / Path(tok_candidates[0]).name)
    if val_tokens is None:
        val_tokens = (HF_VAL_TARGET_TOKENS + 1, HF_VAL_TARGET_TOKENS + HF_VAL_SEQ_LEN)
    summary = check_layout(out, train_shards=train_shards, val_tokens=val_tokens)
    manifest = {"format": "parameter-golf-token-shards", "settings": settings,
                "inputs": {"repo_id": repo_id, "files": sorted(want) + [tok_candidates[0]]},
                "counts": {"val_tokens": summary["val_tokens"], "train_tokens": summary["train_tokens"],
                           "val_shards": summary["val_shards"], "train_shards": summary["train_shards"]},
                "tokenizer": {"file": TOKENIZER_FILE, "vocab_size": summary["vocab_size"], "caseops": True,
                              "sha256": sha256_file(out / TOKENIZER_FILE)}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    say(f"downloaded {repo_id} into {out}: layout OK ({summary['train_shards']} train shards, "
        f"{summary['val_tokens']:,} val tokens with sidecar)")
    return summary


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------

_TRIPLE = re.compile(r'(?s)(?<![bB])("""|\'\'\')(.*?)\1')


def demo_documents(min_chars: int = 100) -> list[str]:
    """Real English text shipped with Python: the pydoc topics and stdlib docstrings."""
    import inspect
    import random
    import sysconfig

    import pydoc_data.topics

    docs = [v for _, v in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages"}
    for p in sorted(root.rglob("*.py")):
        if skip & set(p.relative_to(root).parts):
            continue
        try:
            src = p.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for m in _TRIPLE.finditer(src):
            text = inspect.cleandoc(m.group(2))
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) >= min_chars and letters >= 0.75 * len(text):
                docs.append(text)
    seen, unique = set(), []
    for t in docs:
        t = t.strip()
        if t and t not in seen:
            seen.add(t)
            unique.append(t)
    random.Random(1234).shuffle(unique)
    return unique


def build_demo(out=DEFAULT_DEMO_DIR, *, vocab_size=1024, val_docs=300, shard_tokens=500_000, workers=None,
               force=False, quiet=False) -> dict:
    out = Path(out)
    docs = demo_documents()
    out.mkdir(parents=True, exist_ok=True)
    docs_path = out / "demo_docs.jsonl"
    with open(docs_path, "w", encoding="utf-8") as f:
        for t in docs:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return build_dataset(docs_path, out, vocab_size=vocab_size, val_docs=min(val_docs, len(docs) // 4),
                         shard_tokens=shard_tokens, workers=workers, force=force, demo=True, quiet=quiet)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--verify", metavar="DIR", help="check a dataset directory (with --docs: against its source)")
    mode.add_argument("--demo", action="store_true", help=f"build a small dataset from Python's own docs into {DEFAULT_DEMO_DIR}/")
    mode.add_argument("--download", action="store_true", help=f"fetch {HF_REPO_ID} into {DEFAULT_DOWNLOAD_DIR}/")
    ap.add_argument("--docs", metavar="FILE", help=".jsonl / .jsonl.gz / .jsonl.xz, one {\"text\": ...} per line")
    ap.add_argument("--out", metavar="DIR", help="output dataset directory")
    tok = ap.add_mutually_exclusive_group()
    tok.add_argument("--sp", metavar="MODEL", help="existing SentencePiece model")
    tok.add_argument("--vocab-size", type=int, metavar="N", help="train a BPE tokenizer of N pieces on the train docs")
    ap.add_argument("--val-docs", type=int, default=DEFAULT_VAL_DOCS, help="first N documents go to val (default 50000)")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (default 10000000)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores); output does not depend on it")
    ap.add_argument("--plain", action="store_true", help="no CaseOps transform (plain SentencePiece model); still writes a sidecar")
    ap.add_argument("--max-train-shards", type=int, default=None, metavar="K",
                    help="stop after K full train shards (--download: how many to fetch, default 80)")
    ap.add_argument("--keep-val-duplicates", action="store_true",
                    help="keep train documents identical to a val document (the reference pipeline does)")
    ap.add_argument("--tokenizer-train-chars", type=int, default=DEFAULT_TOKENIZER_TRAIN_CHARS,
                    help="with --vocab-size: characters of train text to train on (default 1e8)")
    ap.add_argument("--force", action="store_true", help="replace a dataset in --out built with other settings")
    args = ap.parse_args(argv)
    try:
        if args.verify:
            problems = verify_dataset(args.verify, docs=args.docs, workers=args.workers)
            if problems:
                print(f"VERIFY FAILED: {args.verify}", file=sys.stderr)
                for p in problems:
                    print(f"  - {p}", file=sys.stderr)
                return 1
            print(f"verify OK: {args.verify}")
            return 0
        if args.demo:
            build_demo(args.out or DEFAULT_DEMO_DIR, workers=args.workers, force=args.force)
            return 0
        if args.download:
            download_caseops(args.out or DEFAULT_DOWNLOAD_DIR, force=args.force,
                             train_shards=args.max_train_shards or HF_TRAIN_SHARDS)
            return 0
        if not args.docs or not args.out:
            ap.error("building needs --docs FILE and --out DIR (or use --verify, --demo or --download)")
        build_dataset(args.docs, args.out, sp_model=args.sp, vocab_size=args.vocab_size, val_docs=args.val_docs,
                      shard_tokens=args.shard_tokens, workers=args.workers, plain=args.plain, force=args.force,
                      max_train_shards=args.max_train_shards, keep_val_duplicates=args.keep_val_duplicates,
                      tokenizer_train_chars=args.tokenizer_train_chars)
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
