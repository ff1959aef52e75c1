"""Several ranks on one GPU, to run the multi-GPU code paths on a machine with one GPU (not in CI):

    torchrun --standalone --nproc_per_node=2 tests/gpu_two_ranks.py

runs train_gpt.main() on every rank, with the usual environment variables. NCCL refuses two ranks on one device, so
the process group is gloo, and the collectives the kit calls on CUDA tensors go through CPU copies (gloo has no
reduce-scatter or all-gather of CUDA tensors). The ranks share the GPU and the copies cost time: for checking, not
for timing. Each rank prints how many of each collective it made."""
import collections, os, sys
os.environ["LOCAL_RANK"] = "0"  # every rank (and its compile helper) on cuda:0
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import torch.distributed as dist
import train_gpt as T

calls = collections.Counter()


def staged(fn):
    """fn(tensors..., other args): CUDA tensors through CPU copies; the first tensor is the output (in place)."""
    def run(*args, async_op=False, **kw):
        calls[fn.__name__] += 1
        n = next(i for i, a in enumerate(args + (None,)) if not isinstance(a, torch.Tensor))
        if not any(a.is_cuda for a in args[:n]):
            return fn(*args, async_op=async_op, **kw)
        cpu = [a.cpu() for a in args[:n]]
        fn(*cpu, *args[n:], **kw)
        args[0].copy_(cpu[0])
    return run


for name in ("all_reduce", "broadcast", "reduce_scatter_tensor", "all_gather_into_tensor"):
    setattr(dist, name, staged(getattr(dist, name)))

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        T.main()
    finally:
        print(f"rank {os.environ.get('RANK')}: collectives {dict(calls)}", flush=True)
