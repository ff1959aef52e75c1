"""GPU checks of the fused paths against their eager references (run on the device machine, not in CI).
Prints one line per check and exits non-zero on a failure."""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import train_gpt as T

dev = torch.device("cuda")
fails = []


def check(name, a, b, tol):
    err = ((a.float() - b.float()).norm() / (b.float().norm() + 1e-12)).item()
    ok = err < tol and torch.isfinite(a).all().item()
    print(f"{'OK ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        fails.append(name)


# fused softcapped CE vs eager, fwd + bwd, bf16 logits
for V in (8192, 1000):
    z = (torch.randn(4096, V, device=dev) * 8).bfloat16().requires_grad_()
    y = torch.randint(0, V, (4096,), device=dev)
    l1 = T.SoftcapCE.apply(z, y, 30.0); l1.sum().backward(); g1 = z.grad.clone(); z.grad = None
    l2 = T.softcap_ce_eager(z, y, 30.0); l2.sum().backward(); g2 = z.grad.clone()
    check(f"fused CE loss V={V}", l1, l2, 1e-5); check(f"fused CE grad V={V}", g1, g2, 1e-2)

# attention backends: forward and gradients vs fp32 masked SDPA on packed docs (the self-check ATTN_BACKEND=auto runs)
for b in ("fa3", "fa4", "varlen"):
    try:
        T.pick_attention(b, dev)
    except SystemExit as e:
        print(f"skip {b}: {e}"); continue
    ok = T.attention_agrees(b, dev, (8, 4, 64), print)
    print(f"{'OK ' if ok else 'FAIL'} attention {b}: forward and gradients vs SDPA (rel err < 2e-2)", flush=True)
    if not ok:
        fails.append(f"attention {b}")
print("varlen_attn params:", sorted(T.VARLEN_PARAMS))
print("GPU CHECKS:", "FAILED " + ", ".join(fails) if fails else "all passed", flush=True)
sys.exit(1 if fails else 0)
