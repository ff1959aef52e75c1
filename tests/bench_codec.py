"""Benchmark the artifact codec against brotli-11 and lzma-9e on a record-size synthetic state.

usage: python tests/bench_codec.py [--skip-baselines] [--colvar 0.3] [--dof 5] [--state PATH | --artifact model.ptz]
  --colvar S : multiply each matrix column by exp(S*N(0,1)) (column-heterogeneous variant)
  --state P  : measure a real quantized state instead (torch.load -> dict of tensors)
  --artifact A: measure the quantized state inside a run's model.ptz (decoded, then encoded again)
"""
import argparse
import json
import lzma
import os
import struct
import sys
import time

import brotli
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_gpt import pack_state, unpack_state  # noqa: E402


def quantize(w, clip_sigmas, qmax):
    s = (clip_sigmas * w.std(1, keepdims=True) / qmax).astype(np.float32)
    q = np.clip(np.round(w / s), -qmax, qmax).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(s[:, 0].astype(np.float16))


def make_state(seed=0, dof=5.0, colvar=0.0, layers=11, dim=512, vocab=8192):
    rng = np.random.default_rng(seed)
    st = {}

    def mat(r, c):
        w = rng.standard_t(dof, size=(r, c)).astype(np.float32)
        return w * np.exp(colvar * rng.standard_normal(c)).astype(np.float32) if colvar else w

    st["tok_emb.q"], st["tok_emb.scale"] = quantize(mat(vocab, dim), 14.0, 63)
    shapes = dict(q=(dim, dim), k=(dim // 2, dim), v=(dim // 2, dim), o=(dim, dim),
                  up=(4 * dim, dim), down=(dim, 4 * dim))
    for i in range(layers):
        for nm, (r, c) in shapes.items():
            st[f"blocks.{i}.{nm}.q"], st[f"blocks.{i}.{nm}.scale"] = quantize(mat(r, c), 12.85, 31)
    for j in range(200):  # small fp16 vectors: norm gains, gates, biases
        v = 1 + 0.1 * rng.standard_normal(dim) if j % 2 else 0.02 * rng.standard_normal(dim)
        st[f"small.{j}"] = torch.from_numpy(v.astype(np.float16))
    return st


def raw_bytes(st):
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in st.values())


def timed(fn, *a):
    t = time.perf_counter()
    r = fn(*a)
    return r, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--colvar", type=float, default=0.0)
    ap.add_argument("--dof", type=float, default=5.0)
    ap.add_argument("--state", default=None)
    ap.add_argument("--artifact", default=None)
    args = ap.parse_args()
    if args.artifact:
        with open(args.artifact, "rb") as f:
            st = unpack_state(f.read())
    elif args.state:
        st = {k: v for k, v in torch.load(args.state, map_location="cpu").items() if torch.is_tensor(v)}
    else:
        st = make_state(dof=args.dof, colvar=args.colvar)
    n_int = sum(t.numel() for t in st.values() if not t.is_floating_point())
    n_flt = sum(t.numel() for t in st.values() if t.is_floating_point())
    ent = 0.0
    for t in st.values():
        if not t.is_floating_point():
            c = np.bincount(t.numpy().ravel().astype(np.int64) + 128).astype(np.float64)
            c = c[c > 0]
            ent += float((c * np.log2(c.sum() / c)).sum()) / 8
    print(f"state: {len(st)} tensors, {n_int:,} int symbols, {n_flt:,} float values; "
          f"order-0 per-tensor entropy of ints = {ent:,.0f} B")
    raw = raw_bytes(st)
    rows = []
    if not args.skip_baselines:
        z, te = timed(brotli.compress, raw, 0, 11, 24)
        _, td = timed(brotli.decompress, z)
        rows.append(("brotli q11 lgwin24 (raw bytes)", len(z), te, td))
        filt = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        z, te = timed(lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=filt), raw)
        _, td = timed(lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=filt), z)
        rows.append(("lzma 9|EXTREME (raw bytes)", len(z), te, td))
    blob, te = timed(pack_state, st)
    back, td = timed(unpack_state, blob)
    ok = list(back) == list(st) and all(
        back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v) for k, v in st.items())
    rows.append(("codec pack_state/unpack_state", len(blob), te, td))
    print(f"{'method':34s} {'bytes':>12s} {'enc s':>7s} {'dec s':>7s}")
    for name, n, te, td in rows:
        print(f"{name:34s} {n:12,d} {te:7.2f} {td:7.2f}")
    hlen = struct.unpack("<I", blob[8:12])[0]
    head = json.loads(brotli.decompress(blob[12:12 + hlen]).split(b"\n", 1)[0])
    ks = [len(set(m["b"])) or 1 for m in head["t"] if "lo" in m]
    print(f"round trip bit-exact: {ok}; codec overhead vs int entropy: {len(blob) - ent:,.0f} B")
    print(f"breakdown: header {hlen:,} B | raw stream ({head['m']}) {head['z']:,} B | rANS words {2 * head['w']:,} B"
          f" | lane states {4 * head['L']:,} B (minus {min(head['z'], 2 * head['L']):,} B carried) | "
          f"buckets per coded tensor: " + ", ".join(f"K={k}:{ks.count(k)}" for k in sorted(set(ks))))


if __name__ == "__main__":
    main()
