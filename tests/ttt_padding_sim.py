"""Work of the TTT LoRA forwards on a val set, counted on CPU without running the model (not CI).

    DATA_PATH=... [TTT_PAD_ROWS=x8|pow2] [TTT_* settings] python tests/ttt_padding_sim.py

Runs the real phased-TTT plan (TTT.phased, TTT.lora_batch, lora_shapes) with the forwards, the global SGD phases
and the adapters replaced by stubs, and prints the row tokens the forwards need, the padded tokens they compute
with the CUDA-graph padding, and the number of distinct graph shapes (TTT_PAD_ROWS: the row-count rule)."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import train_gpt as T

cfg = T.Config()
val = np.concatenate([np.asarray(T.read_shard(f)) for f in T.list_shards(cfg.data_path, "val")]).astype(np.int64)
rt = T.Runtime(0, 1, 0, torch.device("cpu"), True)
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


def record(*a):
    for j, k, B, Lb in orig(*a):
        seen.add((j, B, Lb))
        yield j, k, B, Lb


T.lora_shapes = record
ttt = Stub(torch.nn.Linear(1, 1), None, val, cfg, rt, float("inf"))
ttt.phased()
print(f"TTT_PAD_ROWS={cfg.ttt_pad_rows}: {len(T.doc_ranges(val)):,} docs; LoRA forwards need {tot['rows'] / 1e6:.2f}M row tokens, "
      f"compute {tot['padded'] / 1e6:.2f}M padded tokens (x{tot['padded'] / tot['rows']:.3f}) in {tot['forwards']:,} "
      f"forwards of {len(seen)} distinct shapes (CUDA graphs)")
