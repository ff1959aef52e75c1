"""The whole pipeline end to end on CPU, as a user runs it: prepare --demo, then
RUN_PRESET=tiny train_gpt.py (train, GPTQ, compress, decompress, evaluate with
phased TTT), then the submission files and the seed merge."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, env=None, timeout=600):
    e = {k: v for k, v in os.environ.items() if k not in ("RUN_PRESET", "DATA_PATH")}
    e.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    r = run([str(ROOT / "prepare_caseops_data.py"), "--demo"], cwd=work)
    assert r.returncode == 0, r.stderr
    r = run([str(ROOT / "train_gpt.py")], cwd=work,
            env=dict(RUN_PRESET="tiny", ARTIFACT_DIR="run", TTT_CHUNK="64", OMP_NUM_THREADS="2"))
    return work, r


def test_end_to_end_tiny(demo_run):
    work, r = demo_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = work / "run"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["valid"] is True and s["attention_backend"] == "sdpa"
    for key in ("steps", "train_wallclock_s", "hessian_s", "pre_quant_val_bpb", "quant_val_bpb", "ttt_val_bpb",
                "artifact_bytes", "code_bytes", "bytes_total", "eval_time_s"):
        assert s.get(key) is not None, key
    assert s["bytes_total"] == s["artifact_bytes"] + s["code_bytes"] < 16_000_000
    assert (run_dir / "model.ptz").stat().st_size == s["artifact_bytes"]
    # every val token scored once: the TTT pass covers all val tokens and the sidecar bytes
    man = json.loads((work / "data" / "demo" / "manifest.json").read_text())
    assert s["val_bytes"] == man["counts"]["val_bytes"]
    assert s["val_tokens"] == man["counts"]["val_tokens"] - 1  # the first BOS is context, never a target
    assert s["val_bpb"] == s["ttt_val_bpb"] and 0 < s["val_bpb"] < 8
    sub = json.loads((run_dir / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(s["val_bpb"], abs=1e-6) and sub["bytes_total"] == s["bytes_total"]
    assert "final val_bpb" in r.stdout and s["not_valid_because"] is None
    assert sub["track"] == "non_record_16mb" and sub["track_notes"] == ["1x cpu: the track runs on 8xH100 SXM"]
    assert "not a 10-minute-track result (1x cpu: the track runs on 8xH100 SXM)" in r.stdout


@pytest.mark.parametrize("world", [2, 8])
def test_ranks_end_to_end(demo_run, tmp_path, world):
    """torchrun with 2 ranks (4 micro-batches each) and with 8 (the record's world: 1 micro-batch each; the tiny val
    set leaves some ranks few or no TTT batches), gloo, as on several GPUs: (a) the whole pipeline trains (the 1-rank
    loss curve), calibrates GPTQ across ranks, writes one artifact and scores every val token once (without TTT: the
    n-gram tilted score is the result); (b) the 1-rank run's artifact evaluated again by these ranks (sharded scoring
    windows, TTT batches pulled from the store) gives the 1-rank numbers."""
    work, r = demo_run
    s1 = json.loads((work / "run" / "summary.json").read_text())
    man = json.loads((work / "data" / "demo" / "manifest.json").read_text())
    two = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(ROOT / "train_gpt.py")]
    curve = lambda out: [(int(x.split()[1]), float(x.split()[3])) for x in out.splitlines() if x.startswith("step ") and " loss " in x]
    # a budget that 8 ranks on 2 CPU cores cannot press: a rank that projects an overrun skips LoRA updates of a batch
    env = dict(RUN_PRESET="tiny", DATA_PATH=str(work / "data" / "demo"), TTT_CHUNK="64", OMP_NUM_THREADS="1",
               EVAL_BUDGET_SECONDS="900")
    ra = run(two, cwd=tmp_path, env=dict(env, ARTIFACT_DIR="a", TTT_MODE="off", NGRAM_TILT="1"))
    assert ra.returncode == 0, ra.stdout[-3000:] + ra.stderr[-3000:]
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert sa["valid"] is True and sa["world_size"] == world and sa["steps"] == s1["steps"]
    c1, c = curve(r.stdout), curve(ra.stdout)  # the 1-rank loss curve (as logged, 4 decimals)
    assert len(c1) > 5 and [i for i, _ in c] == [i for i, _ in c1] and max(abs(a - b) for (_, a), (_, b) in zip(c, c1)) < 3e-4
    assert sa["val_bpb"] == sa["adjusted_val_bpb"] and sa["val_tokens"] == man["counts"]["val_tokens"] - 1
    assert (tmp_path / "a" / "model.ptz").stat().st_size == sa["artifact_bytes"] and sa["bytes_total"] < 16_000_000
    assert "GPTQ Hessians" in ra.stdout and ra.stdout.count("final val_bpb") == 1  # one rank logs
    rb = run(two, cwd=tmp_path, env=dict(env, ARTIFACT_DIR="b", EVAL_ARTIFACT=str(work / "run" / "model.ptz")))
    assert rb.returncode == 0, rb.stdout[-3000:] + rb.stderr[-3000:]
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert sb["val_tokens"] == man["counts"]["val_tokens"] - 1 and sb["val_bytes"] == man["counts"]["val_bytes"]
    assert sb["eval_shrunk"] == [] == s1["eval_shrunk"]
    for k in ("adapted_docs", "lora_steps", "lora_padded_tokens"):  # the same batches, spread over the ranks
        assert sb["ttt_stats"][k] == s1["ttt_stats"][k], k
    assert sb["quant_val_bpb"] == pytest.approx(s1["quant_val_bpb"], abs=1e-6)  # sums in another order
    assert sb["ttt_val_bpb"] == pytest.approx(s1["ttt_val_bpb"], abs=1e-4)  # phase SGD split over ranks (6e-6 seen)


def test_partial_val_is_not_a_result(demo_run, tmp_path):
    """Without TTT, n-gram tilt or calibration the result is the quantized score, and VAL_MAX_TOKENS (the tiny preset:
    8,192) cuts it to part of the val tokens: the run says so, and writes no submission."""
    work, _ = demo_run
    r = run([str(ROOT / "train_gpt.py")], cwd=tmp_path, env=dict(RUN_PRESET="tiny", DATA_PATH=str(work / "data" / "demo"),
                                                                  ARTIFACT_DIR="p", TTT_MODE="off"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["valid"] is False and s["val_tokens"] == 8192 and not (tmp_path / "p" / "submission.json").exists()
    assert "no valid result (VAL_MAX_TOKENS=8192: the result scores 8,192 of the" in r.stdout


def test_calibration_under_eval_artifact_continues_the_train_stream(demo_run, tmp_path):
    """CALIBRATE with EVAL_ARTIFACT fits on the train tokens after those the original run read (train_stream_end in
    its summary.json), never the first batches it trained on; without that summary it warns."""
    import train_gpt as T
    work, _ = demo_run
    s = json.loads((work / "run" / "summary.json").read_text())
    idx, pos, name = s["train_stream_end"]
    assert pos > 0 and name.startswith("fineweb_train_")
    cfg = T.Config(dict(RUN_PRESET="tiny", DATA_PATH=str(work / "data" / "demo")))
    logs = []
    rt = T.Runtime(0, 1, 0, T.torch.device("cpu"), True)
    rt.log = lambda m, console=True: logs.append(m)
    loader = T.TrainLoader(cfg, rt, 1)
    T.resume_train_stream(loader, work / "run" / "model.ptz", rt)
    assert loader.stream.state() == (idx, pos) and not logs
    loader = T.TrainLoader(cfg, rt, 1)
    T.resume_train_stream(loader, tmp_path / "model.ptz", rt)  # no summary.json there
    assert loader.stream.state() == (0, 0) and "first training batches" in logs[0]


def test_caseops_val_without_sidecar_is_refused(demo_run, tmp_path):
    """Without the byte sidecar the bytes come from the tokenizer's pieces, which for CaseOps data hold the operators
    (3 UTF-8 bytes each) instead of the original text: the run refuses rather than print a bpb over the wrong bytes."""
    import shutil
    import train_gpt as T
    work, _ = demo_run
    d = tmp_path / "nosidecar"
    d.mkdir()
    for f in ("fineweb_val_000000.bin", "tokenizer.model"):
        shutil.copy(work / "data" / "demo" / f, d / f)
    rt = T.Runtime(0, 1, 0, T.torch.device("cpu"), True)
    with pytest.raises(SystemExit, match="is a CaseOps tokenizer"):
        T.load_val(T.Config(dict(RUN_PRESET="tiny", DATA_PATH=str(d))), rt)


def test_merge_seeds(demo_run, tmp_path):
    work, r = demo_run
    s = json.loads((work / "run" / "summary.json").read_text())
    files = []
    for seed, delta in ((1, 0.0), (2, 0.01), (3, 0.02)):
        f = tmp_path / f"s{seed}.json"
        f.write_text(json.dumps(dict(s, seed=seed, val_bpb=s["val_bpb"] + delta)))
        files.append(str(f))
    out = tmp_path / "submission.json"
    r2 = run([str(ROOT / "train_gpt.py"), "merge", str(out), *files], cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    sub = json.loads(out.read_text())
    assert sub["val_bpb"] == pytest.approx(s["val_bpb"] + 0.01, abs=1e-6)
    assert sub["val_bpb_std"] == pytest.approx(0.01, abs=1e-6) and [x["seed"] for x in sub["seeds"]] == [1, 2, 3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(s, valid=False, not_valid_because="QUANTIZE=0: pre-quant diagnostic, no artifact")))
    r3 = run([str(ROOT / "train_gpt.py"), "merge", str(out), str(bad)], cwd=tmp_path)
    assert r3.returncode != 0 and "not a valid result (QUANTIZE=0: pre-quant" in r3.stderr
    other = tmp_path / "other.json"  # another setting: not a seed of the same submission
    other.write_text(json.dumps(dict(s, seed=4, config=dict(s["config"], MATRIX_LR=0.03, RUN_ID="x"))))
    r4 = run([str(ROOT / "train_gpt.py"), "merge", str(out), files[0], str(other)], cwd=tmp_path)
    assert r4.returncode != 0 and "differs from" in r4.stderr and "MATRIX_LR" in r4.stderr and "RUN_ID" not in r4.stderr
    r5 = run([str(ROOT / "train_gpt.py"), "merge", str(out), files[0], files[0]], cwd=tmp_path)
    assert r5.returncode != 0 and "repeat a seed" in r5.stderr


def test_track_is_8xh100_within_600s_each():
    """submission.json's track: 10min_16mb only if every seed ran on 8xH100 SXM within 600 s of training and of
    evaluation; otherwise non_record_16mb, with the reasons."""
    import train_gpt as T
    rec = dict(world_size=8, gpu="NVIDIA H100 80GB HBM3", train_wallclock_s=599.6, eval_time_s=540.2, seed=1,
               val_bpb=1.06, val_loss=2.3)
    cfg = T.Config({})
    assert T.track_notes(rec) == [] and T.submission_record([rec], cfg)["track"] == "10min_16mb"
    for change, note in ((dict(world_size=4), "4x NVIDIA H100 80GB HBM3: the track runs on 8xH100 SXM"),
                         (dict(gpu="NVIDIA H100 PCIe"), "8x NVIDIA H100 PCIe: the track runs on 8xH100 SXM"),
                         (dict(gpu="NVIDIA H200"), "8x NVIDIA H200: the track runs on 8xH100 SXM"),
                         (dict(train_wallclock_s=600.4), "training took 600.4s > 600s"),
                         (dict(eval_time_s=731.0), "evaluation took 731.0s > 600s")):
        assert T.track_notes(dict(rec, **change)) == [note]
        sub = T.submission_record([rec, dict(rec, seed=2, **change)], cfg)  # one seed is enough to lose the track
        assert sub["track"] == "non_record_16mb" and sub["track_notes"] == [note]


def test_cpu_refuses_record_config(tmp_path):
    r = run([str(ROOT / "train_gpt.py")], cwd=tmp_path, env=dict(CUDA_VISIBLE_DEVICES="", PHASED_TTT_ENABLED="1"))
    assert r.returncode != 0
    assert "no CUDA GPU" in r.stderr and "RUN_PRESET=tiny" in r.stderr


def test_missing_data_is_named(tmp_path):
    r = run([str(ROOT / "train_gpt.py")], cwd=tmp_path, env=dict(RUN_PRESET="tiny", DATA_PATH=str(tmp_path / "nope")))
    assert r.returncode != 0
    assert str(tmp_path / "nope") in r.stderr and "prepare_caseops_data.py" in r.stderr


def test_eval_artifact_reevaluates_without_training(demo_run, tmp_path):
    """EVAL_ARTIFACT: the saved model.ptz is evaluated again with other eval settings (here TTT off), without
    training: the quantized val_bpb is the same number, no submission is written, and a model of other shape
    settings is refused with an error that names the mismatch."""
    work, r = demo_run
    s = json.loads((work / "run" / "summary.json").read_text())
    env = dict(RUN_PRESET="tiny", ARTIFACT_DIR=str(tmp_path / "re"), EVAL_ARTIFACT=str(work / "run" / "model.ptz"),
               TTT_MODE="off", DATA_PATH=str(work / "data" / "demo"), OMP_NUM_THREADS="2")
    r2 = run([str(ROOT / "train_gpt.py")], cwd=work, env=env)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    s2 = json.loads((tmp_path / "re" / "summary.json").read_text())
    assert s2["quant_val_bpb"] == pytest.approx(s["quant_val_bpb"], abs=1e-9) and s2["val_bpb"] == s2["quant_val_bpb"]
    assert s2["valid"] is False and s2.get("train_wallclock_s") is None and not (tmp_path / "re" / "submission.json").exists()
    r3 = run([str(ROOT / "train_gpt.py")], cwd=work, env=dict(env, ARTIFACT_DIR=str(tmp_path / "re3"), MODEL_DIM="128"))
    assert r3.returncode != 0 and "does not match this model configuration" in r3.stderr
    r4 = run([str(ROOT / "train_gpt.py")], cwd=work, env=dict(env, EVAL_ARTIFACT=str(tmp_path / "none.ptz")))
    assert r4.returncode != 0 and "EVAL_ARTIFACT" in r4.stderr and "no such file" in r4.stderr
    before = [(work / "run" / f).read_bytes() for f in ("summary.json", "log.txt")]
    r5 = run([str(ROOT / "train_gpt.py")], cwd=work, env=dict(env, ARTIFACT_DIR=str(work / "run")))  # its own folder
    assert r5.returncode != 0 and "would overwrite" in r5.stderr
    assert [(work / "run" / f).read_bytes() for f in ("summary.json", "log.txt")] == before
