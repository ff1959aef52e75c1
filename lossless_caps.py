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
the offset mapping otherwise.  For a text of "plain" characters that check
needs no call to the normalizer: :func:`plain_characters` reads the model's
normalization rules and proves it per character, and
:meth:`PieceByteCounter.encode_originals` then tokenizes untransformed texts
word by word without applying the transform to the whole text.  Only
sentencepiece's plain Python API is used (no protobuf, no
``encode_as_immutable_proto``; the model file is read by hand).
"""

from __future__ import annotations

import itertools
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

# Runs that start at the first uppercase letter of an ASCII-letter run and go
# greedily to its end (split keeps them: odd items); all-lowercase runs never
# match and stay untouched.  A run preceded by a (necessarily lowercase) letter
# is the tail of a mixed word such as "iPhone".
_UPPER_RUN = re.compile(r"([A-Z][A-Za-z]*)")
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


def _encode_tail(run: str) -> str:
    """CaseOps form of the uppercase-led tail of a word with a lowercase head."""
    return _UPPER_LETTER.sub(CAPNEXT + r"\1", run).lower()


def _encode_new_word(word: str) -> str:
    if len(_WORD_CACHE) >= _WORD_CACHE_MAX:
        _WORD_CACHE.clear()
    out = _WORD_CACHE[word] = _encode_word(word)
    return out


def encode(text: str) -> str:
    """Apply the CaseOps transform to ``text`` (any Unicode string)."""
    if _LITERAL_OPERATOR.search(text) is not None:
        text = _LITERAL_OPERATOR.sub(lambda m: ESC + m.group(), text)
    parts = _UPPER_RUN.split(text)  # text, run, text, run, ..., text
    if len(parts) == 1:
        return text
    get = _WORD_CACHE.get
    parts[1::2] = [_encode_tail(run) if "a" <= before[-1:] <= "z" else (get(run) or _encode_new_word(run))
                   for before, run in zip(parts[0::2], parts[1::2])]
    return "".join(parts)


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


# --------------------------------------------------------------------------
# the tokenizer's normalizer, read from the model file (no protobuf)
# --------------------------------------------------------------------------

def _proto_fields(buf: bytes):
    """(field number, value) of each field of a serialized protobuf message;
    varints as int, everything else as bytes."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while i < n:
        key = varint()
        wire = key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            size = varint()
            value = buf[i:i + size]
            i += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value = buf[i:i + size]
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


# sentencepiece_model.proto: ModelProto.pieces = 1 (SentencePiece.piece = 1,
# .type = 3, USER_DEFINED = 4), .trainer_spec = 2 (treat_whitespace_as_suffix
# = 24), .normalizer_spec = 3 (precompiled_charsmap = 2, add_dummy_prefix = 3,
# remove_extra_whitespaces = 4, escape_whitespaces = 5; the bools default true)
def _read_model(proto: bytes):
    user_defined, trainer, normalizer = [], {}, {}
    for num, value in _proto_fields(proto):
        if num == 1:
            piece = dict(_proto_fields(value))
            if piece.get(3, 1) == 4:
                user_defined.append(piece[1].decode("utf-8"))
        elif num == 2:
            trainer.update(_proto_fields(value))
        elif num == 3:
            normalizer.update(_proto_fields(value))
    return user_defined, trainer, normalizer


def _unit_offset(u):
    """Children base of a darts-clone double-array unit (vectorised)."""
    return (u >> 10) << ((u & (1 << 9)) >> 6)


_LABEL_MASK = (1 << 31) | 0xFF


def _utf8_char_len(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF5 else 0


def plain_characters(model_proto: bytes) -> np.ndarray | None:
    """Which BMP characters the tokenizer's normalizer provably leaves alone.

    Returns a boolean table over U+0000..U+FFFF such that every text made only
    of table characters, not all whitespace, normalizes to
    ``"▁".join(text.split())`` (behind the dummy "▁" if the model adds one):
    non-whitespace characters stay as they are and every whitespace run
    (``str.isspace``) becomes one "▁".  None when
    the model's whitespace options are not the ones this relies on
    (remove_extra_whitespaces, escape_whitespaces, whitespace as prefix).

    Why it holds.  SentencePiece's normalizer (normalizer.cc) walks the text
    and at each position emits either a user-defined symbol that starts there
    (unchanged), or the replacement of the longest key of its charsmap trie
    (``precompiled_charsmap``, a darts-clone double array) that prefixes the
    rest of the text, or else the next character unchanged; replacements " "
    become "▁", leading, trailing and repeated spaces are dropped.  A table
    character c is no proper prefix of a user-defined symbol, no key ends
    inside its UTF-8 bytes, and no key extends c by (a prefix of) another
    table character: every character that follows some character in a key is
    left out of the table.  So the longest match at c is c itself or nothing,
    and the table keeps only characters whose own replacement is c (non-space)
    or " " (space).
    """
    user_defined, trainer, spec = _read_model(model_proto)
    if not (spec.get(4, 1) and spec.get(5, 1)) or trainer.get(24, 0):
        return None
    cp = np.arange(0x10000, dtype=np.int64)
    ok = (cp < 0xD800) | (cp > 0xDFFF)
    ok[ord(META)] = False
    n_bytes = 1 + (cp >= 0x80) + (cp >= 0x800)
    utf8 = np.stack([np.where(n_bytes == 1, cp, np.where(n_bytes == 2, 0xC0 | (cp >> 6), 0xE0 | (cp >> 12))),
                     np.where(n_bytes == 2, 0x80 | (cp & 0x3F), 0x80 | ((cp >> 6) & 0x3F)),
                     0x80 | (cp & 0x3F)], axis=1)
    replaced: dict[int, str] = {}  # characters that are keys of the trie -> their replacement
    charsmap = spec.get(2, b"")
    if charsmap:
        size = int.from_bytes(charsmap[:4], "little")
        units = np.frombuffer(charsmap[4:4 + size], dtype="<u4").astype(np.int64)
        strings = charsmap[4 + size:]
        n_units = len(units)

        def child(base, label):
            """Unit index of the child ``label`` of nodes with children base ``base`` (-1: none)."""
            pos = base ^ label
            inside = (base >= 0) & (pos < n_units)
            unit = units[np.where(inside, pos, 0)]
            return np.where(inside & ((unit & _LABEL_MASK) == label), pos, -1), unit

        # walk every character's UTF-8 bytes down the trie
        base = np.full(len(cp), int(_unit_offset(units[0])))
        for j in range(3):
            pos, unit = child(np.where(n_bytes > j, base, -1), utf8[:, j])
            has_leaf = (pos >= 0) & ((unit >> 8) & 1 == 1)
            ok &= ~(has_leaf & (n_bytes > j + 1))  # a key ending inside the character
            base = np.where(n_bytes > j, np.where(pos >= 0, pos ^ _unit_offset(unit), -1), base)
            for c in np.flatnonzero(has_leaf & (n_bytes == j + 1)).tolist():
                v = int(units[base[c]] & 0x7FFFFFFF)
                replaced[c] = strings[v:strings.index(b"\0", v)].decode("utf-8")
        # characters that continue a key: breadth-first through the (few) nodes below a character
        frontier, paths = base[base >= 0], [b""] * int((base >= 0).sum())
        for _ in range(3):
            next_frontier, next_paths = [], []
            for label in range(1, 256):
                pos, unit = child(frontier, label)
                for k in np.flatnonzero(pos >= 0).tolist():
                    path = paths[k] + bytes([label])
                    want = _utf8_char_len(path[0])
                    if want == 0 or want == 4 or any(b & 0xC0 != 0x80 for b in path[1:]):
                        continue  # no BMP character's UTF-8 starts like this
                    if len(path) == want:
                        ok[ord(path.decode("utf-8"))] = False  # follows another character in a key
                        continue
                    if (unit[k] >> 8) & 1:  # a key ending inside a character: all that start so
                        ok &= ~((n_bytes == want) & np.all(utf8[:, :len(path)] == list(path), axis=1))
                    next_frontier.append(int(pos[k] ^ _unit_offset(unit[k])))
                    next_paths.append(path)
            frontier, paths = np.array(next_frontier, dtype=np.int64), next_paths
            if not next_paths:
                break
    single_symbols = set()
    for sym in user_defined:
        if len(sym) > 1 and ord(sym[0]) < 0x10000:
            ok[ord(sym[0])] = False
        elif len(sym) == 1:
            single_symbols.add(sym)
    for c in np.flatnonzero(ok).tolist():
        ch = chr(c)
        out = ch if ch in single_symbols else replaced.get(c, ch)
        if out != (" " if ch.isspace() else ch):
            ok[c] = False
    return ok


def _outside(mask: np.ndarray) -> re.Pattern:
    """A regex matching one character that is not in ``mask`` (a table over the BMP)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    ranges = "".join(f"\\u{lo:04x}-\\u{hi - 1:04x}" for lo, hi in zip(edges[::2].tolist(), edges[1::2].tolist()))
    return re.compile(f"[^{ranges}]" if ranges else "(?s:.)")


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
        odd = [c for c in map(chr, np.flatnonzero(_WS_LUT).tolist())
               if sp.normalize("a" + c + "b") != pre + "a" + META + "b"]
        self._odd_ws = re.compile("[" + re.escape("".join(odd)) + "]") if odd else None
        # texts made of "plain" characters provably normalize to "▁".join(text.split()),
        # so they need no sp.normalize call to be tokenized word by word
        try:
            plain = plain_characters(sp.serialized_model_proto())
        except (ValueError, IndexError):  # a model file this reader does not follow: ask the normalizer
            plain = None
        self._not_plain = None if plain is None else _outside(plain)
        # originals whose CaseOps form is plain: plain characters and A-Z, when the
        # letters a-z and the operators the transform writes are plain themselves
        self._not_plain_original = self._not_plain
        if caseops and plain is not None:
            self._not_plain_original = None
            if all(plain[ord(c)] for c in "abcdefghijklmnopqrstuvwxyz" + "".join(OPERATORS)):
                plain = plain.copy()
                plain[ord("A"):ord("Z") + 1] = True
                self._not_plain_original = _outside(plain)
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
        # word -> entry: for "▁" + word, and for a document's first word (no "▁"
        # unless the model adds a dummy prefix); "transformed" words are the
        # texts' own words, "original" ones words before the CaseOps transform
        self._dicts = {(False, False): {}, (False, True): {}, (True, False): {}, (True, True): {}}
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
    _CHUNK_WORDS = 64

    def _word_dicts(self, originals: bool) -> tuple[dict, dict]:
        """(dict for later words, dict for first words); one dict with a dummy prefix."""
        first = not self.dummy_prefix
        return self._dicts[(originals, False)], self._dicts[(originals, first)]

    def _cache_reset(self) -> None:
        for d in self._dicts.values():
            d.clear()
        self._nw = self._nt = 0

    def _cache_add(self, keys: list[str], first: bool, originals: bool) -> None:
        """Tokenize new words (the CaseOps form of ``keys`` if ``originals``) into the cache."""
        # words hold no whitespace, and the transform keeps whitespace: one call for all
        words = encode("\n".join(keys)).split("\n") if originals and keys else keys
        d = self._word_dicts(originals)[1 if first else 0]
        bare = first and not self.dummy_prefix
        if not bare and words:
            # a few words per text: "a w1 w2 ..." -> [a] + tokens(▁w1) + tokens(▁w2) + ...; every
            # word's tokens start with the one piece that holds its "▁" (texts of a few dozen
            # words tokenize several times faster than one long text); the rest one by one below
            step = self._CHUNK_WORDS
            starts = range(0, len(words), step)
            results = self.sp.encode(["a " + " ".join(words[i:i + step]) for i in starts],
                                     num_threads=self.num_threads)
            done_keys, done_lens, done_flat, retry = [], [], [], []
            for i, res in zip(starts, results):
                flat = np.asarray(res, dtype=np.int64)
                n = min(step, len(words) - i)
                heads = np.flatnonzero(self._meta[flat] > 0)
                if len(flat) and flat[0] == self._sentinel and len(heads) == n and heads[0] == 1 \
                        and self._meta[flat].max() == 1:
                    done_keys += keys[i:i + n]
                    done_lens.append(np.diff(np.concatenate([heads, [len(flat)]])))
                    done_flat.append(flat[1:])
                else:
                    retry += range(i, i + n)
            if done_keys:
                self._cache_store(done_keys, np.concatenate(done_lens), np.concatenate(done_flat), d)
            if not retry:
                return
            keys, words = [keys[i] for i in retry], [words[i] for i in retry]
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
        self._cache_store(keys, lens, flat, d)

    def _cache_store(self, keys, lens, flat, d: dict) -> None:
        nw, nt = self._nw + len(keys), self._nt + len(flat)
        while nw > len(self._wstart):
            self._wstart = np.concatenate([self._wstart, np.zeros_like(self._wstart)])
            self._wlen = np.concatenate([self._wlen, np.zeros_like(self._wlen)])
        while nt > len(self._wtok):
            self._wtok = np.concatenate([self._wtok, np.zeros_like(self._wtok)])
        self._wstart[self._nw:nw] = self._nt + np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else 0
        self._wlen[self._nw:nw] = lens
        self._wtok[self._nt:nt] = flat
        d.update(zip(keys, range(self._nw, nw)))
        self._nw, self._nt = nw, nt

    def _cached_ids(self, word_lists: list[list[str]], originals: bool = False):
        """Ids (concatenated) and token counts of documents given as their
        (non-empty) lists of words, through the word cache.  The caller has
        established that each document normalizes to "▁".join(words)."""
        if not word_lists:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        wd, fd = self._word_dicts(originals)
        words = list(itertools.chain.from_iterable(word_lists))
        n_words = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(word_lists))
        first_pos = np.concatenate([[0], np.cumsum(n_words)[:-1]])
        idx = np.fromiter(map(wd.get, words, itertools.repeat(-1)), dtype=np.int64, count=len(words))
        if fd is not wd:
            idx[first_pos] = np.fromiter(map(fd.get, (p[0] for p in word_lists), itertools.repeat(-1)),
                                         dtype=np.int64, count=len(word_lists))
        missing = np.flatnonzero(idx < 0)
        if missing.size:
            is_first = np.zeros(len(words), dtype=bool)
            if fd is not wd:
                is_first[first_pos] = True
            miss_first = is_first[missing]
            new_rest = set(map(words.__getitem__, missing[~miss_first].tolist()))
            new_first = set(map(words.__getitem__, missing[miss_first].tolist()))
            if self._nw and self._nw + len(new_rest) + len(new_first) > self._WC_MAX_WORDS:
                self._cache_reset()  # bound the memory; results do not depend on the cache
                return self._cached_ids(word_lists, originals)
            if new_rest:
                self._cache_add(list(new_rest), first=False, originals=originals)
            if new_first:
                self._cache_add(list(new_first), first=True, originals=originals)
            for d, pos in ((wd, missing[~miss_first]), (fd, missing[miss_first])):
                idx[pos] = np.fromiter(map(d.__getitem__, map(words.__getitem__, pos.tolist())),
                                       dtype=np.int64, count=len(pos))
        wl = self._wlen[idx]
        ws = self._wstart[idx]
        gather = np.repeat(ws - (np.cumsum(wl) - wl), wl) + np.arange(int(wl.sum()))
        lengths = np.add.reduceat(wl, first_pos)
        return self._wtok[gather], lengths

    @staticmethod
    def _merge(n: int, parts) -> tuple[np.ndarray, np.ndarray]:
        """Interleave ``(doc_indices, ids, lengths)`` groups back into document order."""
        lengths = np.zeros(n, dtype=np.int64)
        for docs, _, lens in parts:
            lengths[docs] = lens
        starts = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.zeros(int(starts[-1]), dtype=np.int64)
        for docs, part_ids, lens in parts:
            if len(part_ids):
                ids[np.repeat(starts[docs] - (np.cumsum(lens) - lens), lens) + np.arange(len(part_ids))] = part_ids
        return ids, lengths

    def _ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and token counts of (transformed) texts.  A text's normalized
        form is known without asking the normalizer when the text is plain;
        when that form splits at its "▁"s into non-empty plain words, the
        text is tokenized word by word through the cache (SentencePiece
        tokenizes a plain word the same in any plain context), otherwise by
        SentencePiece itself."""
        if not self._wc_ok:
            return self._tokenize(texts, np.zeros(len(texts), dtype=bool), None)
        not_plain = self._not_plain.search
        dummy = 1 if self.dummy_prefix else 0
        cached, word_lists, direct = [], [], []
        for k, t in enumerate(texts):
            if not_plain(t) is None:
                words = t.split()
            else:
                body = self.sp.normalize(t)[dummy:]
                words = None
                if body and not body.startswith(META) and not body.endswith(META) and META + META not in body \
                        and not_plain(body.replace(META, " ")) is None:
                    words = body.split(META)
            if words:
                cached.append(k)
                word_lists.append(words)
            else:
                direct.append(k)
        groups = [(np.array(cached, dtype=np.int64), *self._cached_ids(word_lists))]
        if direct:
            arrs = self.sp.encode([texts[k] for k in direct], out_type="numpy", num_threads=self.num_threads)
            lens = np.fromiter(map(len, arrs), dtype=np.int64, count=len(arrs))
            groups.append((np.array(direct, dtype=np.int64), np.concatenate(arrs).astype(np.int64), lens))
        return self._merge(len(texts), groups)

    def _tokenize(self, texts, simple, parts_of, known=None):
        """Token ids of all documents (concatenated) and per-document counts
        (``known``: ids of some documents that are not simple, already tokenized)."""
        n = len(texts)
        use_cache = self._wc_ok and bool(simple.any())
        known = known or {}
        direct = [k for k in range(n) if not (use_cache and simple[k]) and k not in known]
        parts = []
        if known:
            arrs = list(known.values())
            lens = np.fromiter(map(len, arrs), dtype=np.int64, count=len(arrs))
            parts.append((np.array(list(known), dtype=np.int64), np.concatenate(arrs).astype(np.int64), lens))
        if direct:
            arrs = self.sp.encode([texts[k] for k in direct], out_type="numpy", num_threads=self.num_threads)
            lens = np.fromiter(map(len, arrs), dtype=np.int64, count=len(arrs))
            parts.append((np.array(direct, dtype=np.int64), np.concatenate(arrs).astype(np.int64), lens))
        if use_cache:
            cached = np.flatnonzero(simple)
            parts.append((cached, *self._cached_ids([parts_of[k] for k in cached.tolist()])))
        return self._merge(n, parts)

    # -- batch ----------------------------------------------------------------
    def encode_docs(self, texts: Sequence[str], with_bytes: bool = True):
        sp = self.sp
        texts = list(texts)
        n = len(texts)
        if n == 0:
            z = np.zeros(0, dtype=np.int64)
            return z, z.copy(), (z.copy() if with_bytes else None)
        if not with_bytes and self._not_plain is not None:
            return (*self._ids(texts), None)
        dummy = 1 if self.dummy_prefix else 0
        prefix = META * dummy

        # 1. "simple" documents: the normalized form is the text with every
        #    whitespace run (as str.split sees it) replaced by one "▁" (known
        #    for texts of plain characters, asked of the normalizer otherwise).
        #    They are tokenized word by word through a cache and priced by table.
        simple = np.zeros(n, dtype=bool)
        parts_of: list = [None] * n
        n_runs = np.zeros(n, dtype=np.int64)
        irregular: list[int] = []
        for k, t in enumerate(texts):
            if self._not_plain is None or self._not_plain.search(t) is not None:
                if META in t or (self._odd_ws is not None and self._odd_ws.search(t)):
                    continue
                parts = t.split()
                if not parts or sp.normalize(t) != prefix + META.join(parts):
                    continue
            else:
                parts = t.split()
                if not parts:
                    continue
            simple[k] = True
            parts_of[k] = parts
            n_runs[k] = len(parts) - 1 + dummy
            if with_bytes and not (t.isascii() and len(t) == len(parts) - 1 + sum(map(len, parts))):
                irregular.append(k)  # some whitespace run is longer than one byte
        # documents the table cannot price: ids and counts from the offset mapping, in one pass
        reference = {k: self.encode_one(texts[k]) for k in np.flatnonzero(~simple).tolist()} if with_bytes else {}
        ids, lengths = self._tokenize(texts, simple, parts_of, {k: np.asarray(r[0], dtype=np.int64)
                                                                for k, r in reference.items()})
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
            ids_k, cc = reference[k] if k in reference else self.encode_one(texts[k])
            if not np.array_equal(ids[starts[k]:starts[k + 1]], ids_k):  # pragma: no cover
                raise RuntimeError("SentencePiece returned different ids for the offset mapping")
            c[starts[k]:starts[k + 1]] = cc
            self.slow_docs += 1
        return ids, lengths, c

    def encode_originals(self, texts: Sequence[str], with_bytes: bool = True):
        """``encode_docs`` of the CaseOps forms of ``texts`` (with ``caseops``
        False: of the texts themselves).

        Without bytes, a text of plain characters (and A-Z) skips the
        transform and the normalizer: the CaseOps form of its words is the
        list of words of its CaseOps form (the transform keeps whitespace and
        works within runs of letters), and the cache holds each original word
        with the tokens of its CaseOps form.
        """
        if not self.caseops:
            return self.encode_docs(texts, with_bytes)
        texts = list(texts)
        if with_bytes or self._not_plain_original is None or not self._wc_ok:
            return self.encode_docs([encode(t) for t in texts], with_bytes)
        plain, word_lists, other = [], [], []
        for k, t in enumerate(texts):
            words = t.split() if self._not_plain_original.search(t) is None else None
            if words:
                plain.append(k)
                word_lists.append(words)
            else:
                other.append(k)
        groups = [(np.array(plain, dtype=np.int64), *self._cached_ids(word_lists, originals=True))]
        if other:
            groups.append((np.array(other, dtype=np.int64), *self._ids([encode(texts[k]) for k in other])))
        ids, lengths = self._merge(len(texts), groups)
        return ids, lengths, None


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
