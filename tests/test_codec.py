import os
import sys

import numpy as np
import pytest
import torch

from train_gpt import RANS_PB, _codec_axis_buckets, pack_state, rans_normalize, rans_table, unpack_state  # noqa: E402


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).contiguous().view(torch.uint8)), k


def roundtrip(d):
    out = unpack_state(pack_state(d))
    assert_same(out, d)
    return out


def tiny_state(seed=0):
    """Tiny CPU fixture shaped like the real artifact: int6 matrices + fp16 row scales + int7 embedding."""
    g = torch.Generator().manual_seed(seed)
    d = {}
    for name, (r, c, qmax, k) in {"emb": (256, 64, 63, 14.0), "q": (64, 64, 31, 12.85), "up": (128, 64, 31, 12.85)}.items():
        w = torch.randn(r, c, generator=g) * (1 + torch.rand(r, c, generator=g))
        s = k * w.std(1, keepdim=True) / qmax
        d[name + ".q"] = torch.clamp(torch.round(w / s), -qmax, qmax).to(torch.int8)
        d[name + ".scale"] = s.squeeze(1).half()
    d["norm"] = (1 + 0.1 * torch.randn(64, generator=g)).half()
    return d


def test_tiny_fixture_roundtrip_and_smaller_than_raw():
    d = tiny_state()
    blob = pack_state(d)
    assert_same(unpack_state(blob), d)
    raw = sum(t.numel() * t.element_size() for t in d.values())
    assert len(blob) < 0.62 * raw


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                                   torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_roundtrip_every_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    if dtype.is_floating_point:
        big = (torch.randn(300, 70, generator=g) * 3).to(dtype)
        small = torch.randn(5, generator=g).to(dtype)
    else:
        info = torch.iinfo(dtype)
        big = torch.randint(max(info.min, -40), min(info.max, 40), (300, 70), generator=g).to(dtype)
        small = torch.randint(info.min, info.max, (7,), generator=g, dtype=torch.int64).to(dtype)
    wide = torch.randint(torch.iinfo(torch.int16).min, 2 ** 15 - 1, (3000,), generator=g).to(dtype)
    d = {"big": big, "small": small, "wide": wide, "empty": torch.empty(0, 4, dtype=dtype),
         "one": torch.ones(1, dtype=dtype), "scalar": torch.tensor(7, dtype=dtype),
         "const": torch.full((64, 64), 3, dtype=dtype), "strided": big.t()[::2, 1:]}
    assert not d["strided"].is_contiguous()
    roundtrip(d)


def test_edge_cases():
    full = torch.arange(-128, 128, dtype=torch.int8).repeat(40).reshape(40, 256)
    d = {"full_int8": full, "full_uint8": (full.to(torch.int16) + 128).to(torch.uint8),
         "int4": torch.randint(-8, 8, (2000,), dtype=torch.int8), "int2": torch.randint(-2, 2, (4096,), dtype=torch.int8),
         "neg_const": torch.full((5000,), -7, dtype=torch.int32),
         "big_offset": torch.randint(10 ** 9, 10 ** 9 + 100, (3000,), dtype=torch.int32),
         "int16_min": torch.randint(-2 ** 15, -2 ** 15 + 256, (3000,), dtype=torch.int16),
         "int32_max": torch.randint(2 ** 31 - 256, 2 ** 31 - 1, (3000,), dtype=torch.int32),
         "specials": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-8], dtype=torch.float32),
         "päth/ünicode.weight": torch.zeros(3, dtype=torch.float16)}
    roundtrip(d)
    roundtrip({"bool_big": torch.rand(5000) > 0.9, "bool_small": torch.tensor([True, False]),
               "bool_true": torch.ones(2000, dtype=torch.bool)})
    roundtrip({})
    with pytest.raises(TypeError):
        pack_state({"c": torch.zeros(3, dtype=torch.complex64)})
    roundtrip({"only_empty": torch.empty(0, dtype=torch.int8)})


def test_corruption_raises_valueerror():
    blob = pack_state(tiny_state())
    bad = [blob[: len(blob) // 2], blob[:-1], blob + b"\0", b"", b"PGQ1", b"XXXX" + blob[4:]]
    for i in (5, 20, len(blob) // 2, len(blob) - 3):
        flipped = bytearray(blob)
        flipped[i] ^= 0x10
        bad.append(bytes(flipped))
    for b in bad:
        with pytest.raises(ValueError):
            unpack_state(b)


def test_peaked_distribution_near_entropy():
    rng = np.random.default_rng(0)
    v = np.clip(np.round(rng.laplace(0, 0.8, size=1 << 20)), -31, 31).astype(np.int8)
    c = np.bincount(v.astype(np.int64) + 31).astype(np.float64)
    c = c[c > 0]
    ent_bytes = float((c * np.log2(c.sum() / c)).sum()) / 8
    blob = pack_state({"w": torch.from_numpy(v).reshape(1024, 1024)})
    assert ent_bytes < len(blob) < 1.01 * ent_bytes, (len(blob), ent_bytes)


def test_normalize_and_axis_buckets():
    rng = np.random.default_rng(0)
    for counts in ([0, 1, 5, 10 ** 6, 3, 0], [7], [1] * 256, rng.integers(1, 200, 256),
                   np.r_[10 ** 7, np.ones(255, int)], rng.integers(0, 10 ** 6, 63)):
        f, codes = rans_normalize(np.array(counts))
        assert f.sum() == 1 << RANS_PB and np.all((f > 0) == (np.array(counts) > 0))
        assert max(codes) == 255 and np.array_equal(rans_table(codes), f)
    iid = rng.integers(0, 20, size=(512, 256)).astype(np.uint8)
    assert _codec_axis_buckets(iid, 20)[2].shape[0] == 1
    colscale = np.exp(rng.standard_normal(256))[None, :]
    het = (np.clip(np.round(rng.standard_normal((512, 256)) * colscale), -10, 10) + 10).astype(np.uint8)
    _, b, cnt = _codec_axis_buckets(het, 21)
    assert cnt.shape[0] > 1 and b.max() == cnt.shape[0] - 1
    d = {"het": torch.from_numpy(het.astype(np.int8) - 10), "het_rows": torch.from_numpy(het.T.astype(np.int8) - 10)}
    roundtrip(d)
