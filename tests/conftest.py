import os, sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def synthetic_docs(rng, n_docs, vocab, mean_len=60):
    """Documents with learnable structure: a per-doc repeating pattern plus noise."""
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(mean_len // 3, mean_len * 2))
        pat = rng.integers(4, vocab, size=int(rng.integers(3, 9)))
        d = np.resize(pat, n)
        noise = rng.random(n) < 0.1
        d[noise] = rng.integers(4, vocab, size=int(noise.sum()))
        docs.append(np.concatenate([[1], d]))
    return docs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small dataset in the challenge format: 2 train shards, val + byte sidecar (vocab 1024)."""
    d = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    val = np.concatenate(synthetic_docs(rng, 60, 1024))
    write_shard(d / "fineweb_val_000000.bin", val)
    nbytes = np.where(val == 1, 0, rng.integers(1, 6, size=len(val)))
    write_shard(d / "fineweb_val_bytes_000000.bin", nbytes)
    for i in range(2):
        write_shard(d / f"fineweb_train_{i:06d}.bin", np.concatenate(synthetic_docs(rng, 400, 1024)))
    return d
