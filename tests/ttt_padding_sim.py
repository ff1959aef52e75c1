"""Work of the TTT LoRA forwards on a val set, counted on CPU without running the model (not CI).

    DATA_PATH=... [TTT_* settings] python tests/ttt_padding_sim.py [--rows pow2|x8]

Runs the real phased-TTT plan (TTT.phased, TTT.lora_batch, lora_shapes) with the forwards, the global SGD phases
and the adapters replaced by stubs, and prints the row tokens the forwards need, the padded tokens they compute
with the CUDA-graph padding, and the number of distinct graph shapes. --rows x8 evaluates a candidate rule (exact
row counts up to 16, then multiples of 8) in place of powers of two."""
import argparse, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import train_gpt as T

ap = argparse.ArgumentParser()
ap.add_argument("--rows", choices=["pow2", "x8"], default="pow2")
args = ap.parse_args()
cfg = T.Config()
val = np.concatenate([np.asarray(T.read_shard(f)) for f in T.list_shards(cfg.data_path, "val")]).astype(np.int64)
rt = T.Runtime(0, 1, 0, torch.device("cpu"), True)
if args.rows == "x8":
    shapes = T.lora_shapes

    def x8(n, L, max_tokens, pad):
        for j, k, B, Lb in shapes(n, L, max_tokens, pad):
            yield j, k, min(B, k if k <= 16 else -(-k // 8) * 8), Lb
    T.lora_shapes = x8
seen, tot = set(), dict(rows=0, padded=0, forwards=0)


class Stub(T.TTT):
    def new_adapters(self, n):
        return [torch.zeros(n, 1, 1) for _ in range(2 * (5 * cfg.num_layers + 1))], [torch.zeros(n, 1, 1)]

    def lora_step(self, ps, vs, meta, L, rows, train):
        tot["rows"] += sum(e - s for s, e, _ in rows)
        tot["padded"] += ps[0].shape[0] * L
        tot["forwards"] += 1

    def sgd(self, lo, hi, *a, **k):
        self.rate["sgd"] = 0.0


T.TTT.pad_always = True
orig = T.lora_shapes


def record(n, L, max_tokens, pad):
    for j, k, B, Lb in orig(n, L, max_tokens, pad):
        seen.add((j, B, Lb))
        yield j, k, B, Lb


T.lora_shapes = record
ttt = Stub(torch.nn.Linear(1, 1), None, val, cfg, rt, float("inf"))
ttt.phased()
print(f"--rows {args.rows}: {len(T.doc_ranges(val)):,} docs; LoRA forwards need {tot['rows'] / 1e6:.2f}M row tokens, "
      f"compute {tot['padded'] / 1e6:.2f}M padded tokens (x{tot['padded'] / tot['rows']:.3f}) in {tot['forwards']:,} "
      f"forwards of {len(seen)} distinct shapes (CUDA graphs)")
