"""prepare_caseops_data.py: shards, sidecar, manifest, split, verify, download layout, errors."""

import gzip
import hashlib
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import lossless_caps as lc  # noqa: E402
import prepare_caseops_data as prep  # noqa: E402
from prepare_caseops_data import DataError  # noqa: E402

SHARED = REPO.parent / "shared"
BENCH_DOCS = SHARED / "data" / "bench_docs_20k.jsonl.xz"
BENCH_MODEL = SHARED / "data" / "caseops_sp8192.model"
REFERENCE_SHA256 = {
    "fineweb_val_000000.bin": "661e421d2c2c7af92dc534484537ad9e0981276116f2fffab49532e0db9253e9",
    "fineweb_val_bytes_000000.bin": "5a23ff30b6d284e9a0a2655da112aff0e005a32819ac34b08429a0ecc17995be",
    "fineweb_train_000000.bin": "9efa20aa0d5625b2adbec426fddd59ea30e9e2c6853606b32a3ed4c9be9ec511",
}
VAL_DOCS = 40
MARKER = "qzxwvjkb"  # appears only in val documents


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

def corpus():
    """~400 real-text documents with every special case the prep must handle."""
    import pydoc_data.topics

    paras = []
    for _, text in sorted(pydoc_data.topics.topics.items()):
        paras += [p.strip() for p in text.split("\n\n") if len(p.strip()) > 60]
    docs = list(dict.fromkeys(paras))[:420]  # unique paragraphs
    docs[1] = "Tokyo 東京 ½ cup, ﬁne café.\n\n\tNASA's McDonald iPhone   XMLHttp \ue001 literal \ue004 ops 😀"
    docs[2] = f"{MARKER} " * 600 + "marker doc"  # val only: must not shape the tokenizer
    docs[3] = ""  # empty documents are skipped and counted
    docs[10] = "   \n\t  "
    docs[11] = "  padded document with surrounding whitespace  \n"
    docs[300] = docs[5]  # a copy of a val document in the train region
    return docs


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def nonempty(docs):
    return [d.strip() for d in docs if d.strip()]


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", corpus())


@pytest.fixture(scope="module")
def built(tmp_path_factory, docs_file):
    """A dataset built with a tokenizer trained by the prep itself (vocab 512)."""
    out = tmp_path_factory.mktemp("built") / "ds"
    man = prep.build_dataset(docs_file, out, vocab_size=512, val_docs=VAL_DOCS, shard_tokens=4000,
                             workers=2, quiet=True)
    return out, man


@pytest.fixture(scope="module")
def tok_model(built):
    return built[0] / prep.TOKENIZER_FILE


@pytest.fixture
def copy_of(built, tmp_path):
    def make():
        dst = tmp_path / "copy"
        shutil.copytree(built[0], dst)
        return dst
    return make


def sp_of(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def tokens(path):
    return np.asarray(prep.read_tokens(path)).astype(np.int64)


def stream(d, kind):
    return np.concatenate([tokens(p) for p in sorted(Path(d).glob(f"fineweb_{kind}_[0-9]*.bin"))])


def split_docs(t):
    b = np.flatnonzero(t == prep.BOS_ID).tolist() + [len(t)]
    assert b[0] == 0, "stream must start with BOS"
    return [t[b[i] + 1:b[i + 1]] for i in range(len(b) - 1)]


def file_hashes(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir())
            if p.is_file() and (prep.SHARD_RE.match(p.name) or p.name == prep.TOKENIZER_FILE)}


# --------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------

def test_shard_format_and_manifest(built):
    out, man = built
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" in names and "tokenizer.model" in names
    assert not (out / prep.PARTIAL_DIR).exists()
    for p in out.glob("fineweb_*.bin"):
        raw = p.read_bytes()
        header = np.frombuffer(raw[:1024], dtype="<i4")
        assert (header[0], header[1]) == (20240520, 1)
        assert len(raw) == 1024 + 2 * header[2]
        assert not header[3:].any()
    assert len(list(out.glob("fineweb_train_*.bin"))) == man["counts"]["train_shards"] > 2
    val, side = stream(out, "val"), stream(out, "val_bytes")
    assert len(val) == len(side) == man["counts"]["val_tokens"]
    assert (val == 1).sum() == VAL_DOCS == man["counts"]["val_docs"]
    assert (side[val == 1] == 0).all()
    c = man["counts"]
    assert c["empty_docs_skipped"] == 2 and c["train_docs_dropped_val_duplicates"] == 1
    assert c["val_docs"] + c["train_docs"] + 1 == len(nonempty(corpus()))
    assert set(man["files"]) == {p.name for p in out.glob("fineweb_*.bin")}
    for name, meta in man["files"].items():
        assert meta["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert man["inputs"]["docs"]["sha256"] == hashlib.sha256(Path(man["settings"]["docs"]).read_bytes()).hexdigest()
    assert man["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert man["settings"]["val_docs"] == VAL_DOCS and man["settings"]["shard_tokens"] == 4000


def test_val_is_first_docs_with_exact_sidecar(built, tok_model):
    out, man = built
    sp = sp_of(tok_model)
    counter = lc.PieceByteCounter(sp)
    val_docs = nonempty(corpus())[:VAL_DOCS]
    got = split_docs(stream(out, "val"))
    side = stream(out, "val_bytes")
    assert len(got) == VAL_DOCS
    pos = 0
    for d, toks in zip(val_docs, got):
        ids, counts = counter.encode_one(lc.encode(d))
        assert toks.tolist() == ids == sp.encode(lc.encode(d))
        assert side[pos] == 0 and side[pos + 1:pos + 1 + len(ids)].tolist() == counts.tolist()
        pos += 1 + len(ids)
        # lossless: the text comes back (modulo the normalizer's whitespace collapsing)
        assert lc.decode(sp.decode(ids)) == " ".join(d.split()) or "½" in d or "ﬁ" in d
    assert int(side.sum()) == sum(len(d.encode()) for d in val_docs) == man["counts"]["val_bytes"]


def test_train_is_the_rest_in_order_without_val_copies(built, tok_model):
    out, _ = built
    sp = sp_of(tok_model)
    docs = nonempty(corpus())
    val_set = set(docs[:VAL_DOCS])
    expected = [sp.encode(lc.encode(d)) for d in docs[VAL_DOCS:] if d not in val_set]
    got = [t.tolist() for t in split_docs(stream(out, "train"))]
    assert got == expected
    # documents run across shard boundaries
    assert tokens(out / "fineweb_train_000001.bin")[0] != prep.BOS_ID or \
        tokens(out / "fineweb_train_000002.bin")[0] != prep.BOS_ID


def test_tokenizer_trained_on_train_docs_only(built, tmp_path):
    sp = sp_of(built[0] / "tokenizer.model")
    assert len(sp.encode(MARKER)) > 2, "a val-only word shaped the tokenizer"
    assert lc.operator_ids(sp)
    # control: with the marker document in the train region the word becomes (nearly) one piece
    docs = corpus()
    docs[2], docs[200] = docs[200], docs[2]
    f = write_jsonl(tmp_path / "swapped.jsonl", docs)
    prep.build_dataset(f, tmp_path / "o", vocab_size=512, val_docs=VAL_DOCS, workers=1, quiet=True)
    assert len(sp_of(tmp_path / "o" / "tokenizer.model").encode(MARKER)) <= 2


def test_output_independent_of_workers(built, docs_file, tok_model, tmp_path):
    ref = None
    for w in (1, 2, 3):
        out = tmp_path / f"w{w}"
        man = prep.build_dataset(docs_file, out, sp_model=tok_model, val_docs=VAL_DOCS, shard_tokens=4000,
                                 workers=w, quiet=True)
        got = (file_hashes(out), (out / "manifest.json").read_text())
        assert man["files"] == built[1]["files"]
        if ref is None:
            ref = got
        assert got == ref
    # the same shards as the build that trained the tokenizer, too
    assert {k: v for k, v in ref[0].items()} == file_hashes(built[0])
    # and tokenizer training does not depend on the worker count
    a = prep.build_dataset(docs_file, tmp_path / "t1", vocab_size=400, val_docs=VAL_DOCS, workers=1, quiet=True)
    b = prep.build_dataset(docs_file, tmp_path / "t2", vocab_size=400, val_docs=VAL_DOCS, workers=2, quiet=True)
    assert file_hashes(tmp_path / "t1") == file_hashes(tmp_path / "t2")
    assert a["files"] == b["files"]


def test_val_bytes_redone_when_empty_documents_delay_val(tmp_path, tok_model, monkeypatch):
    """Blobs get val byte counts only while they may hold val documents; empty
    documents still in flight can make that guess wrong: the blob is redone."""
    docs = [f"Document number {i} with Some words." for i in range(19)] + [""] * 8 + \
        [f"Later document {i}, also Text." for i in range(12)]
    f = write_jsonl(tmp_path / "late.jsonl", docs)
    runs = []
    real_run = prep.OrderedPool.run
    monkeypatch.setattr(prep.OrderedPool, "run", lambda self, task: runs.append(task[0]) or real_run(self, task))
    hashes = {}
    for chunk, workers in ((1 << 21, 1), (40, 2)):  # one blob; one line per blob, 5 in flight
        monkeypatch.setattr(prep, "CHUNK_BYTES", chunk)
        out = tmp_path / f"o{workers}"
        man = prep.build_dataset(f, out, sp_model=tok_model, val_docs=22, shard_tokens=4000, workers=workers,
                                 quiet=True)
        assert man["counts"]["val_docs"] == 22 and man["counts"]["empty_docs_skipped"] == 8
        assert prep.verify_dataset(out, docs=f, workers=workers, quiet=True) == []
        hashes[workers] = file_hashes(out)
    assert runs, "the blobs after the empty documents were expected to be redone"
    assert set(runs) <= set(range(28, 31))  # the val documents on lines 28..30
    assert hashes[1] == hashes[2]


def test_compressed_inputs(tmp_path, tok_model, built):
    docs = corpus()
    for name, opener in (("d.jsonl.gz", gzip.open), ("d.jsonl.xz", lzma.open)):
        f = write_jsonl(tmp_path / name, docs, opener)
        out = tmp_path / name.replace(".", "_")
        man = prep.build_dataset(f, out, sp_model=tok_model, val_docs=VAL_DOCS, shard_tokens=4000, workers=2,
                                 quiet=True)
        assert file_hashes(out) == file_hashes(built[0])
        assert man["inputs"]["docs"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_plain_mode_writes_sidecar(tmp_path, docs_file):
    out = tmp_path / "plain"
    man = prep.build_dataset(docs_file, out, vocab_size=400, val_docs=VAL_DOCS, plain=True, workers=2, quiet=True)
    sp = sp_of(out / "tokenizer.model")
    with pytest.raises(ValueError):
        lc.operator_ids(sp)
    val, side = stream(out, "val"), stream(out, "val_bytes")
    assert int(side.sum()) == sum(len(d.encode()) for d in nonempty(corpus())[:VAL_DOCS]) == man["counts"]["val_bytes"]
    assert split_docs(val)[0].tolist() == sp.encode(nonempty(corpus())[0])
    assert man["settings"]["transform"] == "none"
    assert prep.verify_dataset(out, docs=docs_file, workers=1, quiet=True) == []
    # without a sidecar train_gpt.py counts SPEC 1.4's bytes from the pieces: UTF-8 length, a leading '▁' one space
    # unless after BOS, byte pieces 1. Equal to the original bytes where the normalizer changed nothing (one space).
    import train_gpt as T
    word = next(i for i in range(sp.get_piece_size()) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 2)
    byte = next(i for i in range(sp.get_piece_size()) if sp.is_byte(i))
    ids = np.array([1, word, word, byte, 1, word])
    n = len(sp.id_to_piece(word).encode()) - 3  # '▁' is 3 UTF-8 bytes
    cfg = T.Config(dict(RUN_PRESET="tiny", DATA_PATH=str(out)))
    assert T.token_bytes_from_tokenizer(cfg, ids).tolist() == [0, n, n + 1, 1, 0, n]
    text = "the cat sat on the mat"
    toks = np.array([1] + sp.encode(text))
    assert int(T.token_bytes_from_tokenizer(cfg, toks).sum()) == len(text.encode())


def test_max_train_shards(tmp_path, docs_file, tok_model, built):
    out = tmp_path / "m"
    man = prep.build_dataset(docs_file, out, sp_model=tok_model, val_docs=VAL_DOCS, shard_tokens=4000,
                             max_train_shards=2, workers=2, quiet=True)
    assert sorted(p.name for p in out.glob("fineweb_train_*")) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    for name in ("fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"):
        assert (out / name).read_bytes() == (built[0] / name).read_bytes()
    assert man["counts"]["train_tokens"] == 8000 and man["split"]["stopped_early_at_max_train_shards"]
    assert man["inputs"]["docs"]["sha256"] == built[1]["inputs"]["docs"]["sha256"]


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------

def _build(f, out, **kw):
    kw.setdefault("val_docs", 2)
    kw.setdefault("workers", 1)
    return prep.build_dataset(f, out, quiet=True, **kw)


def test_missing_docs_file(tmp_path, tok_model):
    with pytest.raises(DataError, match=r"--docs .*nope\.jsonl: no such file"):
        _build(tmp_path / "nope.jsonl", tmp_path / "o", sp_model=tok_model)


def test_missing_tokenizer_file(tmp_path, docs_file):
    with pytest.raises(DataError, match=r"--sp .*none\.model: no such file"):
        _build(docs_file, tmp_path / "o", sp_model=tmp_path / "none.model")


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_json_names_line(tmp_path, tok_model, workers):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three\n{"text": "four"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        _build(f, tmp_path / "o", sp_model=tok_model, workers=workers)
    assert not (tmp_path / "o" / prep.PARTIAL_DIR).exists()


def test_line_without_text(tmp_path, tok_model):
    f = tmp_path / "notext.jsonl"
    f.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(DataError, match=r'notext\.jsonl:2: no "text" field'):
        _build(f, tmp_path / "o", sp_model=tok_model)
    f.write_text('{"text": "one"}\n["text"]\n')
    with pytest.raises(DataError, match=r'notext\.jsonl:2: no "text" field'):
        _build(f, tmp_path / "o", sp_model=tok_model)
    f.write_text('{"text": "one"}\n{"text": 7}\n')
    with pytest.raises(DataError, match=r'notext\.jsonl:2: "text" is a int, not a string'):
        _build(f, tmp_path / "o", sp_model=tok_model)
    f.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    with pytest.raises(DataError, match=r"notext\.jsonl:2: empty line"):
        _build(f, tmp_path / "o", sp_model=tok_model)


def test_empty_documents_skipped_and_counted(tmp_path, tok_model):
    f = write_jsonl(tmp_path / "e.jsonl", ["", "first", "  ", "second", "\n", "third", "fourth"])
    man = _build(f, tmp_path / "o", sp_model=tok_model, val_docs=2)
    assert man["counts"]["empty_docs_skipped"] == 3
    assert man["counts"]["val_docs"] == 2 and man["counts"]["train_docs"] == 2
    assert man["split"]["val_first_line"] == 2 and man["split"]["train_first_line"] == 6


def test_more_val_docs_than_docs(tmp_path, tok_model):
    f = write_jsonl(tmp_path / "few.jsonl", ["a", "b", "", "c"])
    with pytest.raises(DataError, match=r"--val-docs 5 but .*few\.jsonl holds only 3 non-empty documents"):
        _build(f, tmp_path / "o", sp_model=tok_model, val_docs=5)
    with pytest.raises(DataError, match=r"no documents left for train"):
        _build(f, tmp_path / "o", sp_model=tok_model, val_docs=3)
    assert not (tmp_path / "o" / prep.PARTIAL_DIR).exists()
    with pytest.raises(DataError, match=r"--val-docs 5 but .*holds only 3 non-empty documents"):
        _build(f, tmp_path / "o", vocab_size=400, val_docs=5)
    assert not list((tmp_path / "o").glob("fineweb_*"))


def test_refuses_dataset_with_other_settings(tmp_path, docs_file, tok_model):
    out = tmp_path / "o"
    _build(docs_file, out, sp_model=tok_model, val_docs=5)
    before = file_hashes(out)
    _build(docs_file, out, sp_model=tok_model, val_docs=5)  # same settings: rebuilt in place
    assert file_hashes(out) == before
    with pytest.raises(DataError, match=r"holds a dataset built with other settings \(.*val_docs: 5 -> 6.*--force"):
        _build(docs_file, out, sp_model=tok_model, val_docs=6)
    assert file_hashes(out) == before
    man = _build(docs_file, out, sp_model=tok_model, val_docs=6, force=True)
    assert man["counts"]["val_docs"] == 6 and file_hashes(out) != before


def test_refuses_unknown_dataset_files(tmp_path, docs_file, tok_model):
    out = tmp_path / "o"
    out.mkdir()
    prep.write_shard(out / "fineweb_train_000000.bin", [1, 2, 3])
    with pytest.raises(DataError, match=r"holds dataset files .* but no manifest\.json.*--force"):
        _build(docs_file, out, sp_model=tok_model)
    _build(docs_file, out, sp_model=tok_model, force=True)


def test_tokenizer_without_operator_symbols(tmp_path, docs_file):
    plain = tmp_path / "plain"
    prep.build_dataset(docs_file, plain, vocab_size=400, val_docs=VAL_DOCS, plain=True, workers=1, quiet=True)
    with pytest.raises(DataError, match=r"lacks the CaseOps operator symbols TITLE \(U\+E001\).*--plain"):
        _build(docs_file, tmp_path / "o", sp_model=plain / "tokenizer.model")
    _build(docs_file, tmp_path / "o", sp_model=plain / "tokenizer.model", plain=True)


def test_vocabulary_over_65535(tmp_path, docs_file, monkeypatch, tok_model):
    with pytest.raises(DataError, match=r"--vocab-size 70,000 is over 65,535"):
        _build(docs_file, tmp_path / "o", vocab_size=70000)

    class Big:
        def vocab_size(self):
            return 70000

    monkeypatch.setattr(prep, "load_sp", lambda b: Big())
    with pytest.raises(DataError, match=r"vocabulary of 70,000 pieces is over 65,535"):
        _build(docs_file, tmp_path / "o", sp_model=tok_model)

    class OtherBos(Big):
        def vocab_size(self):
            return 1000

        def bos_id(self):
            return 2

    monkeypatch.setattr(prep, "load_sp", lambda b: OtherBos())
    with pytest.raises(DataError, match=r"BOS id is 2, but the shard format needs BOS = 1"):
        _build(docs_file, tmp_path / "o", sp_model=tok_model)


def test_not_a_tokenizer(tmp_path, docs_file):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"not a SentencePiece model"):
        _build(docs_file, tmp_path / "o", sp_model=junk)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "prepare_caseops_data.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_build_error_and_verify(tmp_path, tok_model, built, docs_file):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n')
    r = run_cli("--docs", f, "--out", tmp_path / "o", "--sp", tok_model, "--val-docs", 1, "--workers", 1)
    assert r.returncode == 2 and "bad.jsonl:2: malformed JSON" in r.stderr
    r = run_cli("--verify", built[0], "--docs", docs_file, "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "verify OK" in r.stdout
    r = run_cli("--docs", docs_file, "--out", tmp_path / "o2", "--sp", tok_model, "--val-docs", 41,
                "--shard-tokens", 4000, "--workers", 2)
    assert r.returncode == 0, r.stderr
    r = run_cli("--verify", tmp_path / "o2", "--docs", docs_file)
    assert r.returncode == 0, r.stderr
    (tmp_path / "o2" / "fineweb_val_bytes_000000.bin").write_bytes(b"")
    r = run_cli("--verify", tmp_path / "o2")
    assert r.returncode == 1 and "VERIFY FAILED" in r.stderr and "fineweb_val_bytes_000000.bin" in r.stderr


# --------------------------------------------------------------------------
# verify: a clean dataset passes, each planted defect is caught
# --------------------------------------------------------------------------

def rewrite(path, fn):
    t = tokens(path)
    prep.write_shard(path, fn(t))


def test_verify_clean(built, docs_file):
    assert prep.verify_dataset(built[0], quiet=True) == []
    assert prep.verify_dataset(built[0], docs=docs_file, workers=2, quiet=True) == []


def _problems(d, docs=None):
    p = prep.verify_dataset(d, docs=docs, workers=1, quiet=True)
    assert p, "defect not caught"
    return "\n".join(p)


def test_verify_bad_header(copy_of):
    d = copy_of()
    p = d / "fineweb_train_000001.bin"
    raw = bytearray(p.read_bytes())
    raw[0:4] = np.array([123], dtype="<i4").tobytes()
    p.write_bytes(bytes(raw))
    assert "fineweb_train_000001.bin: bad header magic 123" in _problems(d)


def test_verify_truncated_shard(copy_of):
    d = copy_of()
    p = d / "fineweb_train_000000.bin"
    p.write_bytes(p.read_bytes()[:-10])
    assert "fineweb_train_000000.bin: size" in _problems(d)


def test_verify_missing_bos(copy_of, docs_file):
    d = copy_of()
    v = d / "fineweb_val_000000.bin"
    second_bos = int(np.flatnonzero(tokens(v) == 1)[1])

    def drop(t):
        t[second_bos] = 10
        return t
    rewrite(v, drop)
    (d / "manifest.json").unlink()  # not even the manifest's hashes help
    assert "missing BOS at the start of val document 1" in _problems(d, docs_file)


def test_verify_missing_bos_without_docs(copy_of):
    d = copy_of()
    rewrite(d / "fineweb_val_000000.bin", lambda t: np.where(np.arange(len(t)) == np.flatnonzero(t == 1)[1], 10, t))
    assert "BOS-delimited documents but manifest.json says 40" in _problems(d)


def test_verify_train_must_start_with_bos(copy_of):
    d = copy_of()
    rewrite(d / "fineweb_train_000000.bin", lambda t: t[1:])
    assert "train stream does not start with BOS" in _problems(d)


def test_verify_sidecar_length(copy_of):
    d = copy_of()
    rewrite(d / "fineweb_val_bytes_000000.bin", lambda t: t[:-1])
    assert "sidecar length" in _problems(d)


def test_verify_sidecar_sum(copy_of, docs_file):
    d = copy_of()

    def bump(t):
        t[5] += 1
        return t
    rewrite(d / "fineweb_val_bytes_000000.bin", bump)
    (d / "manifest.json").unlink()
    msg = _problems(d, docs_file)
    assert "UTF-8 bytes of the first 40 (stripped) documents" in msg and "sidecar sum" in msg


def test_verify_val_not_first_docs(built, tmp_path):
    docs = corpus()
    f = write_jsonl(tmp_path / "shifted.jsonl", docs[1:])  # the dataset's doc 0 is not the file's first
    assert "val document 0 (val token 0) is not the tokenization of document 0" in _problems(built[0], f)


def test_verify_val_doc_in_train(copy_of):
    d = copy_of()
    val_doc = split_docs(stream(d, "val"))[7]
    rewrite(d / "fineweb_train_000002.bin", lambda t: np.concatenate([t, [1], val_doc]))
    (d / "manifest.json").unlink()
    msg = _problems(d)
    assert "1 validation document(s) occur in the train shards" in msg and "val document 7" in msg


def test_verify_extra_shard(copy_of):
    d = copy_of()
    n = len(list(d.glob("fineweb_train_*.bin")))
    shutil.copyfile(d / "fineweb_train_000000.bin", d / prep.shard_name("train", n))
    msg = _problems(d)
    assert f"fineweb_train_{n:06d}.bin: not listed in manifest.json" in msg
    assert "validation document" not in msg


def test_verify_train_not_starting_after_val(copy_of, tmp_path):
    docs = corpus()
    d = copy_of()
    first_train = split_docs(tokens(d / "fineweb_train_000000.bin"))[0]
    rewrite(d / "fineweb_train_000000.bin", lambda t: t[len(first_train) + 1:])
    (d / "manifest.json").unlink()
    f = write_jsonl(tmp_path / "d.jsonl", docs)
    assert "train does not start with document 40" in _problems(d, f)


# --------------------------------------------------------------------------
# layout check and --download (network faked)
# --------------------------------------------------------------------------

def test_check_layout(built, copy_of):
    s = prep.check_layout(built[0])
    assert s["val_tokens"] == built[1]["counts"]["val_tokens"] and s["sidecar"]
    assert s["train_shards"] == built[1]["counts"]["train_shards"] and s["vocab_size"] == 512
    with pytest.raises(prep.LayoutError, match="train shards, expected 80"):
        prep.check_layout(built[0], train_shards=80)
    with pytest.raises(prep.LayoutError, match="val holds .* tokens, expected 47,851,521..47,853,568"):
        prep.check_layout(built[0], val_tokens=(47_851_521, 47_853_568))
    d = copy_of()
    (d / "fineweb_train_000001.bin").unlink()
    (d / "tokenizer.model").unlink()
    with pytest.raises(prep.LayoutError) as e:
        prep.check_layout(d)
    assert "missing fineweb_train_000001.bin" in str(e.value) and "no tokenizer.model" in str(e.value)


class FakeHub:
    """Serves a local dataset under the Hugging Face export's paths."""

    def __init__(self, src: Path, extra_train: int = 0):
        self.src = src
        name = prep.HF_DATASET_NAME
        self.files = {f"datasets/datasets/{name}/{p.name}": p for p in src.glob("fineweb_*.bin")}
        self.files[f"datasets/tokenizers/{prep.HF_TOKENIZER_NAME}"] = src / "tokenizer.model"
        self.files["datasets/manifest.json"] = src / "manifest.json"
        self.fetched = []

    def list_files(self, repo_id):
        assert repo_id == prep.HF_REPO_ID
        return sorted(self.files)

    def fetch(self, repo_id, filename, local_dir):
        self.fetched.append(filename)
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.files[filename], dst)
        return dst


def test_download_layout(built, tmp_path):
    src, man = built
    out = tmp_path / "data" / "datasets" / prep.HF_DATASET_NAME
    hub = FakeHub(src)
    s = prep.download_caseops(out, hub=hub, train_shards=2, val_tokens=man["counts"]["val_tokens"], quiet=True)
    assert s["train_shards"] == 2 and s["sidecar"]
    assert sorted(p.name for p in out.glob("fineweb_train_*")) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert (tmp_path / "data" / "tokenizers" / prep.HF_TOKENIZER_NAME).is_file()
    assert (out / "fineweb_val_bytes_000000.bin").read_bytes() == (src / "fineweb_val_bytes_000000.bin").read_bytes()
    assert not any("train_000002" in f for f in hub.fetched) and "datasets/manifest.json" not in hub.fetched
    assert json.loads((out / "manifest.json").read_text())["settings"]["train_shards"] == 2
    assert prep.verify_dataset(out, quiet=True) == []
    # a second run finds the files in place and fetches nothing
    hub2 = FakeHub(src)
    prep.download_caseops(out, hub=hub2, train_shards=2, val_tokens=man["counts"]["val_tokens"], quiet=True)
    assert hub2.fetched == []


def test_download_checks_what_it_got(built, tmp_path):
    src, man = built
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    p = broken / "fineweb_val_000000.bin"
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(prep.LayoutError, match="fineweb_val_000000.bin: size"):
        prep.download_caseops(tmp_path / "o1", hub=FakeHub(broken), train_shards=2, quiet=True)
    # the real export's val size is enforced by default
    with pytest.raises(prep.LayoutError, match="expected 47,851,521..47,853,568"):
        prep.download_caseops(tmp_path / "o2", hub=FakeHub(src), train_shards=2, quiet=True)
    with pytest.raises(DataError, match="fewer than the 80 asked for"):
        prep.download_caseops(tmp_path / "o3", hub=FakeHub(src), quiet=True)


def test_download_needs_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(DataError, match="pip install huggingface_hub"):
        prep.download_caseops(tmp_path / "o", quiet=True)


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------

def test_demo(tmp_path):
    r = run_cli("--demo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data" / "demo"
    man = json.loads((out / "manifest.json").read_text())
    assert 200 <= man["counts"]["val_docs"] <= 500 and man["counts"]["train_tokens"] > 300_000
    assert man["tokenizer"]["vocab_size"] == 1024 and man["tokenizer"]["trained_on"]["first_line"] > man["split"]["val_last_line"]
    assert prep.verify_dataset(out, docs=out / "demo_docs.jsonl", workers=2, quiet=True) == []
    r = run_cli("--demo", cwd=tmp_path)  # rebuilding the demo is allowed
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------
# reference hashes (shared/data/README.md)
# --------------------------------------------------------------------------

@pytest.mark.skipif(not BENCH_DOCS.is_file(), reason=f"shared benchmark data not found at {SHARED}")
def test_reference_hashes(tmp_path):
    out = tmp_path / "ref"
    prep.build_dataset(BENCH_DOCS, out, sp_model=BENCH_MODEL, val_docs=2000, max_train_shards=1,
                       keep_val_duplicates=True, workers=2, quiet=True)
    for name, digest in REFERENCE_SHA256.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    # the reference train shard 0 holds 18 exact copies of val documents (20 in the whole corpus):
    # verify (against the source documents too) finds them and nothing else.  Our default build
    # drops such copies (tested on the small corpus above); val does not depend on it.
    problems = prep.verify_dataset(out, docs=BENCH_DOCS, workers=2, quiet=True)
    assert len(problems) == 1 and problems[0].startswith("18 validation document(s) occur in the train shards")
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["val_bytes"] == 4_107_864 and man["counts"]["val_tokens"] == 1_341_121
