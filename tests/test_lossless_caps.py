"""CaseOps transform and per-token original-byte accounting (SPEC 1.1)."""

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import lossless_caps as lc  # noqa: E402
from lossless_caps import ALLCAPS, CAPNEXT, ESC, TITLE  # noqa: E402

SHARED_MODEL = REPO.parent / "shared" / "data" / "caseops_sp8192.model"


# --------------------------------------------------------------------------
# tokenizers for the accounting tests
# --------------------------------------------------------------------------

def _training_text():
    import pydoc_data.topics

    extra = [
        "Tokyo 東京 and Kyoto 京都 are cities. ½ cup of ﬁne flour, café, naïve, Ωmega.",
        "McDonald's iPhone NASA HTTPServer XMLHttpRequest I am OK. e\u0301clair",
        "Tabs\tand\n\nnewlines   and  spaces\u00a0here.\u3000Full\u3000width",
    ] * 20
    return [t for t in pydoc_data.topics.topics.values()] + extra


def _train(plain: bool, dummy_prefix: bool = False, vocab: int = 400) -> bytes:
    import sentencepiece as spm

    texts = _training_text()
    if not plain:
        texts = [lc.encode(t) for t in texts]
    out = io.BytesIO()
    kw = dict(sentence_iterator=iter(texts), model_writer=out, model_type="bpe", vocab_size=vocab,
              byte_fallback=True, character_coverage=0.995, split_digits=True, max_sentencepiece_length=16,
              pad_id=0, bos_id=1, eos_id=2, unk_id=3, add_dummy_prefix=dummy_prefix,
              normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True, num_threads=1,
              input_sentence_size=0, max_sentence_length=1 << 20, minloglevel=2)
    if not plain:
        kw["user_defined_symbols"] = list(lc.OPERATORS)
    spm.SentencePieceTrainer.train(**kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def sp_caseops():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=_train(plain=False))


@pytest.fixture(scope="module")
def sp_plain():
    import sentencepiece as spm

    # a plain model with the SentencePiece default dummy prefix (like fineweb_8192_bpe.model)
    return spm.SentencePieceProcessor(model_proto=_train(plain=True, dummy_prefix=True))


@pytest.fixture(scope="module")
def counters(sp_caseops, sp_plain):
    return {"caseops": lc.PieceByteCounter(sp_caseops, caseops=True),
            "plain": lc.PieceByteCounter(sp_plain, caseops=False)}


# --------------------------------------------------------------------------
# transform
# --------------------------------------------------------------------------

@pytest.mark.parametrize("src, enc", [
    ("hello world", "hello world"),
    ("Hello", TITLE + "hello"),
    ("HELLO", ALLCAPS + "hello"),
    ("I", TITLE + "i"),
    ("a", "a"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
    ("ABc", TITLE + "a" + CAPNEXT + "bc"),
    ("aBC", "a" + CAPNEXT + "b" + CAPNEXT + "c"),
    ("Hello, World!", TITLE + "hello, " + TITLE + "world!"),
    ("NASA's HQ", ALLCAPS + "nasa's " + ALLCAPS + "hq"),
    ("abc1Def", "abc1" + TITLE + "def"),
    ("CaféX", TITLE + "caf" + "é" + TITLE + "x"),  # non-ASCII letters break ASCII words
    ("ÉCOLE", "É" + ALLCAPS + "cole"),
    ("x\ue001y", "x" + ESC + "\ue001" + "y"),
    (ESC, ESC + ESC),
    ("", ""),
])
def test_encode_examples(src, enc):
    assert lc.encode(src) == enc
    assert lc.decode(enc) == src


@pytest.mark.parametrize("bad, what", [
    (TITLE, "dangling TITLE"),
    (TITLE + " word", "dangling TITLE"),
    (ALLCAPS + "1", "dangling ALLCAPS"),
    ("ab" + CAPNEXT, "dangling CAPNEXT"),
    (TITLE + ALLCAPS + "ab", "dangling TITLE"),
    ("ab" + TITLE + "cd", "TITLE marker inside a word"),
    ("ab" + ALLCAPS + "cd", "ALLCAPS marker inside a word"),
    ("a" + CAPNEXT + CAPNEXT + "b", "duplicate CAPNEXT"),
    ("abc" + ESC, "dangling ESC at the end"),
    (ESC + "x", "dangling ESC followed by 'x'"),
    ("Abc", "uppercase ASCII letter"),
    (CAPNEXT + "abc", "CAPNEXT at the start of a word"),
    (ALLCAPS + "a", "ALLCAPS on a one-letter word"),
    (TITLE + "a" + CAPNEXT + "b", "all-uppercase word spelled without ALLCAPS"),
    (ALLCAPS + "ab" + CAPNEXT + "c", "CAPNEXT inside an ALLCAPS word"),
])
def test_decode_rejects_malformed(bad, what):
    with pytest.raises(lc.CaseOpsError, match="malformed CaseOps text") as e:
        lc.decode(bad)
    assert what in str(e.value)
    assert isinstance(e.value, ValueError)


# Strings rich in the cases that matter: ASCII words of every case pattern,
# literal operators, whitespace runs, and arbitrary Unicode.
_fragments = st.sampled_from([
    "a", "A", "ab", "AB", "Ab", "aB", "abc", "ABC", "McD", "iOS", " ", "  ", "\n", "\n\n", "\t", "\u00a0",
    "\u3000", "\u200b", "1", "42", ".", "'", "é", "É", "東京", "½", "ﬁ", "😀", "e\u0301", "\x01", "\u2581",
    TITLE, ALLCAPS, CAPNEXT, ESC,
])
texts = st.lists(st.one_of(_fragments, st.text(max_size=6)), max_size=30).map("".join)
op_soup = st.lists(st.sampled_from(["a", "b", "A", " ", "1", TITLE, ALLCAPS, CAPNEXT, ESC]), max_size=12).map("".join)


def spec_encode(s: str) -> str:
    """SPEC 1.1, written out character by character (the reference for encode)."""
    def letter(c):
        return "a" <= c <= "z" or "A" <= c <= "Z"
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c in lc.OPERATORS:
            out += [ESC, c]
            i += 1
        elif letter(c):
            j = i
            while j < len(s) and letter(s[j]):
                j += 1
            w = s[i:j]
            if w == w.lower():
                out.append(w)
            elif w == w.upper() and len(w) >= 2:
                out.append(ALLCAPS + w.lower())
            elif w[0].isupper() and w[1:] == w[1:].lower():
                out.append(TITLE + w.lower())
            else:
                out.append((TITLE if w[0].isupper() else "") + w[0].lower())
                out += [CAPNEXT + ch.lower() if ch.isupper() else ch for ch in w[1:]]
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_encode_matches_spec(s):
    assert lc.encode(s) == spec_encode(s)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_roundtrip(s):
    assert lc.decode(lc.encode(s)) == s


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_unicode(s):
    assert lc.decode(lc.encode(s)) == s


@settings(max_examples=400, deadline=None)
@given(op_soup)
def test_decode_accepts_exactly_the_encoder_image(x):
    """decode is strict: whatever it accepts re-encodes to the same text."""
    try:
        s = lc.decode(x)
    except lc.CaseOpsError:
        return
    assert lc.encode(s) == x


def test_encoded_text_has_no_uppercase_ascii():
    assert not any("A" <= c <= "Z" for c in lc.encode("The QUICK brown FoX JUMPS over McDonald's iPhone"))


# --------------------------------------------------------------------------
# byte accounting
# --------------------------------------------------------------------------

def test_operators_are_single_pieces(sp_caseops):
    ids = lc.operator_ids(sp_caseops)
    assert sorted(ids) == sorted(lc.OPERATORS)


def test_operator_check_rejects_plain_tokenizer(sp_plain):
    with pytest.raises(ValueError, match="lacks the CaseOps operator symbols"):
        lc.operator_ids(sp_plain)


def test_char_weights():
    t = lc.encode("Hi \ue001 東")
    w = lc.char_weights(t)
    assert w.sum() == len("Hi \ue001 東".encode())
    assert list(w[:3]) == [0, 1, 1]  # TITLE h i
    assert lc.original_bytes(ESC + ESC) == 3


def _check_doc(counter, t, original):
    ids, lengths, counts = counter.encode_docs([t])
    ref_ids, ref_counts = counter.encode_one(t)
    assert ids.tolist() == counter.sp.encode(t), "word-cache tokenization differs from SentencePiece"
    assert ids.tolist() == ref_ids
    assert counts.tolist() == ref_counts.tolist(), "fast path differs from the offset-mapping reference"
    if len(ids):
        assert int(counts.sum()) == len(original.encode("utf-8"))
    assert (counts >= 0).all()
    return ids, counts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts)
def test_piece_bytes_sum_to_original_caseops(counters, s):
    s = s.strip()
    assume(s)
    _check_doc(counters["caseops"], lc.encode(s), s)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=40))
@example("0\x1f\r0 A\x1e\tB")
def test_piece_bytes_sum_arbitrary_unicode(counters, s):
    s = s.strip()
    assume(s)
    _check_doc(counters["caseops"], lc.encode(s), s)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts)
@example("0\x1f\r0")  # a dropped control character inside a whitespace run (CI find)
@example("a \x85\x0b b\x1c")
def test_piece_bytes_sum_to_original_plain(counters, s):
    s = s.strip()
    assume(s)
    _check_doc(counters["plain"], s, s)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(texts, min_size=1, max_size=12))
def test_batch_equals_single_documents(counters, docs):
    """A document's ids and counts do not depend on the batch it is in."""
    docs = [lc.encode(d.strip()) for d in docs if d.strip()]
    assume(docs)
    c = counters["caseops"]
    ids, lengths, counts = c.encode_docs(docs)
    pos = 0
    for d, n in zip(docs, lengths.tolist()):
        one_ids, one_counts = c.encode_one(d)
        assert ids[pos:pos + n].tolist() == one_ids
        assert counts[pos:pos + n].tolist() == one_counts.tolist()
        pos += n
    ids2, lengths2, none = c.encode_docs(docs, with_bytes=False)
    assert none is None and ids2.tolist() == ids.tolist() and lengths2.tolist() == lengths.tolist()


def test_whitespace_run_credited_to_its_piece(counters):
    c = counters["caseops"]
    t = "a\n\n\tcat"
    ids, counts = _check_doc(c, t, t)
    pieces = [c.sp.id_to_piece(i) for i in ids]
    k = next(i for i, p in enumerate(pieces) if p.startswith("\u2581"))
    # the "▁" piece's surface is the run "\n\n\t" (3 bytes) plus what follows it
    assert counts[k] == 3 + len(pieces[k]) - 1


def test_byte_fallback_last_piece_carries_character(counters):
    c = counters["caseops"]
    t = "x \U00013000y"  # a rare 4-byte character (hieroglyph), byte-fallback in a 400-piece model
    ids, counts = _check_doc(c, t, t)
    pieces = [c.sp.id_to_piece(i) for i in ids]
    byte_idx = [i for i, p in enumerate(pieces) if p.startswith("<0x")]
    assert len(byte_idx) == 4
    assert [int(counts[i]) for i in byte_idx] == [0, 0, 0, 4]


def test_operators_count_zero_and_escaped_count_own_bytes(counters):
    c = counters["caseops"]
    s = "Big \ue002 NEWS"
    t = lc.encode(s)
    ids, counts = _check_doc(c, t, s)
    pieces = [c.sp.id_to_piece(i) for i in ids]
    for p, n in zip(pieces, counts.tolist()):
        if p in (TITLE, ESC):
            assert n == 0
    assert counts.sum() == len(s.encode())


@pytest.mark.skipif(not SHARED_MODEL.is_file(), reason=f"shared tokenizer not found at {SHARED_MODEL}")
def test_reference_tokenizer_examples():
    """The SPEC 1.1 examples with the record line's tokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SHARED_MODEL))
    c = lc.PieceByteCounter(sp)
    ids, counts = _check_doc(c, lc.encode("A\n\nc 東"), "A\n\nc 東")
    pieces = [sp.id_to_piece(i) for i in ids]
    assert pieces[:3] == [TITLE, "a", "\u2581c"]
    assert counts[:3].tolist() == [0, 1, 3]  # "▁c" has surface "\n\nc"
    assert pieces[-3:] == ["<0xE6>", "<0x9D>", "<0xB1>"] and counts[-3:].tolist() == [0, 0, 3]
    _check_doc(c, "1½ cups", "1½ cups")


# --------------------------------------------------------------------------
# plain characters: texts the normalizer provably leaves alone take the
# word-cache path without sp.normalize (and originals without the transform)
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sp_rules(tmp_path_factory):
    """A model with custom normalization rules: a two-character key ("ab" -> "x"),
    a replacement with a space ("c" -> "d d"), a combining sequence, no
    whitespace rules (a tab stays a tab), and a two-character user-defined symbol."""
    import pydoc_data.topics
    import sentencepiece as spm

    rules = tmp_path_factory.mktemp("rules") / "rules.tsv"
    rules.write_text("61 62\t78\n63\t64 20 64\n65 301\tE9\n")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(pydoc_data.topics.topics.values())[:50]), model_writer=out, model_type="bpe",
        vocab_size=400, normalization_rule_tsv=str(rules), add_dummy_prefix=False, byte_fallback=True,
        character_coverage=0.99, user_defined_symbols=["<br>", TITLE], minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=out.getvalue())


def _predicted(sp, s):
    if not s.split():
        return ""  # nothing but whitespace: nothing, not even the dummy prefix
    return ("\u2581" if sp.normalize("a").startswith("\u2581") else "") + "\u2581".join(s.split())


_PLAIN_TABLES: dict = {}


def _plain(sp):
    key = sp.serialized_model_proto()
    if key not in _PLAIN_TABLES:
        _PLAIN_TABLES[key] = lc.plain_characters(key)
    return _PLAIN_TABLES[key]


def test_plain_characters_examples(sp_caseops, sp_plain, sp_rules):
    for sp in (sp_caseops, sp_plain):
        table = _plain(sp)
        for c in "aZ09 \t\n\r\u00a0\u3000.,'\"é東’—" + "".join(lc.OPERATORS):
            assert table[ord(c)], repr(c)
        # NFKC-changed, dropped or odd whitespace, "▁" itself, combining marks, surrogates
        for c in "½ﬁ…²\x1f\x0b\x85\x01\u2581\u0301\ufb01\uff21\ud800":
            assert not table[ord(c)], repr(c)
    table = _plain(sp_rules)
    assert table[ord("a")] and table[ord("d")] and table[ord(">")] and table[ord(TITLE)]
    assert not table[ord("b")]  # follows "a" in the key "ab"
    assert not table[ord("c")]  # replaced by "d d"
    assert not table[ord("<")]  # starts the user-defined symbol "<br>"
    assert not table[ord("\t")]  # whitespace these rules do not turn into a space
    assert not table[0x301]


def test_plain_characters_each_in_context(sp_caseops, sp_plain, sp_rules):
    """Every plain character, alone, doubled and between others, normalizes as predicted."""
    for sp in (sp_caseops, sp_plain, sp_rules):
        table = _plain(sp)
        for c in map(chr, np.flatnonzero(table).tolist()):
            for s in ("a" + c + "d", c + c + "9", c + " a" + c):
                assert sp.normalize(s) == _predicted(sp, s), (hex(ord(c)), s)


_plain_probe = st.lists(st.one_of(_fragments, st.characters(max_codepoint=0xFFFF),
                                  st.sampled_from(["ab", "c", "<br>", "<", "\u00bd", "\u2581\u2581"])),
                        max_size=25).map("".join)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_plain_probe)
@example("a\u0301 é\t\r\n\u00a0x")
@example("<br> ab\tc")
def test_plain_texts_normalize_as_predicted(sp_caseops, sp_plain, sp_rules, s):
    for sp in (sp_caseops, sp_plain, sp_rules):
        table = _plain(sp)
        if all(ord(c) < 0x10000 and table[ord(c)] for c in s):
            assert sp.normalize(s) == _predicted(sp, s)


def _check_originals(counter, docs):
    """encode_originals (ids only and with bytes) agrees with SentencePiece and the offset mapping."""
    enc = [lc.encode(d) for d in docs] if counter.caseops else list(docs)
    ids, lengths, none = counter.encode_originals(docs, with_bytes=False)
    assert none is None
    ids_b, lengths_b, counts = counter.encode_originals(docs, with_bytes=True)
    assert ids.tolist() == ids_b.tolist() and lengths.tolist() == lengths_b.tolist()
    ids_e, lengths_e, _ = counter.encode_docs(enc, with_bytes=False)
    assert ids_e.tolist() == ids.tolist() and lengths_e.tolist() == lengths.tolist()
    pos = 0
    for d, e, n in zip(docs, enc, lengths.tolist()):
        assert ids[pos:pos + n].tolist() == counter.sp.encode(e), repr(d)
        ref_ids, ref_counts = counter.encode_one(e)
        assert ids[pos:pos + n].tolist() == ref_ids
        assert counts[pos:pos + n].tolist() == ref_counts.tolist(), repr(d)
        pos += n
    assert pos == len(ids)


TRICKY_DOCS = [
    "Hello World", "NASA's McDonald iPhone   XMLHttp", "½ cup of ﬁne flour", "a\x1fb", "0\x1f\r0 A\x1e\tB",
    "x\tY\r\nZ  \n\n w", "e\u0301clair Éa", "A\ue001B \ue004\ue004 C\ue002", "\u2581x \u2581\u2581", "a\u3000B\u00a0c",
    "\x85 after NEL", "wait… what²", "东京 Tokyo 😀 \U00013000", "", "   ", "I", "a\x0bb\x0cC", "x\u200by",
    "ab c <br>", "don´t", "Ⅻ ＡＢＣ",
]


@pytest.mark.parametrize("kind", ["caseops", "plain"])
def test_originals_tricky_inputs(counters, kind):
    _check_originals(counters[kind], TRICKY_DOCS)
    for d in TRICKY_DOCS:
        _check_originals(counters[kind], [d])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(texts, st.text(max_size=30)), min_size=1, max_size=10))
def test_originals_equal_reference(counters, docs):
    for kind in ("caseops", "plain"):
        _check_originals(counters[kind], docs)


def test_originals_skip_transform_and_normalizer(counters, monkeypatch):
    """Plain originals take the word path: no sp.normalize, no transform of the document."""
    c = counters["caseops"]
    docs = ["The QUICK brown FoX\tjumps over McDonald's  iPhone.", "Tokyo 東京 café, naïve"]
    assert all(c._not_plain_original.search(d) is None for d in docs)
    ref = [c.sp.encode(lc.encode(d)) for d in docs]
    c.encode_originals(docs, with_bytes=False)  # warm the word cache

    calls = []
    real_encode = lc.encode
    monkeypatch.setattr(lc, "encode", lambda t: calls.append(t) or real_encode(t))

    class NoNormalize:
        def __init__(self, sp):
            self._sp = sp

        def normalize(self, *a, **k):
            raise AssertionError("sp.normalize called for a plain document")

        def __getattr__(self, name):
            return getattr(self._sp, name)

    monkeypatch.setattr(c, "sp", NoNormalize(c.sp))
    ids, lengths, _ = c.encode_originals(docs, with_bytes=False)
    assert not calls
    assert ids.tolist() == ref[0] + ref[1] and lengths.tolist() == [len(r) for r in ref]


def test_word_cache_stays_bounded(sp_caseops):
    c = lc.PieceByteCounter(sp_caseops, caseops=True)
    c._WC_MAX_WORDS = 40
    rng = np.random.default_rng(0)
    for _ in range(6):
        docs = [" ".join("".join(rng.choice(list("abcXYZé"), size=rng.integers(1, 6))) for _ in range(15))
                for _ in range(3)]
        _check_originals(c, docs)
        assert c._nw <= 40 + 45 and all(len(d) <= 45 + 40 for d in c._dicts.values())


@pytest.mark.skipif(not SHARED_MODEL.is_file(), reason=f"shared tokenizer not found at {SHARED_MODEL}")
def test_originals_reference_tokenizer():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SHARED_MODEL))
    c = lc.PieceByteCounter(sp)
    assert c._not_plain_original is not None and c._wc_ok
    _check_originals(c, TRICKY_DOCS)
    table = _plain(sp)
    assert table[ord("é")] and table[ord("’")] and not table[ord("…")] and not table[ord("\x85")]


def test_cache_add_in_chunks_with_fallback(sp_caseops):
    """New words are tokenized a few dozen per text; a chunk whose pieces do not
    line up with its words (here "x´y": NFKC writes "´" as a space and an accent)
    is redone word by word, and every entry is the word's own tokens."""
    c = lc.PieceByteCounter(sp_caseops)
    words = [f"w{i}ord" for i in range(100)] + ["x\u00b4y", "tail", TITLE + "end"]
    c._cache_add(words, first=False, originals=False)
    c._cache_add(["First", "iPhone"], first=True, originals=True)
    d, fd = c._word_dicts(False)[0], c._word_dicts(True)[1]

    def entry(e):
        return c._wtok[c._wstart[e]:c._wstart[e] + c._wlen[e]].tolist()

    for w in words:
        assert entry(d[w]) == c.sp.encode("a " + w)[1:], w
    for w in ("First", "iPhone"):
        assert entry(fd[w]) == c.sp.encode(lc.encode(w))


def test_without_plain_table_asks_the_normalizer(sp_caseops, sp_plain, monkeypatch):
    """A model whose options the table does not cover takes the sp.normalize paths; same results."""
    monkeypatch.setattr(lc, "plain_characters", lambda proto: None)
    for sp, caseops in ((sp_caseops, True), (sp_plain, False)):
        c = lc.PieceByteCounter(sp, caseops=caseops)
        assert c._not_plain is None and c._not_plain_original is None
        _check_originals(c, TRICKY_DOCS)
