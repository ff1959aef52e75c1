"""Profile one training step at the record configuration (device machine): a table of where the time goes."""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import train_gpt as T

cfg = T.Config()
rt = T.Runtime(0, 1, 0, torch.device("cuda"), True)
m = T.GPT(cfg).cuda()
m.attn_backend = T.pick_attention(cfg.attn_backend, rt.device)
tr = T.Trainer(cfg, rt, m)
m.looping = os.environ.get("PROFILE_LOOPING", "0") == "1"
for s in range(4):
    tr.train_step(s, 0.0)
torch.cuda.synchronize()
t = time.perf_counter()
for s in range(3):
    tr.train_step(s, 0.0)
torch.cuda.synchronize()
print(f"step time {(time.perf_counter() - t) / 3:.3f}s looping={m.looping} backend={m.attn_backend}")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    tr.train_step(0, 0.0); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=int(os.environ.get("ROWS", "30")), max_name_column_width=70))
