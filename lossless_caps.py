"""CaseOps: a lossless capitalization transform, and original-byte accounting.

The transform (SPEC section 1.1) rewrites every maximal run of ASCII letters
``[A-Za-z]+`` in lowercase, with private-use operator characters in front:

* all lowercase                        -> unchanged
* all uppercase, two letters or more   -> ALLCAPS + word.lower()
* first letter upper, the rest lower   -> TITLE + word.lower()
* anything else (mixed)                -> TITLE if the first letter is upper,
  then CAPNEXT before every later uppercase letter, all letters lowercased.

A literal operator character in the input is written as ESC + that character,
so ``decode(encode(s)) == s`` for every string ``s``.  ``decode`` accepts
exactly the strings ``encode`` can produce and raises :class:`CaseOpsError`
(a ``ValueError``) on anything else.

The second half of this module counts, for every SentencePiece token of a
transformed document, how many bytes of the ORIGINAL UTF-8 text it stands for
(the "byte sidecar" used for bits-per-byte).  A piece's surface is the span of
input characters it came from (``EncodeAsOffsetMapping``), so a "▁" made from a
whitespace run credits the whole run; operators and ESC count 0 and an escaped
character its own bytes; for a character that falls back to byte pieces the
last byte piece carries the whole character.  :class:`PieceByteCounter` does
this with a vectorised fast path that is exact whenever the tokenizer's
normalizer only collapses whitespace (checked per document) and falls back to
the offset mapping otherwise.  Only sentencepiece's plain Python API is used
(no protobuf, no ``encode_as_immutable_proto``).
"""

from __future__ import annotations

import itertools
import operator
import re
from typing import Sequence

import numpy as np

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
OPERATOR_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}
TRANSFORM_NAME = "lossless_caps_caseops_v1"

META = "\u2581"  # SentencePiece's whitespace symbol "▁"


class CaseOpsError(ValueError):
    """Malformed CaseOps text given to :func:`decode`."""


# --------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------

# Matches start at the first uppercase letter of an ASCII-letter run and run
# greedily to its end; all-lowercase runs never match and stay untouched.  A
# match preceded by a (necessarily lowercase) letter is the tail of a mixed
# word such as "iPhone".
_UPPER_RUN = re.compile(r"[A-Z][A-Za-z]*")
_LITERAL_OPERATOR = re.compile("[\ue001-\ue004]")
_UPPER_LETTER = re.compile("([A-Z])")
_WORD_CACHE: dict[str, str] = {}
_WORD_CACHE_MAX = 100_000


def _encode_word(word: str) -> str:
    """CaseOps form of a whole ASCII-letter run that holds an uppercase letter."""
    if word.isupper():  # ASCII-only run: every letter uppercase
        return (ALLCAPS if len(word) >= 2 else TITLE) + word.lower()
    first, rest = word[0], word[1:]
    if first.isupper() and rest.islower():
        return TITLE + word.lower()
    head = TITLE + first.lower() if first.isupper() else first
    return head + _UPPER_LETTER.sub(CAPNEXT + r"\1", rest).lower()


def _encode_match(m: re.Match) -> str:
    word = m.group()
    start = m.start()
    if start and "a" <= m.string[start - 1] <= "z":  # tail of a word with a lowercase head
        return _UPPER_LETTER.sub(CAPNEXT + r"\1", word).lower()
    out = _WORD_CACHE.get(word)
    if out is None:
        if len(_WORD_CACHE) >= _WORD_CACHE_MAX:
            _WORD_CACHE.clear()
        out = _WORD_CACHE[word] = _encode_word(word)
    return out


def encode(text: str) -> str:
    """Apply the CaseOps transform to ``text`` (any Unicode string)."""
    if _LITERAL_OPERATOR.search(text) is not None:
        text = _LITERAL_OPERATOR.sub(lambda m: ESC + m.group(), text)
    return _UPPER_RUN.sub(_encode_match, text)


# --------------------------------------------------------------------------
# decode (strict)
# --------------------------------------------------------------------------

def _context(text: str, pos: int, width: int = 20) -> str:
    lo, hi = max(0, pos - width), min(len(text), pos + width + 1)
    shown = text[lo:hi]
    for op, name in OPERATOR_NAMES.items():
        shown = shown.replace(op, f"<{name}>")
    return repr(shown)


def _fail(text: str, pos: int, what: str) -> CaseOpsError:
    return CaseOpsError(f"malformed CaseOps text at position {pos}: {what}; near {_context(text, pos)}")


def _is_ascii_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def decode(text: str) -> str:
    """Invert :func:`encode`.

    Raises :class:`CaseOpsError` for text that ``encode`` cannot produce: a
    dangling marker (not followed by an ASCII letter), a TITLE/ALLCAPS marker
    inside a word, a duplicate CAPNEXT, a dangling ESC (at the end, or before
    a non-operator), an uppercase ASCII letter, or a non-canonical spelling
    (e.g. ALLCAPS on a one-letter word, CAPNEXT inside an ALLCAPS word).
    """
    out: list[str] = []
    n = len(text)
    i = 0
    pending: str | None = None  # marker waiting for its letter
    pending_pos = -1
    in_word = False  # the previous output char is an ASCII letter of a word
    word_mode: str | None = None  # TITLE / ALLCAPS / None for the current word
    word_start = -1
    word_len = 0
    word_upper = 0

    def end_word(pos: int) -> None:
        nonlocal in_word
        if in_word:
            if word_mode == ALLCAPS and word_len < 2:
                raise _fail(text, word_start, "ALLCAPS on a one-letter word (the encoder writes TITLE)")
            if word_mode != ALLCAPS and word_len >= 2 and word_upper == word_len:
                raise _fail(text, word_start, "an all-uppercase word spelled without ALLCAPS (not canonical)")
        in_word = False

    while i < n:
        ch = text[i]
        if ch == ESC:
            if pending is not None:
                raise _fail(text, pending_pos, f"dangling {OPERATOR_NAMES[pending]} marker (not followed by an ASCII letter)")
            if i + 1 >= n:
                raise _fail(text, i, "dangling ESC at the end of the text (ESC must be followed by an operator character)")
            nxt = text[i + 1]
            if nxt not in OPERATOR_NAMES:
                raise _fail(text, i, f"dangling ESC followed by {nxt!r} (ESC must be followed by an operator character)")
            end_word(i)
            out.append(nxt)
            i += 2
            continue
        if ch == TITLE or ch == ALLCAPS:
            if pending is not None:
                raise _fail(text, pending_pos, f"dangling {OPERATOR_NAMES[pending]} marker (followed by another marker)")
            if in_word:
                raise _fail(text, i, f"{OPERATOR_NAMES[ch]} marker inside a word (it may only start a word)")
            pending, pending_pos = ch, i
            i += 1
            continue
        if ch == CAPNEXT:
            if pending == CAPNEXT:
                raise _fail(text, i, "duplicate CAPNEXT marker")
            if pending is not None:
                raise _fail(text, pending_pos, f"dangling {OPERATOR_NAMES[pending]} marker (followed by CAPNEXT)")
            if not in_word:
                raise _fail(text, i, "CAPNEXT at the start of a word (the encoder writes TITLE there)")
            if word_mode == ALLCAPS:
                raise _fail(text, i, "CAPNEXT inside an ALLCAPS word (not canonical)")
            pending, pending_pos = ch, i
            i += 1
            continue
        if _is_ascii_letter(ch):
            if ch <= "Z":
                raise _fail(text, i, f"uppercase ASCII letter {ch!r} (CaseOps text holds lowercase letters only)")
            if not in_word:
                in_word = True
                word_start, word_len, word_upper = i, 0, 0
                word_mode = pending if pending in (TITLE, ALLCAPS) else None
                upper = word_mode is not None
            else:
                upper = word_mode == ALLCAPS or pending == CAPNEXT
            word_len += 1
            if upper:
                word_upper += 1
                out.append(ch.upper())
            else:
                out.append(ch)
            pending = None
            i += 1
            continue
        # any other character ends a word
        if pending is not None:
            raise _fail(text, pending_pos, f"dangling {OPERATOR_NAMES[pending]} marker (followed by {ch!r}, not an ASCII letter)")
        end_word(i)
        out.append(ch)
        i += 1
    if pending is not None:
        raise _fail(text, pending_pos, f"dangling {OPERATOR_NAMES[pending]} marker at the end of the text")
    end_word(n)
    return "".join(out)


# --------------------------------------------------------------------------
# original-byte weights of transformed text
# --------------------------------------------------------------------------

def _utf8_lengths(codepoints: np.ndarray) -> np.ndarray:
    return (1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000))


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def char_weights(text: str, caseops: bool = True) -> np.ndarray:
    """Original UTF-8 bytes behind every character of (transformed) ``text``.

    With ``caseops``: operators and ESC weigh 0, the character after an ESC
    its own bytes.  Without: every character weighs its UTF-8 length.
    """
    cp = _codepoints(text)
    w = _utf8_lengths(cp)
    if caseops:
        is_op = (cp >= 0xE001) & (cp <= 0xE004)
        if is_op.any():
            w[is_op] = 0
            j = text.find(ESC)
            while j >= 0:
                if j + 1 < len(text):
                    w[j + 1] = len(text[j + 1].encode("utf-8", "surrogatepass"))
                    j = text.find(ESC, j + 2)
                else:
                    break
    return w


def original_bytes(text: str, caseops: bool = True) -> int:
    """Original UTF-8 byte count of a (transformed) text."""
    return int(char_weights(text, caseops).sum())


# Whitespace as Python's str.split() sees it (all of it is below U+3001).
_WS_LUT = np.zeros(0x3001, dtype=bool)
for _c in range(0x3001):
    if chr(_c).isspace():
        _WS_LUT[_c] = True
del _c


def _lookup(d: dict, keys: list) -> np.ndarray:
    """np.array([d[k] for k in keys]) at C speed."""
    if len(keys) < 2:
        return np.array([d[k] for k in keys], dtype=np.int64)
    return np.array(operator.itemgetter(*keys)(d), dtype=np.int64)


class PieceByteCounter:
    """Tokenize (already transformed) documents and count original bytes per token.

    ``encode_docs(texts)`` returns ``(ids, lengths, counts)``: the token ids of
    all documents concatenated (int64), the token count of each document, and
    the original-byte count of each token (``None`` when ``with_bytes`` is
    False).  Documents are independent: the result for a document does not
    depend on the batch it came in.  ``caseops`` says whether the texts are
    CaseOps-transformed (operators weigh 0); a plain tokenizer gets False.
    """

    def __init__(self, sp, caseops: bool = True, num_threads: int = 1):
        self.sp = sp
        self.caseops = caseops
        self.num_threads = num_threads
        vocab = sp.vocab_size()
        self.vocab_size = vocab
        table = np.zeros(vocab, dtype=np.int64)  # bytes of a piece, "▁" = 1
        meta = np.zeros(vocab, dtype=np.int64)  # number of "▁" in a piece
        is_byte = np.zeros(vocab, dtype=bool)
        byte_val = np.zeros(vocab, dtype=np.int64)
        unsure = np.zeros(vocab, dtype=bool)  # pieces the fast path cannot price
        for i in range(vocab):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                is_byte[i] = True
                byte_val[i] = int(piece[3:5], 16)
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                unsure[i] = True
            else:
                meta[i] = piece.count(META)
                table[i] = len(piece.encode("utf-8")) - 2 * meta[i]  # "▁" is 3 bytes in UTF-8
                if caseops and piece in OPERATOR_NAMES:
                    table[i] = 0
        self._table, self._meta, self._is_byte, self._byte_val, self._unsure = table, meta, is_byte, byte_val, unsure
        self.dummy_prefix = sp.normalize("a").startswith(META)
        # whitespace (as str.split sees it) that the normalizer does not turn
        # into one plain "▁" (e.g. dropped control characters such as \x1f):
        # the offset mapping prices such runs differently, so those documents
        # take the reference path
        pre = META if self.dummy_prefix else ""
        odd = [c for c in map(chr, range(0x110000)) if c.isspace()
               and sp.normalize("a" + c + "b") != pre + "a" + META + "b"]
        self._odd_ws = re.compile("[" + re.escape("".join(odd)) + "]") if odd else None
        self.fast_docs = 0
        self.slow_docs = 0
        self._init_word_cache()

    # -- reference path: SentencePiece's offset mapping ----------------------
    def encode_one(self, text: str) -> tuple[list[int], np.ndarray]:
        """Ids and per-token original bytes of one document via the offset mapping."""
        res = self.sp.EncodeAsOffsetMapping(text)
        ids = list(res["ids"])
        if not ids:
            return ids, np.zeros(0, dtype=np.int64)
        ends = np.fromiter((e for _, e in res["offsets"]), dtype=np.int64, count=len(ids))
        ends = np.maximum.accumulate(ends)
        ends[-1] = len(text)  # characters the normalizer dropped at the end
        cum = np.concatenate([[0], np.cumsum(char_weights(text, self.caseops))])
        # piece i spans characters [end[i-1], end[i]); a leading gap (characters
        # the normalizer dropped at the start) goes to the first piece
        counts = np.diff(np.concatenate([[0], cum[ends]]))
        return ids, counts

    def _doc_bytes(self, t: str) -> int:
        """Original bytes of a transformed text that holds no ESC."""
        n = len(t.encode("utf-8"))
        if self.caseops:
            n -= 3 * (t.count(TITLE) + t.count(ALLCAPS) + t.count(CAPNEXT))
        return n

    # -- tokenization -----------------------------------------------------------
    def _init_word_cache(self) -> None:
        """Word-level cache: valid when no piece holds a "▁" after its first
        character, so no piece can span a word boundary and a document's
        tokens are the concatenation of its words' tokens."""
        sp = self.sp
        self._wc_ok = False
        self._wdict: dict[str, int] = {}  # word -> entry, for "▁" + word
        self._fdict: dict[str, int] = {}  # word -> entry, for a document's first word
        self._wstart = np.zeros(1 << 16, dtype=np.int64)
        self._wlen = np.zeros(1 << 16, dtype=np.int64)
        self._wtok = np.zeros(1 << 18, dtype=np.int64)
        self._nw = 0
        self._nt = 0
        for i in range(self.vocab_size):
            if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)) and META in sp.id_to_piece(i)[1:]:
                return
        probe = sp.encode("a")
        if len(probe) != 1:
            return
        self._sentinel = probe[0]
        for w in ("hello", "x", "Abc", TITLE + "abc", "1234", "a", "\u6771\u4eac", "e\u0301t\u00e9"):
            with_sentinel = sp.encode("a " + w)
            if with_sentinel[0] != self._sentinel or with_sentinel[1:] != sp.encode("b " + w)[1:]:
                return
            if self.dummy_prefix and sp.encode(w) != with_sentinel[1:]:
                return
        self._wc_ok = True

    _WC_MAX_WORDS = 1 << 19

    def _cache_reset(self) -> None:
        self._wdict.clear()
        self._fdict.clear()
        self._nw = self._nt = 0

    def _cache_add(self, words: list[str], first: bool) -> None:
        bare = first and not self.dummy_prefix
        if not bare and words:
            # all new words in one call: "a w1 w2 ..." -> [a] + tokens(▁w1) + tokens(▁w2) + ...;
            # every word's tokens start with the one piece that holds its "▁"
            flat = np.asarray(self.sp.encode("a " + " ".join(words)), dtype=np.int64)
            heads = np.flatnonzero(self._meta[flat] > 0)
            if len(flat) and flat[0] == self._sentinel and len(heads) == len(words) and heads[0] == 1 \
                    and self._meta[flat].max() == 1:
                lens = np.diff(np.concatenate([heads, [len(flat)]]))
                self._cache_store(words, lens, flat[1:], bare)
                return
        lists = self.sp.encode(words if bare else ["a " + w for w in words], num_threads=self.num_threads)
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum()))
        if not bare:  # drop the sentinel's token in front of every word
            heads = np.concatenate([[0], np.cumsum(lens)[:-1]])
            if len(lists) and (np.any(lens == 0) or np.any(flat[heads] != self._sentinel)):  # pragma: no cover
                raise RuntimeError("word cache sentinel merged with a word")
            keep = np.ones(len(flat), dtype=bool)
            keep[heads] = False
            flat = flat[keep]
            lens = lens - 1
        self._cache_store(words, lens, flat, bare)

    def _cache_store(self, words, lens, flat, bare) -> None:
        nw, nt = self._nw + len(words), self._nt + len(flat)
        while nw > len(self._wstart):
            self._wstart = np.concatenate([self._wstart, np.zeros_like(self._wstart)])
            self._wlen = np.concatenate([self._wlen, np.zeros_like(self._wlen)])
        while nt > len(self._wtok):
            self._wtok = np.concatenate([self._wtok, np.zeros_like(self._wtok)])
        self._wstart[self._nw:nw] = self._nt + np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else 0
        self._wlen[self._nw:nw] = lens
        self._wtok[self._nt:nt] = flat
        d = self._fdict if bare else self._wdict
        d.update(zip(words, range(self._nw, nw)))
        self._nw, self._nt = nw, nt

    def _tokenize(self, texts, simple, parts_of):
        """Token ids of all documents (concatenated) and per-document counts."""
        n = len(texts)
        lengths = np.zeros(n, dtype=np.int64)
        use_cache = self._wc_ok and bool(simple.any())
        direct = [k for k in range(n) if not (use_cache and simple[k])]
        direct_arrs = self.sp.encode([texts[k] for k in direct], out_type="numpy",
                                     num_threads=self.num_threads) if direct else []
        if not use_cache:
            for k, a in zip(direct, direct_arrs):
                lengths[k] = len(a)
            ids = np.concatenate(direct_arrs).astype(np.int64) if direct_arrs else np.zeros(0, np.int64)
            return ids, lengths
        cached = np.flatnonzero(simple)
        plist = [parts_of[k] for k in cached.tolist()]
        firsts = [p[0] for p in plist]
        rest = [w for p in plist for w in p[1:]]
        fd = self._wdict if self.dummy_prefix else self._fdict
        new_rest = set(rest).difference(self._wdict)
        new_first = set(firsts).difference(fd)
        if self._nw + len(new_rest) + len(new_first) > self._WC_MAX_WORDS:
            self._cache_reset()  # bound the memory; results do not depend on the cache
            new_rest, new_first = set(rest), set(firsts)
        if new_rest:
            self._cache_add(list(new_rest), first=False)
        new_first.difference_update(fd)  # with a dummy prefix both forms share one dict
        if new_first:
            self._cache_add(list(new_first), first=True)
        n_words = np.fromiter((len(p) for p in plist), dtype=np.int64, count=len(plist))
        widx = np.empty(int(n_words.sum()), dtype=np.int64)
        first_pos = np.concatenate([[0], np.cumsum(n_words)[:-1]])
        is_first = np.zeros(len(widx), dtype=bool)
        is_first[first_pos] = True
        widx[first_pos] = _lookup(fd, firsts)
        widx[~is_first] = _lookup(self._wdict, rest)
        wl = self._wlen[widx]
        ws = self._wstart[widx]
        total = int(wl.sum())
        gather = np.repeat(ws - (np.cumsum(wl) - wl), wl) + np.arange(total)
        cached_ids = self._wtok[gather]
        doc_of_word = np.repeat(np.arange(len(plist)), n_words)
        lengths[cached] = np.bincount(doc_of_word, weights=wl, minlength=len(plist)).astype(np.int64)
        if not direct:
            return cached_ids, lengths
        for k, a in zip(direct, direct_arrs):
            lengths[k] = len(a)
        pieces = []
        cpos = 0
        di = 0
        for k in range(n):
            if simple[k]:
                m = int(lengths[k])
                pieces.append(cached_ids[cpos:cpos + m])
                cpos += m
            else:
                pieces.append(direct_arrs[di].astype(np.int64))
                di += 1
        return np.concatenate(pieces), lengths

    # -- batch ----------------------------------------------------------------
    def encode_docs(self, texts: Sequence[str], with_bytes: bool = True):
        sp = self.sp
        texts = list(texts)
        n = len(texts)
        if n == 0:
            z = np.zeros(0, dtype=np.int64)
            return z, z.copy(), (z.copy() if with_bytes else None)
        dummy = 1 if self.dummy_prefix else 0
        prefix = META * dummy

        # 1. "simple" documents: the normalized form is the text with every
        #    whitespace run (as str.split sees it) replaced by one "▁".  They
        #    are tokenized word by word through a cache and priced by table.
        simple = np.zeros(n, dtype=bool)
        parts_of: list = [None] * n
        n_runs = np.zeros(n, dtype=np.int64)
        irregular: list[int] = []
        for k, t in enumerate(texts):
            if META in t or (self._odd_ws is not None and self._odd_ws.search(t)):
                continue
            parts = t.split()
            if not parts:
                continue
            joined = META.join(parts)
            if sp.normalize(t) != prefix + joined:
                continue
            simple[k] = True
            parts_of[k] = parts
            n_runs[k] = len(parts) - 1 + dummy
            if not (len(joined) == len(t) and t.isascii()):
                irregular.append(k)  # some whitespace run is longer than one byte
        ids, lengths = self._tokenize(texts, simple, parts_of)
        if not with_bytes:
            return ids, lengths, None
        starts = np.concatenate([[0], np.cumsum(lengths)])
        fast = simple & (lengths > 0)
        if self.caseops:
            for k in np.flatnonzero(fast).tolist():
                if ESC in texts[k]:
                    fast[k] = False
        n_runs[~fast] = 0
        irregular = [k for k in irregular if fast[k]]

        # 2. table price of every token; byte-fallback characters go to their last byte piece
        c = self._table[ids]
        isb = self._is_byte[ids]
        if isb.any():
            bv = self._byte_val[ids]
            c[isb] = 0
            lead_pos = np.flatnonzero(isb & ((bv & 0xC0) != 0x80))
            lb = bv[lead_pos]
            width = np.where(lb >= 0xF0, 4, np.where(lb >= 0xE0, 3, np.where(lb >= 0xC0, 2, 1)))
            last = np.minimum(lead_pos + width - 1, len(c) - 1)
            np.add.at(c, last, width)

        # 3. whitespace runs: a "▁" credits the whole run it replaced
        run_off = np.concatenate([[0], np.cumsum(n_runs)])
        extras = np.zeros(int(run_off[-1]), dtype=np.int64)
        if dummy:
            extras[run_off[:-1][fast]] = -1  # the dummy "▁" stands for no byte
        if irregular:
            big = "x".join(texts[k] for k in irregular)
            cp = _codepoints(big)
            ws = np.zeros(len(cp), dtype=bool)
            small = cp < len(_WS_LUT)
            ws[small] = _WS_LUT[cp[small]]
            run_start = ws & ~np.concatenate([[False], ws[:-1]])
            run_id = np.cumsum(run_start) - 1
            e = np.bincount(run_id[ws], weights=_utf8_lengths(cp[ws]),
                            minlength=int(run_start.sum())).astype(np.int64) - 1
            irr = np.array(irregular)
            cnt = n_runs[irr] - dummy
            if e.size == int(cnt.sum()):
                base = run_off[irr] + dummy
                first = np.concatenate([[0], np.cumsum(cnt)[:-1]])
                pos = np.repeat(base - first, cnt) + np.arange(e.size)
                extras[pos] = e
            else:  # pragma: no cover - defensive
                fast[irr] = False
        doc_of_tok = np.repeat(np.arange(n), lengths)
        meta = self._meta[ids]
        meta_incl = np.cumsum(meta)
        meta_before_doc = np.concatenate([[0], meta_incl])[starts[:-1]]
        n_meta_doc = np.bincount(doc_of_tok, weights=meta, minlength=n).astype(np.int64)
        fast &= n_meta_doc == n_runs
        tok_fast = fast[doc_of_tok]
        if tok_fast.any():
            d = doc_of_tok[tok_fast]
            hi = run_off[d] + meta_incl[tok_fast] - meta_before_doc[d]
            lo = hi - meta[tok_fast]
            cum_extra = np.concatenate([[0], np.cumsum(extras)])
            c[tok_fast] += cum_extra[hi] - cum_extra[lo]

        # 4. self-check, then the reference path for everything else
        sums = np.bincount(doc_of_tok, weights=c, minlength=n)
        unsure_doc = np.bincount(doc_of_tok, weights=self._unsure[ids], minlength=n) > 0
        for k in range(n):
            if fast[k] and not unsure_doc[k] and int(sums[k]) == self._doc_bytes(texts[k]):
                self.fast_docs += 1
                continue
            ids_k, cc = self.encode_one(texts[k])
            if not np.array_equal(ids[starts[k]:starts[k + 1]], ids_k):  # pragma: no cover
                raise RuntimeError("SentencePiece returned different ids for the offset mapping")
            c[starts[k]:starts[k + 1]] = cc
            self.slow_docs += 1
        return ids, lengths, c


def operator_ids(sp) -> dict[str, int]:
    """Token ids of the four operators; raises ValueError if a tokenizer lacks one."""
    found = {}
    missing = []
    for op, name in OPERATOR_NAMES.items():
        pid = sp.piece_to_id(op)
        if sp.id_to_piece(pid) != op or sp.encode(op) != [pid]:
            missing.append(f"{name} (U+{ord(op):04X})")
        else:
            found[op] = pid
    if missing:
        raise ValueError("tokenizer lacks the CaseOps operator symbols " + ", ".join(missing)
                         + " as single pieces")
    return found
