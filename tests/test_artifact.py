"""Artifact tests (issue 4): quantized state -> bytes -> file -> model gives exactly the in-memory quantized logits."""
import subprocess, sys, types
from pathlib import Path

import pytest
import torch

import train_gpt as T


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = T.Config(dict(RUN_PRESET="tiny", DATA_PATH="/nonexistent", MODEL_DIM="128", MLP_MULT="4"))
    m = T.GPT(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 2 and "embed" not in n:
                p.normal_(0, 0.05)
    return cfg, m


def fake_hessians(m, cfg):
    torch.manual_seed(1)
    hook = T.HessianHook([(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)])
    ids = torch.randint(4, cfg.vocab_size, (1, 256)); ids[0, 0] = 1
    with torch.no_grad():
        hook.add("embed.weight", m.hidden(ids, torch.tensor([0, 256], dtype=torch.int32), 256))
    hook.remove()
    return hook.hessians()


def test_hessians_cover_every_looped_matrix():
    cfg, m = tiny_model()
    m.looping = True
    H = fake_hessians(m, cfg)
    mats = [n for n, p in m.named_parameters() if p.ndim == 2 and p.numel() > 1000]
    assert set(mats) <= set(H), set(mats) - set(H)


def test_artifact_roundtrip_exact_logits(tmp_path):
    cfg, m = tiny_model()
    m.looping = True
    packed, _ = T.quantize_state(T.model_state(m), fake_hessians(m, cfg), T.quant_spec(cfg))
    blob = T.pack_state(packed)
    (tmp_path / "model.ptz").write_bytes(blob)
    back = T.unpack_state((tmp_path / "model.ptz").read_bytes())
    assert list(back) == list(packed)
    for k in packed:
        assert back[k].dtype == packed[k].dtype and torch.equal(back[k], packed[k]), k
    mem = T.load_dequantized(T.GPT(cfg), packed, cfg)
    disk = T.load_dequantized(T.GPT(cfg), back, cfg)
    ids = torch.randint(4, cfg.vocab_size, (1, 64)); ids[0, 0] = 1
    cu = torch.tensor([0, 64], dtype=torch.int32)
    for mm in (mem, disk):
        mm.looping = True
    with torch.no_grad():
        a = mem.logits(mem.hidden(ids, cu, 64))
        b = disk.logits(disk.hidden(ids, cu, 64))
        ref = m.logits(m.hidden(ids, cu, 64))
    assert torch.equal(a, b)
    assert not torch.equal(a, ref) and (a - ref).abs().max() < 0.5  # quantized: close to, not equal to fp32


def test_artifact_rejects_other_config():
    cfg, m = tiny_model()
    packed, _ = T.quantize_state(T.model_state(m), {}, T.quant_spec(cfg))
    cfg2 = T.Config(dict(RUN_PRESET="tiny", DATA_PATH="/nonexistent", MODEL_DIM="128", NUM_LAYERS="6"))
    with pytest.raises(SystemExit, match="does not match"):
        T.load_dequantized(T.GPT(cfg2), packed, cfg2)


@pytest.mark.parametrize("minifier", [True, False])
def test_wrapped_code_runs_and_counts(tmp_path, monkeypatch, minifier):
    """The submitted form of the code (python-minifier, or without it the standard library's strip_source) runs and
    computes what the source computes: a tiny model's loss, same seed, to the last bit."""
    if minifier:
        pytest.importorskip("python_minifier")
    else:
        monkeypatch.setitem(sys.modules, "python_minifier", None)  # the import fails
    src = open(T.__file__).read()
    code, method = T.wrap_code(src)
    assert ("python-minifier missing" in method) != minifier
    assert len(code) < len(src.encode()) / 3 and code.count(b"\n") == 2
    f = tmp_path / "wrapped.py"
    f.write_bytes(code)
    probe = ("import torch; torch.manual_seed(0); m = G['GPT'](G['Config'](dict(RUN_PRESET='tiny', DATA_PATH='/x'))); "
             "ids = torch.randint(0, m.cfg.vocab_size, (1, 64)); m.looping = True; "
             "print(repr(float(m(ids, ids, torch.tensor([0, 30, 64], dtype=torch.int32), 64).mean())))")
    # run the stub under another module name, so main() does not start
    r = subprocess.run([sys.executable, "-c", f"import runpy; G = runpy.run_path({str(f)!r}, run_name='wrapped_test'); " + probe],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ref = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = ['x']; sys.path.insert(0, {str(Path(T.__file__).parent)!r}); "
                          "import train_gpt; G = vars(train_gpt); " + probe], capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    assert r.stdout.split()[-1] == ref.stdout.split()[-1]


def test_artifact_limit_is_enforced(tmp_path):
    cfg = T.Config(dict(RUN_PRESET="tiny", DATA_PATH="/nonexistent", ARTIFACT_LIMIT="1000"))
    _, m = tiny_model()
    rt = T.Runtime(0, 1, 0, torch.device("cpu"), True)
    summary = {}
    msg = T.build_artifact(m, {}, cfg, rt, tmp_path, summary)
    assert msg and "ARTIFACT_LIMIT" in msg and summary["bytes_total"] >= 1000
    assert summary["bytes_total"] == summary["artifact_bytes"] + summary["code_bytes"]


def test_hessian_collection_runs_with_frozen_weights_and_restores_them(tiny_data):
    """Calibration's forwards see the weights frozen (so that on a GPU the eager kernels serve them, as in TTT), and
    every parameter's requires_grad is what it was afterwards, also after an error."""
    cfg = T.Config(dict(RUN_PRESET="tiny", DATA_PATH=str(tiny_data), GPTQ_CALIB_BATCHES="2"))
    rt = T.Runtime(0, 1, 0, torch.device("cpu"), True)
    m = T.GPT(cfg)
    m.skip_g.requires_grad_(False)
    before = [p.requires_grad for p in m.parameters()]
    seen = []
    h = m.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(any(p.requires_grad for p in m.parameters())))
    H, n = T.collect_hessians(m, T.TrainLoader(cfg, rt, 1), cfg, rt, float("inf"))
    assert n == 2 and seen and not any(seen)
    assert [p.requires_grad for p in m.parameters()] == before and not all(before)
    h.remove()
    m.blocks[0].register_forward_hook(lambda mod, inp, out: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        T.collect_hessians(m, T.TrainLoader(cfg, rt, 1), cfg, rt, float("inf"))
    assert [p.requires_grad for p in m.parameters()] == before
    assert not any(mod._forward_hooks for mod in m.modules() if isinstance(mod, torch.nn.Linear))  # hooks removed


def test_hessian_collection_stops_before_the_deadline(tiny_data, monkeypatch):
    """Calibration belongs to the training budget: no batch is started that would end past the deadline (the time of
    the batches so far predicts the next), yet at least one batch is always taken. On a fake clock where every batch
    takes 1 s, so that a loaded machine cannot make the test flaky."""
    cfg = T.Config(dict(RUN_PRESET="tiny", DATA_PATH=str(tiny_data), GPTQ_CALIB_BATCHES="6"))
    rt = T.Runtime(0, 1, 0, torch.device("cpu"), True)
    m = T.GPT(cfg)
    loader = T.TrainLoader(cfg, rt, 1)
    clock, real_step = [1000.0], loader.next_step
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    loader.next_step = lambda: (clock.__setitem__(0, clock[0] + 1.0), real_step())[1]
    assert T.collect_hessians(m, loader, cfg, rt, clock[0] - 1)[1] == 1  # deadline passed: one batch
    assert T.collect_hessians(m, loader, cfg, rt, float("inf"))[1] == 6
    for room, want in ((2.5, 2), (3.0, 2), (3.5, 3), (6.5, 6), (0.5, 1)):  # a batch that would end at the deadline
        deadline = clock[0] + room                                          # is not started
        assert T.collect_hessians(m, loader, cfg, rt, deadline)[1] == want
        assert clock[0] <= deadline or want == 1
