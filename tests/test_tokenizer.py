"""Tokenizer: fairseq's known vectors, parity with transformers' RobertaTokenizer, offsets,
truncation, fill-mask encoding and vocabulary round trips. Everything offline."""

from __future__ import annotations

import hashlib
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from roberta_server.tokenizer import DATA_DIR, Encoding, SequenceTooLongError, Tokenizer

SPECIAL_STRINGS = ("<s>", "</s>", "<pad>", "<unk>", "<mask>")


def _real_text_lines(minimum: int = 3000) -> list[str]:
    """Real English prose available offline: the Python documentation topics shipped with the
    standard library, topped up with stdlib source lines if a distribution strips them."""
    lines: list[str] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        lines.extend(line for line in topics[key].splitlines() if line.strip())
    if len(lines) < minimum:
        stdlib = Path(random.__file__).parent
        for path in sorted(stdlib.glob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            lines.extend(line for line in text.splitlines() if line.strip())
            if len(lines) >= minimum:
                break
    return lines


EDGE_CASES = [
    "👍",
    "👨‍👩‍👧‍👦 family",
    "flags 🇫🇷🇯🇵🏳️‍🌈",
    "skin tones 👋🏽👋🏿",
    "日本語のテキストです。",
    "中文 测试，标点！",
    "한국어 텍스트",
    "e\u0301cole, cafe\u0301",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̯̝",
    "שלום עולם",
    "مرحبا بالعالم",
    "mixed עברית and English",
    "a\tb\t\tc",
    "a\n\nb\n",
    "line\r\nnext\r\n",
    "a     b",
    "   leading spaces",
    "trailing spaces   ",
    " \n ",
    "\t\t",
    "x  \n  y",
    "I'M HERE",
    "don't, won't, we'll, they'RE, you've, I'd",
    "'s's't",
    "  's",
    "12345678901234567890",
    "3.14159 and 2,718",
    "١٢٣ arabic-indic digits, Ⅻ roman, ½ ¾",
    "!!!???...",
    "--==**&&^^%%",
    "a\u00a0b\u00a0\u00a0c",
    "zero\u200bwidth\u200cjoin\u200dchars",
    "\ufeffbyte order mark",
    "soft\u00adhyphen",
    "a\u2028b\u2029c",
    "ideographic\u3000space",
    "em\u2003space",
    "\x00\x01\x7f control",
    "Ünïcödé façade",
    "ﬁ ligature 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "a" * 300,
    "x" + "ab" * 200,
    "supercalifragilisticexpialidocious" * 8,
    "0123456789" * 30,
    "=" * 100,
    "<not special> [CLS] <|endoftext|>",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def lines() -> list[str]:
    out = _real_text_lines()
    assert len(out) >= 3000
    return out


@pytest.fixture(scope="module")
def paragraphs(lines: list[str]) -> list[str]:
    """Groups of lines joined by newlines: indentation, newlines and spaces between them."""
    return ["\n".join(lines[i : i + 4]) for i in range(0, 2000, 4)]


@pytest.fixture(scope="module")
def random_words() -> list[str]:
    """Long unusual words: these take the heap merge path, so they are checked against HF."""
    rng = random.Random(1234)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/éß日本"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(20, 400))) for _ in range(200)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Path:
    path = tmp_path_factory.mktemp("hf")
    tok.save_hf(path)
    return path


@pytest.fixture(scope="module")
def hf_tok(hf_dir: Path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.RobertaTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    # The comparison below assumes fairseq's conventions: no prefix space, <s> A </s></s> B </s>.
    assert hf.add_prefix_space is False
    assert hf("Hello world")["input_ids"] == [0, 31414, 232, 2]
    return hf


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte table, derived independently here from its definition."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in kept}
    shifted = [b for b in range(256) if b not in kept]
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


BYTE_DECODER = _byte_decoder()


def _token_bytes(token: str) -> bytes:
    return bytes(BYTE_DECODER[c] for c in token)


# ---------------------------------------------------------------------------------- known vectors


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world!", [0, 31414, 232, 328, 2]),
        ("Hello world", [0, 31414, 232, 2]),
        (" world", [0, 232, 2]),
        ("world", [0, 8331, 2]),
        (" Hello", [0, 20920, 2]),
        ("The quick brown fox", [0, 133, 2119, 6219, 23602, 2]),
        ("Jack and jill", [0, 20907, 8, 1236, 1873, 2]),
        ("", [0, 2]),
    ],
)
def test_known_vectors(tok: Tokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_vocabulary_layout(tok: Tokenizer) -> None:
    assert (tok.bos, tok.pad, tok.eos, tok.unk, tok.mask) == (0, 1, 2, 3, 50264)
    assert tok.vocab_size == 50265
    assert Tokenizer.default() is tok
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4, 5, 232, 50261, 50263, 50264]) == [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
        ".",
        "Ġthe",
        "Ġworld",
        "madeupword0000",
        "madeupword0002",
        "<mask>",
    ]
    assert tok.cache_info().maxsize == 100_000


def test_trailing_newline(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world\n")
    assert ids[-2:] == [50118, 2]
    assert tok.decode(ids) == "Hello world\n"


def test_pair_three_segments_and_no_separator(tok: Tokenizer) -> None:
    a, b, c = "this is a sentence", "this is another sentence", "and a third"
    pair = tok.encode(a, b)
    assert pair == [0, 9226, 16, 10, 3645, 2, 2, 9226, 16, 277, 3645, 2]
    assert tok.decode(pair) == [a, b]
    ia, ib, ic = (tok.encode(t)[1:-1] for t in (a, b, c))
    assert tok.encode(a, b, c) == [0, *ia, 2, 2, *ib, 2, 2, *ic, 2]
    assert tok.decode(tok.encode(a, b, c)) == [a, b, c]
    joined = tok.encode(a, b, no_separator=True)
    assert joined == [0, *ia, 2, *ib, 2]
    assert tok.decode(joined) == a + b  # fairseq quirk: a single </s> does not split
    assert tok.encode("", "") == [0, 2, 2, 2]


def test_literal_specials_are_plain_text(tok: Tokenizer) -> None:
    ids = tok.encode("x <mask> y")
    assert ids == [0, 1178, 28696, 43776, 15698, 1423, 2]
    assert tok.convert_ids_to_tokens(ids[2:5]) == ["Ġ<", "mask", ">"]
    for text in ("<s>", "a </s></s> b", "<pad><unk>"):
        ids = tok.encode(text)
        assert ids[0] == 0 and ids[-1] == 2
        assert not set(ids[1:-1]) & {0, 1, 2, 3, tok.mask}
        assert tok.decode(ids) == text


def test_lone_surrogate_is_an_error(tok: Tokenizer) -> None:
    with pytest.raises(UnicodeEncodeError):
        tok.encode("broken \ud800 text")


def test_token_text(tok: Tokenizer) -> None:
    (year,) = tok.encode(" 1977")[1:-1]
    assert tok.token_text(year) == " 1977"
    assert tok.token_text(tok.encode("Euro")[1]) == "Euro"
    assert tok.token_text(tok.unk) == "<unk>"
    assert tok.token_text(tok.mask) == "<mask>"
    assert tok.token_text(tok.bos) == "<s>"
    with pytest.raises(ValueError):
        tok.token_text(tok.vocab_size)


# ---------------------------------------------------------------------------------- HF parity


def _hf_comparable(texts: list[str]) -> list[str]:
    # transformers splits out special-token strings found in raw text; fairseq does not.
    return [t for t in texts if not any(s in t for s in SPECIAL_STRINGS)]


def test_hf_parity_real_text(tok: Tokenizer, hf_tok, lines: list[str], paragraphs) -> None:
    texts = _hf_comparable(lines + paragraphs)
    assert len(texts) >= 3000
    theirs = hf_tok(texts)["input_ids"]
    mismatches = [t for t, ids in zip(texts, theirs, strict=True) if tok.encode(t) != ids]
    assert mismatches == []


def test_hf_parity_pairs(tok: Tokenizer, hf_tok, lines: list[str]) -> None:
    texts = _hf_comparable(lines[:1001])
    firsts, seconds = texts[:-1:2], texts[1::2]
    theirs = hf_tok(firsts, seconds)["input_ids"]
    mismatches = [
        (a, b) for a, b, ids in zip(firsts, seconds, theirs, strict=True) if tok.encode(a, b) != ids
    ]
    assert mismatches == []


def test_hf_parity_edge_cases(tok: Tokenizer, hf_tok, random_words) -> None:
    texts = _hf_comparable(EDGE_CASES + random_words)
    # Every BMP character outside the surrogates, alone and in runs, between words.
    rng = random.Random(7)
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000]
    texts += [f"a{c}b c{c}{c}  {c}d" for c in chars[::7]]
    texts += ["".join(rng.choice(chars) for _ in range(40)) for _ in range(300)]
    texts = _hf_comparable(texts)
    theirs = hf_tok(texts)["input_ids"]
    mismatches = [t for t, ids in zip(texts, theirs, strict=True) if tok.encode(t) != ids]
    assert mismatches == []


def test_heap_merge_matches_rescan(tok: Tokenizer, lines: list[str], random_words) -> None:
    # Long words use a heap merge; it must give the rescanning loop's result on any word.
    from roberta_server.tokenizer import _BYTE_TO_CHAR, _PRETOKENIZE

    assert tok._heap_ok
    words = {p for line in lines[:1500] + random_words for p in _PRETOKENIZE.findall(line)}
    for piece in words:
        word = piece.encode().decode("latin-1").translate(_BYTE_TO_CHAR)
        assert tok._bpe_heap(word) == tok._bpe_rescan(word), piece


# ---------------------------------------------------------------------------------- decode


def test_decode_round_trip(tok: Tokenizer, lines: list[str], paragraphs, random_words) -> None:
    failures = [
        t for t in lines + paragraphs + EDGE_CASES + random_words if tok.decode(tok.encode(t)) != t
    ]
    assert failures == []


def test_decode_special_cases(tok: Tokenizer) -> None:
    assert tok.decode([]) == ""
    assert tok.decode([0, 2]) == ""
    assert tok.decode([31414, 232]) == "Hello world"  # no leading <s>
    assert tok.decode([0, 31414, 3, 232, 2]) == "Hello<unk> world"
    assert tok.decode([0, 31414, tok.mask, 2]) == "Hello<mask>"
    assert tok.decode((0, 31414, 2, 2, 232, 2, 2, 8331, 2)) == ["Hello", " world", "world"]
    # A multi-byte character cut between tokens decodes with replacement characters.
    emoji = tok.encode("👍")[1:-1]
    assert len(emoji) > 1
    assert tok.decode(emoji[:1]) == "\ufffd"


def test_decode_tensor_input(tok: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = tok.encode("Hello world!")
    assert tok.decode(torch.tensor(ids)) == "Hello world!"


@pytest.mark.parametrize(
    "ids", [[0, 31414, 1, 2], [0, 50261, 2], [0, 50265, 2], [0, -1, 2], [[0, 2]]]
)
def test_decode_rejects_undecodable_ids(tok: Tokenizer, ids) -> None:
    with pytest.raises(ValueError):
        tok.decode(ids)


# ---------------------------------------------------------------------------------- offsets


def _check_offsets(tok: Tokenizer, texts: list[str], enc: Encoding) -> None:
    n = len(enc.ids)
    assert (
        len(enc.tokens)
        == len(enc.segments)
        == len(enc.starts)
        == len(enc.ends)
        == len(enc.special)
        == n
    )
    for seg, text in enumerate(texts):
        idx = [i for i in range(n) if enc.segments[i] == seg and not enc.special[i]]
        covered = 0
        rebuilt = []
        token_bytes = b""
        for i in idx:
            start, end = enc.starts[i], enc.ends[i]
            assert start < end
            # Spans only overlap where a character is split between tokens.
            assert start <= covered and end >= covered
            rebuilt.append(text[covered:end])
            covered = end
            raw = _token_bytes(enc.tokens[i])
            token_bytes += raw
            assert raw in text[start:end].encode("utf-8")
            assert tok._token_to_id.get(enc.tokens[i], tok.unk) == enc.ids[i]
        assert "".join(rebuilt) == text
        assert token_bytes == text.encode("utf-8")


def test_offsets_over_corpus(tok: Tokenizer, lines: list[str], paragraphs, random_words) -> None:
    for text in lines + paragraphs + EDGE_CASES + random_words:
        enc = tok.encode_with_offsets(text)
        assert enc.ids == tok.encode(text)
        assert not enc.truncated
        assert tok.encode_with_truncation(text) == (enc.ids, False)
        _check_offsets(tok, [text], enc)


def test_offsets_examples(tok: Tokenizer) -> None:
    enc = tok.encode_with_offsets("Hello world!")
    assert enc.ids == [0, 31414, 232, 328, 2]
    assert enc.tokens == ["<s>", "Hello", "Ġworld", "!", "</s>"]
    assert list(zip(enc.starts, enc.ends, strict=True)) == [
        (0, 0),
        (0, 5),
        (5, 11),
        (11, 12),
        (0, 0),
    ]
    assert enc.special == [True, False, False, False, True]

    # 'é' is two bytes, which make up one token of their own here.
    enc = tok.encode_with_offsets("héllo")
    assert enc.tokens[1:-1] == ["h", "Ã©", "llo"]
    assert list(zip(enc.starts, enc.ends, strict=True))[1:-1] == [(0, 1), (1, 2), (2, 5)]

    # The emoji's four bytes are split between ' ðŁĳ' (space + 3 bytes) and 'į': both tokens
    # get the emoji's span; the first also covers the space in front of it.
    enc = tok.encode_with_offsets("ok 👍")
    assert enc.tokens[1:-1] == ["ok", "ĠðŁĳ", "į"]
    assert list(zip(enc.starts, enc.ends, strict=True))[1:-1] == [(0, 2), (2, 4), (3, 4)]


def test_offsets_segments(tok: Tokenizer) -> None:
    a, b = "Hello world!", "this is another sentence"
    enc = tok.encode_with_offsets(a, b)
    assert enc.ids == tok.encode(a, b)
    assert enc.segments == [0] * 5 + [1] * 6
    assert enc.special == [True, False, False, False, True, True] + [False] * 4 + [True]
    _check_offsets(tok, [a, b], enc)
    assert (enc.starts[5], enc.ends[5]) == (0, 0)
    assert (enc.starts[6], enc.ends[6]) == (0, 4)  # 'this' in the second text

    enc = tok.encode_with_offsets(a, b, no_separator=True)
    assert enc.ids == tok.encode(a, b, no_separator=True)
    assert enc.segments == [0] * 5 + [1] * 5


# ---------------------------------------------------------------------------------- truncation


def _words(word: str, n: int) -> str:
    """n tokens: 'word word ... word' (no trailing space, which would be one more token)."""
    return " ".join([word] * n)


def _truncate_reference(lengths: list[int], max_text: int) -> list[int]:
    """The rule spelled out: drop one token at a time from the longest (later on ties)."""
    lengths = list(lengths)
    while sum(lengths) > max_text:
        top = max(lengths)
        last = max(i for i, n in enumerate(lengths) if n == top)
        lengths[last] -= 1
    return lengths


def test_too_long_raises(tok: Tokenizer) -> None:
    text = _words("word", 548)
    assert len(tok.encode(text)) == 550  # no check without max_positions
    with pytest.raises(SequenceTooLongError, match=r"^tokens exceeds maximum length: 550 > 512$"):
        tok.encode(text, max_positions=512)
    with pytest.raises(ValueError):
        tok.encode_with_offsets(text, max_positions=512)
    with pytest.raises(SequenceTooLongError, match="552 > 512"):
        tok.encode(text, "", max_positions=512)
    assert len(tok.encode(text, max_positions=550)) == 550


def test_truncate_single(tok: Tokenizer) -> None:
    text = _words("word", 548)
    full = tok.encode(text)
    ids = tok.encode(text, truncate=True, max_positions=512)
    assert len(ids) == 512 and ids[0] == 0 and ids[-1] == 2
    assert ids[:-1] == full[:511]
    enc = tok.encode_with_offsets(text, truncate=True, max_positions=512)
    assert enc.ids == ids and enc.truncated
    assert enc.ends[-2] == len(text) - 38 * 5  # 548 - 510 words cut from the end
    assert not tok.encode_with_offsets("short", truncate=True, max_positions=512).truncated
    assert tok.encode("short", truncate=True, max_positions=512) == tok.encode("short")
    assert tok.encode(text, truncate=True) == full  # nothing to fit without max_positions


def test_truncate_longest_first(tok: Tokenizer) -> None:
    a, b = _words("alpha", 300), _words("beta", 100)
    ia, ib = tok.encode(a)[1:-1], tok.encode(b)[1:-1]
    assert (len(ia), len(ib)) == (300, 100)
    # 252 text tokens fit: the longer text alone is cut, to 152.
    ids = tok.encode(a, b, truncate=True, max_positions=256)
    assert ids == [0, *ia[:152], 2, 2, *ib, 2]
    # 102 fit: 51 each; 103 fit: the tie at 52/52 is broken by cutting the later text.
    assert tok.encode(a, b, truncate=True, max_positions=106) == [0, *ia[:51], 2, 2, *ib[:51], 2]
    assert tok.encode(a, b, truncate=True, max_positions=107) == [0, *ia[:52], 2, 2, *ib[:51], 2]
    enc = tok.encode_with_offsets(a, b, truncate=True, max_positions=107)
    assert enc.ids == tok.encode(a, b, truncate=True, max_positions=107) and enc.truncated
    assert enc.segments.count(0) == 52 + 2 and enc.segments.count(1) == 51 + 2


@pytest.mark.parametrize("no_separator", [False, True])
def test_truncate_matches_one_at_a_time(tok: Tokenizer, no_separator: bool) -> None:
    rng = random.Random(3)
    for _ in range(60):
        counts = [rng.randint(0, 40) for _ in range(rng.randint(1, 4))]
        texts = [_words("ab", n) for n in counts]
        n_special = 2 + (len(counts) - 1) * (1 if no_separator else 2)
        limit = rng.randint(n_special, n_special + sum(counts) + 3)
        kept = _truncate_reference(counts, limit - n_special)
        expected = [0]
        for i, n in enumerate(kept):
            if i and not no_separator:
                expected.append(2)
            expected += tok.encode(texts[i])[1:-1][:n] + [2]
        got = tok.encode(*texts, no_separator=no_separator, truncate=True, max_positions=limit)
        assert got == expected, (counts, limit)
        enc = tok.encode_with_offsets(
            *texts, no_separator=no_separator, truncate=True, max_positions=limit
        )
        assert enc.ids == expected
        assert enc.truncated == (kept != counts)
        assert tok.encode_with_truncation(
            *texts, no_separator=no_separator, truncate=True, max_positions=limit
        ) == (expected, kept != counts)


def test_truncate_cannot_fit_specials(tok: Tokenizer) -> None:
    with pytest.raises(SequenceTooLongError):
        tok.encode("a", "b", truncate=True, max_positions=3)
    assert tok.encode("a", "b", truncate=True, max_positions=4) == [0, 2, 2, 2]


# ---------------------------------------------------------------------------------- fill mask


def test_encode_masked(tok: Tokenizer) -> None:
    ids = tok.encode_masked("The first Star wars movie came out in <mask>")
    assert ids == [0, *tok.encode("The first Star wars movie came out in")[1:-1], 50264, 2]
    assert ids == [0, 133, 78, 2141, 9425, 1569, 376, 66, 11, 50264, 2]

    ids = tok.encode_masked("<mask> is the common currency of the European Union")
    assert ids[:2] == [0, 50264]
    assert tok.convert_ids_to_tokens(ids[2:3]) == ["Ġis"]
    assert ids == [0, 50264, *tok.encode(" is the common currency of the European Union")[1:-1], 2]

    ids = tok.encode_masked("My favorite type of cheese is <mask>!  ")
    assert ids == [0, *tok.encode("My favorite type of cheese is")[1:-1], 50264, 328, 2]


@pytest.mark.parametrize("text", ["no mask here", "<mask> and <mask>", "<MASK>", ""])
def test_encode_masked_needs_one_mask(tok: Tokenizer, text: str) -> None:
    with pytest.raises(ValueError):
        tok.encode_masked(text)


# ---------------------------------------------------------------------------------- vocab files


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_save_fairseq_round_trip(tok: Tokenizer, tmp_path: Path, lines: list[str]) -> None:
    tok.save_fairseq(tmp_path)
    assert _md5(tmp_path / "dict.txt") == _md5(DATA_DIR / "dict.txt")
    again = Tokenizer.from_fairseq(tmp_path / "dict.txt")
    assert again.vocab_size == tok.vocab_size and again.mask == tok.mask
    sample = lines[:1000] + EDGE_CASES
    assert [again.encode(t) for t in sample] == [tok.encode(t) for t in sample]


def test_save_hf_round_trip(tok: Tokenizer, hf_dir: Path, tmp_path: Path, lines) -> None:
    assert _md5(hf_dir / "merges.txt") == _md5(DATA_DIR / "vocab.bpe")
    hf = Tokenizer.from_hf(hf_dir / "vocab.json", hf_dir / "merges.txt")
    assert (hf.bos, hf.pad, hf.eos, hf.unk, hf.mask, hf.vocab_size) == (0, 1, 2, 3, 50264, 50265)
    sample = lines[:1000] + EDGE_CASES
    assert [hf.encode(t) for t in sample] == [tok.encode(t) for t in sample]
    every_id = list(range(tok.vocab_size))
    assert hf.convert_ids_to_tokens(every_id) == tok.convert_ids_to_tokens(every_id)
    decodable = [i for i in every_id if i not in (1, *range(50261, 50264))]
    assert [hf.token_text(i) for i in decodable] == [tok.token_text(i) for i in decodable]
    with pytest.raises(ValueError):
        hf.decode([0, 1, 2])
    # HF -> fairseq: same symbols (counts are not in HF files, so they are written as 0).
    hf.save_fairseq(tmp_path)
    written = (tmp_path / "dict.txt").read_text(encoding="utf-8").splitlines()
    original = (DATA_DIR / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert [w.split()[0] for w in written] == [o.split()[0] for o in original]
    back = Tokenizer.from_fairseq(tmp_path / "dict.txt")
    assert [back.encode(t) for t in sample[:200]] == [tok.encode(t) for t in sample[:200]]
    # And HF -> HF writes the same files.
    hf.save_hf(tmp_path / "again")
    assert _md5(tmp_path / "again" / "vocab.json") == _md5(hf_dir / "vocab.json")


def test_smaller_dictionary(tok: Tokenizer, tmp_path: Path, lines: list[str]) -> None:
    n = 1000
    head = (DATA_DIR / "dict.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    (tmp_path / "dict.txt").write_text("".join(head), encoding="utf-8")
    small = Tokenizer.from_fairseq(tmp_path / "dict.txt")
    assert small.vocab_size == n + 5 and small.mask == n + 4
    saw_unk = False
    for text in lines[:500]:
        expected = [i if i < n + 4 else 3 for i in tok.encode(text)]
        got = small.encode(text)
        assert got == expected
        saw_unk |= 3 in got
    assert saw_unk
    assert "<unk>" in small.decode(small.encode("Hello zyxwvut"))
    assert small.encode_masked("a <mask>") == [0, 102, n + 4, 2]
    with pytest.raises(ValueError):
        small.decode([0, n + 5, 2])


def test_bad_vocabulary_files(tmp_path: Path) -> None:
    (tmp_path / "dup.txt").write_text("13 5\n13 4\n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate"):
        Tokenizer.from_fairseq(tmp_path / "dup.txt")
    (tmp_path / "bad.txt").write_text("13\n", encoding="utf-8")
    with pytest.raises(ValueError, match="format"):
        Tokenizer.from_fairseq(tmp_path / "bad.txt")
    (tmp_path / "ok.txt").write_text("13 5\n13 4 #fairseq:overwrite\n", encoding="utf-8")
    over = Tokenizer.from_fairseq(tmp_path / "ok.txt")
    assert over.vocab_size == 7 and over.encode(".") == [0, 5, 2]
    over.save_fairseq(tmp_path / "out")
    assert (tmp_path / "out" / "dict.txt").read_bytes() == (tmp_path / "ok.txt").read_bytes()


# ---------------------------------------------------------------------------------- caching


def test_cache_bound_does_not_change_results(tok: Tokenizer, lines: list[str]) -> None:
    tiny = Tokenizer.from_fairseq(DATA_DIR / "dict.txt", cache_size=16)
    sample = lines[:500]
    assert [tiny.encode(t) for t in sample] == [tok.encode(t) for t in sample]
    info = tiny.cache_info()
    assert info.maxsize == 16 and info.currsize <= 16


def test_concurrent_encode(tok: Tokenizer, lines: list[str]) -> None:
    sample = lines[:2000]
    fresh = Tokenizer.from_fairseq(DATA_DIR / "dict.txt")
    expected = [tok.encode(t) for t in sample]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # force frequent thread switches inside encode
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(fresh.encode, sample * 2))
    finally:
        sys.setswitchinterval(interval)
    assert results == expected * 2
