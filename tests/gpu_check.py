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

# TTT's AdamW (lora_adamw_, PyTorch's fused kernel) replayed in a CUDA graph vs torch.optim.AdamW, 4 steps, rank 80
ps = [torch.randn(64, 512, 80, device=dev), torch.randn(64, 80, 8192, device=dev) * 0.01]
ref = [p.clone().requires_grad_() for p in ps]
opt = torch.optim.AdamW(ref, lr=1e-4, betas=(0.0, 0.99), weight_decay=0.5)
vs, gs, t = [torch.zeros_like(p) for p in ps * 2], [torch.zeros_like(p) for p in ps], torch.zeros((), device=dev)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):  # warm-up on copies, as TTT.replay
    T.lora_adamw_([p.clone() for p in ps], [g.clone() for g in gs], [v.clone() for v in vs], t, 1e-4, 0.5)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    T.lora_adamw_(ps, gs, vs, t, 1e-4, 0.5)
for step in range(1, 5):
    for g, r in zip(gs, ref):
        g.copy_(torch.randn_like(g) * 0.1)
        r.grad = g.clone()
    opt.step()
    t.fill_(step)
    graph.replay()
for i, (p, r) in enumerate(zip(ps, ref)):
    check(f"lora_adamw_ in a CUDA graph, tensor {i}", p, r.detach(), 1e-6)

# eager Triton kernels of TTT (LeakySq, XSAGate) vs autograd of their torch math in fp64, bf16 inputs at record shapes
u = (torch.randn(8192, 2048, device=dev) * 2).bfloat16().requires_grad_()
g = torch.randn(8192, 2048, device=dev).bfloat16()
h = T.LeakySq.apply(u, 0.5); du, = torch.autograd.grad(h, u, g)
u64 = u.detach().double().requires_grad_()
h64 = torch.nn.functional.leaky_relu(u64, 0.5).square(); du64, = torch.autograd.grad(h64, u64, g.double())
check("LeakySq forward", h, h64, 1e-2); check("LeakySq backward", du, du64, 1e-2)
B, L, H, KV, D = 4, 2048, 8, 4, 64
y, v = torch.randn(B, L, H, D, device=dev).bfloat16(), torch.randn(B, L, KV, D, device=dev).bfloat16()
gate, go, t = torch.rand(B, L, H, device=dev).bfloat16(), torch.randn(B, L, H, D, device=dev).bfloat16(), torch.tanh(torch.randn(H, device=dev))
ins = [x.requires_grad_() for x in (y, v, gate)]
out = T.XSAGate.apply(ins[0], ins[1], t, ins[2]); grads = torch.autograd.grad(out, ins, go)
i64 = [x.detach().double().requires_grad_() for x in (y, v, gate)]
vh = torch.nn.functional.normalize(i64[1], dim=-1).repeat_interleave(H // KV, 2)
ref = (i64[0] - t.double()[:, None] * (i64[0] * vh).sum(-1, keepdim=True) * vh) * i64[2][..., None]
check("XSAGate forward", out, ref, 1e-2)
for name, a, b in zip(("dy", "dv", "dgate"), grads, torch.autograd.grad(ref, i64, go.double())):
    check(f"XSAGate {name}", a, b, 1e-2)

rot = T.Rotary(16, 10000.0).to(dev)
pos = torch.randint(0, 4096, (B, L), device=dev)
for gain in (torch.randn(H, device=dev), None):
    x = torch.randn(B, L, H, D, device=dev).bfloat16().requires_grad_()
    out = T.QKNormRope.apply(x, rot.cos, rot.sin, pos, gain); dx, = torch.autograd.grad(out, x, go)
    x64 = x.detach().double().requires_grad_()
    ref = rot(torch.nn.functional.rms_norm(x64, (D,), eps=1e-6), pos) * (1 if gain is None else gain.double()[:, None])
    check(f"QKNormRope forward (gain {gain is not None})", out, ref, 1e-2)
    check(f"QKNormRope backward (gain {gain is not None})", dx, torch.autograd.grad(ref, x64, go.double())[0], 1e-2)

for k, s, D, wt in ((2, 0.7, 512, torch.float32), (3, None, 512, torch.float32), (3, 0.7, 768, torch.bfloat16)):
    xs = [torch.randn(B * L, D, device=dev).bfloat16().requires_grad_() for _ in range(k)]  # MixNorm: residual mixes
    W = [torch.randn(D, device=dev, dtype=wt), torch.randn((), device=dev, dtype=wt), None][:k]  # (+ the block's
    # rms_norm * ln_scale); weights per channel, a scalar, 1; rows of 768 masked to 1,024
    outs = T.MixNorm.apply(s, tuple(W), *xs)
    outs = outs if s else (outs,)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    y = sum((1 if w is None else w.double()) * x for w, x in zip(W, x64))
    refs = (y, torch.nn.functional.rms_norm(y, (D,), eps=1e-6) * s) if s else (y,)
    gs = [torch.randn(B * L, D, device=dev).bfloat16() for _ in outs]
    for i, (a, b) in enumerate(zip(outs, refs)):
        check(f"MixNorm k={k} D={D} output {i}", a, b, 1e-2)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(outs, xs, gs), torch.autograd.grad(refs, x64, [g.double() for g in gs]))):
        check(f"MixNorm k={k} D={D} dx{i}", a, b, 1e-2)

# LoraLinears (TTT's q/k/v with adapters as one node) vs lora_linear's torch expressions in fp64; bf16 activations,
# fp32 weights and adapters (rank 80) as in TTT
x = torch.randn(8, 2048, 512, device=dev).bfloat16().requires_grad_()
mods = [torch.nn.Linear(512, o, bias=False, device=dev).requires_grad_(False) for o in (512, 256, 256)]
ads = [((torch.randn(8, 512, 80, device=dev) / 23).requires_grad_(), (torch.randn(8, 80, o, device=dev) / 9).requires_grad_())
       for o in (512, 256, 256)]
leaves = [x] + [t for a in ads for t in a]
gs = [torch.randn(8, 2048, o, device=dev).bfloat16() for o in (512, 256, 256)]
with torch.autocast("cuda", dtype=torch.bfloat16):
    ys = T.lora_linears(mods, x, ads, True)
got = [*ys, *torch.autograd.grad(ys, leaves, gs)]
l64 = [t.detach().double().requires_grad_() for t in leaves]
m64 = [torch.nn.Linear(512, o, bias=False, device=dev).double().requires_grad_(False) for o in (512, 256, 256)]
for a, b in zip(m64, mods):
    a.weight.copy_(b.weight)
refs = [T.lora_linear(m, l64[0], (l64[1 + 2 * i], l64[2 + 2 * i])) for i, m in enumerate(m64)]
refs += torch.autograd.grad(refs, l64, [g.double() for g in gs])
for name, a, b in zip(("q", "k", "v", "dx", "dAq", "dBq", "dAk", "dBk", "dAv", "dBv"), got, refs):
    check(f"LoraLinears {name}", a, b, 1e-2)

# GPTQ calibration's X^T X (gram): bf16 on tensor cores into fp32 vs fp64, about as far off as the TF32 GEMM of fp32
# copies that it replaced (both accumulate 98,304 products in fp32 on tensor cores); a bf16 result would be ~1e-3 off.
# An fp32 input under autocast counts as the bf16 values that the Linear multiplies.
for D, dt in ((2048, torch.bfloat16), (512, torch.float32)):
    x = torch.randn(98304, D, device=dev, dtype=dt) + 0.5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        xtx, rows = T.gram(x)
    x64 = x.bfloat16().double()
    ref = x64.T @ x64
    torch.backends.cuda.matmul.allow_tf32 = True
    base = ((x64.float().T @ x64.float()).double() - ref).norm().item() / ref.norm().item()
    torch.backends.cuda.matmul.allow_tf32 = False
    check(f"gram {dt} D={D} ({xtx.dtype}, {rows} rows; TF32 GEMM: {base:.1e})", xtx, ref, 2 * base)

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
