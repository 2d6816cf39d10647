"""Malformed and hostile requests, sent with the raw generated stubs to one real server process.

Every malformed request must get a precise status (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION) whose message says what to change; never UNKNOWN or
INTERNAL, never a hang, never a dead server, and the scheduler's queue must drain afterwards.

The server runs `random:tiny` (2 layers, hidden 64, the real 50265-entry vocabulary) on the CPU
with small limits, so that over-limit requests and responses are cheap to produce:
8 items per request and a 256 KiB message limit.

Run with `pytest -q -rA tests/test_bad_input.py` to see the fuzz outcome counts.
"""

from __future__ import annotations

import collections
import json
import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from roberta_client._proto.roberta.v1 import roberta_pb2 as pb
from roberta_client._proto.roberta.v1 import roberta_pb2_grpc
from roberta_server.launcher import ServerProcess

MAX_ITEMS = 8
LIMIT = 256 * 1024  # --max-message-bytes
VOCAB = 50265
MAX_POS = 512
PAD, MASK = 1, 50264
CALL_TIMEOUT = 5.0  # seconds; a DEADLINE_EXCEEDED counts as a hang

IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
OK = grpc.StatusCode.OK
# What a malformed request may get; anything else (UNKNOWN, INTERNAL, DEADLINE_EXCEEDED, ...) fails.
ALLOWED = {OK, IA, NF, RE, grpc.StatusCode.FAILED_PRECONDITION}
# grpc core's own refusal of a response over the send limit: the server should have refused the
# request itself, with a message that says what to change (and without logging a traceback).
CORE_SEND_LIMIT = "Sent message larger than max"


@pytest.fixture(scope="module")
def server():
    args = ("--model", "random:tiny", "--device", "cpu")
    limits = ("--max-items-per-request", str(MAX_ITEMS), "--max-message-bytes", str(LIMIT))
    with ServerProcess(*args, *limits) as proc:
        proc.wait_ready()
        yield proc
        assert proc.terminate() == 0, proc.tail()


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield roberta_pb2_grpc.RobertaStub(channel)


def call(stub, rpc: str, request) -> tuple[grpc.StatusCode, str, object]:
    """(code, details, response or None) of one call."""
    try:
        return OK, "", getattr(stub, rpc)(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None


# ---------------------------------------------------------------------------- request builders


def text(t: str) -> pb.Input:
    return pb.Input(text=t)


def pair(a: str, b: str) -> pb.Input:
    return pb.Input(pair=pb.TextPair(text=a, text_pair=b))


def ids(*xs: int) -> pb.Input:
    return pb.Input(ids=pb.TokenIds(ids=list(xs)))


def tok(*inputs: pb.Input, truncate: bool = False, no_separator: bool = False):
    opts = pb.EncodeOptions(truncate=truncate, no_separator=no_separator)
    return pb.TokenizeRequest(inputs=list(inputs), options=opts)


def feats(*inputs: pb.Input, truncate: bool = False, **opts) -> pb.ExtractFeaturesRequest:
    enc = pb.EncodeOptions(truncate=truncate)
    return pb.ExtractFeaturesRequest(
        inputs=list(inputs), options=pb.FeatureOptions(encode=enc, **opts)
    )


def cls(head: str, *inputs: pb.Input, truncate: bool = False) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        head=head, inputs=list(inputs), options=pb.EncodeOptions(truncate=truncate)
    )


def fill(*texts: str, topk: int = 0) -> pb.FillMaskRequest:
    return pb.FillMaskRequest(texts=list(texts), topk=topk)


def dec(*seqs: list[int]) -> pb.DecodeRequest:
    return pb.DecodeRequest(sequences=[pb.TokenIds(ids=s) for s in seqs])


def reg(name: str, num_classes: int, labels=()) -> pb.RegisterClassificationHeadRequest:
    return pb.RegisterClassificationHeadRequest(
        name=name, num_classes=num_classes, labels=list(labels)
    )


# ---------------------------------------------------------------------------- response checks


def input_texts(inp: pb.Input) -> list[str]:
    if inp.WhichOneof("kind") == "pair":
        return [inp.pair.text, inp.pair.text_pair]
    return [inp.text]


def check_tokenization(inp: pb.Input, res: pb.Tokenization) -> None:
    """Parallel fields, at most MAX_POS tokens, and code-point spans that tile each segment's text
    (a token holding part of a character spans that whole character, so neighbours may share
    one); with truncation, a prefix of it."""
    n = len(res.ids)
    assert n == len(res.tokens) == len(res.segments) == len(res.starts) == len(res.ends)
    assert n == len(res.special) and 2 <= n  # Tokenize returns over-long texts whole
    assert res.special[0] and res.special[-1] and res.ids[0] == 0 and res.ids[-1] == 2
    for seg, t in enumerate(input_texts(inp)):
        idx = [i for i in range(n) if res.segments[i] == seg and not res.special[i]]
        spans = [(res.starts[i], res.ends[i]) for i in idx]
        for s, e in spans:
            assert 0 <= s < e <= len(t), (seg, s, e, len(t))
        for (s0, e0), (s1, e1) in zip(spans, spans[1:], strict=False):
            assert e0 - 1 <= s1 <= e0 and e0 <= e1, (s0, e0, s1, e1)
        if spans:
            assert spans[0][0] == 0
        if not res.truncated:
            assert (spans[-1][1] if spans else 0) == len(t), "spans do not cover the text"
    for i in range(n):
        if res.special[i]:
            assert res.starts[i] == res.ends[i] == 0 and res.ids[i] in (0, 2)
        else:
            assert res.ids[i] not in (0, 1, 2, MASK)


def tok_ids(*want_per_result: list[int]) -> Callable:
    def check(req, resp) -> None:
        got = [list(r.ids) for r in resp.results]
        assert got == list(want_per_result)

    return check


def tok_len(n: int) -> Callable:
    def check(req, resp) -> None:
        assert len(resp.results[0].ids) == n and not resp.results[0].truncated

    return check


def tok_ok(truncated: bool = False) -> Callable:
    def check(req, resp) -> None:
        assert len(resp.results) == len(req.inputs)
        for inp, res in zip(req.inputs, resp.results, strict=True):
            check_tokenization(inp, res)
            assert res.truncated == truncated
            if truncated:
                assert len(res.ids) == MAX_POS
        assert resp.usage.truncated_items == (len(req.inputs) if truncated else 0)

    return check


def features(truncated: list[bool], num_tokens: list[int], layers: list[int] | None = None):
    def check(req, resp) -> None:
        assert [r.truncated for r in resp.results] == truncated, "per-item truncated flags"
        assert [r.num_tokens for r in resp.results] == num_tokens, "per-item num_tokens"
        if layers is not None:
            assert [list(r.layers) for r in resp.results] == [layers] * len(resp.results)
        assert resp.usage.truncated_items == sum(truncated)

    return check


def classified(truncated: list[bool]) -> Callable:
    def check(req, resp) -> None:
        assert [r.truncated for r in resp.results] == truncated, "per-item truncated flags"
        assert resp.usage.truncated_items == sum(truncated)
        assert all(len(r.logits) == 3 and r.label for r in resp.results)

    return check


def candidates(n: int) -> Callable:
    def check(req, resp) -> None:
        assert [len(r.candidates) for r in resp.results] == [n] * len(req.texts)

    return check


def decoded(*segments: list[str]) -> Callable:
    def check(req, resp) -> None:
        assert [list(r.segments) for r in resp.results] == list(segments)

    return check


def head_is(name: str, num_classes: int) -> Callable:
    def check(req, resp) -> None:
        assert (resp.head.name, resp.head.num_classes) == (name, num_classes)
        assert len(resp.head.labels) == num_classes

    return check


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    id: str
    rpc: str
    request: object
    code: grpc.StatusCode
    pattern: str = ""  # re.search()ed in the details; for OK rows, unused
    check: Callable | None = None  # (request, response) -> None, for OK rows


LONG = "x " * 600  # 600 tokens
LONG_IDS = [0, *[5] * 511, 2]  # 513 ids
BIG = "a" * (LIMIT + 1000)  # a request over the receive limit
UNICODE = {
    "nul": "a\x00b\x00",
    "combining": "e\u0301\u0301\u0301 a\u0308\u0304 Z\u0351\u0360\u036b",
    "rtl": "שלום עולם — مرحبا بالعالم",
    "rtl-override": "\u202eabc\u202c def \u200f",
    "zwj-family": "👨\u200d👩\u200d👧\u200d👦 and 👩🏽\u200d💻",
    "flags": "🇺🇸🇯🇵🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "noncharacters": "\uffff\ufffe \U0010ffff \ufdd0",
    "bom-and-private-use": "\ufeffhello \ue000\U000f0000",
    "whitespace-zoo": "\t\r\n\u3000\u00a0\u2028\u2029\u200b  end  ",
    "only-whitespace": "   ",
    "cjk-hangul": "漢字かなカナ 한국어 \u1100\u1161",
    "literal-specials": "<s> </s> <pad> <unk> <mask>",
    "replacement-char": "\ufffd\ufffd",
}

ROWS: list[Row] = [
    # ---- Tokenize
    Row("tok/empty-list", "Tokenize", tok(), IA, r"^inputs is empty: send at least one item$"),
    Row("tok/no-kind", "Tokenize", tok(pb.Input()), IA, r"^inputs\[0\] is empty: set one of text, pair or ids$"),
    Row("tok/no-kind-second", "Tokenize", tok(text("a"), pb.Input()), IA, r"^inputs\[1\] is empty: set one of"),
    Row("tok/ids", "Tokenize", tok(ids(0, 2)), IA, r"^inputs\[0\]: token ids cannot be tokenized; send text$"),
    Row("tok/empty-text", "Tokenize", tok(text("")), OK, check=tok_ids([0, 2])),
    Row("tok/pair-empty-second", "Tokenize", tok(pair("a", "")), OK, check=tok_ids([0, 102, 2, 2, 2])),
    Row("tok/pair-empty-first", "Tokenize", tok(pair("", "a")), OK, check=tok_ids([0, 2, 2, 102, 2])),
    Row("tok/pair-both-empty", "Tokenize", tok(pair("", "")), OK, check=tok_ids([0, 2, 2, 2])),
    Row("tok/pair-empty-no-separator", "Tokenize", tok(pair("", ""), no_separator=True), OK, check=tok_ids([0, 2, 2])),
    Row("tok/empty-pair-message", "Tokenize", tok(pb.Input(pair=pb.TextPair())), OK, check=tok_ids([0, 2, 2, 2])),
    # Tokenize returns an over-long text whole, as fairseq's encode does; using it is the error.
    Row("tok/too-long-whole", "Tokenize", tok(text(LONG)), OK, check=tok_len(603)),
    Row("tok/too-long-truncate", "Tokenize", tok(text(LONG), truncate=True), OK, check=tok_ok(True)),
    Row("tok/pair-too-long-whole", "Tokenize", tok(pair(LONG, "b")), OK, check=tok_len(606)),
    Row("tok/pair-too-long-truncate", "Tokenize", tok(pair(LONG, LONG), truncate=True), OK, check=tok_ok(True)),
    Row("tok/max-items", "Tokenize", tok(*[text("a")] * MAX_ITEMS), OK, check=tok_ok()),
    Row("tok/too-many-items", "Tokenize", tok(*[text("a")] * (MAX_ITEMS + 1)), RE, r"^9 inputs in one request; the limit is 8: split the request$"),
    Row("tok/over-receive-limit", "Tokenize", tok(text(BIG)), RE, rf"Received message larger than max \(\d+ vs\. {LIMIT}\)"),
    *[Row(f"tok/unicode-{k}", "Tokenize", tok(text(v), pair(v, v[::-1])), OK, check=tok_ok()) for k, v in UNICODE.items()],
    *[
        Row(f"tok/100k-{name}-truncate", "Tokenize", tok(text(ch * n), truncate=True), OK, check=tok_ok(True))
        for name, ch, n in [("a", "a", 100_000), ("e-acute", "é", 100_000), ("combining", "\u0301", 60_000),
                            ("nul", "\x00", 100_000), ("space", " ", 100_000), ("emoji", "😀", 50_000),
                            ("zwj-seq", "👩\u200d💻", 20_000), ("uffff", "\uffff", 60_000)]
    ],
    # ---- Decode
    Row("dec/empty-list", "Decode", dec(), IA, r"^sequences is empty: send at least one item$"),
    Row("dec/empty-sequence", "Decode", dec([]), OK, check=decoded([""])),
    Row("dec/out-of-vocab", "Decode", dec([0, VOCAB, 2]), IA, rf"^sequences\[0\]: token id {VOCAB} is out of range for a vocabulary of {VOCAB}$"),
    Row("dec/negative", "Decode", dec([0, -1, 2]), IA, r"^sequences\[0\]: token id -1 is out of range"),
    Row("dec/int64-max", "Decode", dec([2**63 - 1]), IA, rf"^sequences\[0\]: token id {2**63 - 1} is out of range"),
    Row("dec/int64-min", "Decode", dec([-(2**63)]), IA, rf"^sequences\[0\]: token id {-(2**63)} is out of range"),
    Row("dec/pad", "Decode", dec([0, 1, 2]), IA, r"^sequences\[0\]: cannot decode token id 1 \('<pad>'\).*strip padding"),
    Row("dec/madeupword", "Decode", dec([50261]), IA, r"^sequences\[0\]: cannot decode token id 50261 \('madeupword0000'\)"),
    Row("dec/second-bad", "Decode", dec([0, 2], [0, VOCAB + 7, 2]), IA, r"^sequences\[1\]: token id 50272 is out of range"),
    Row("dec/mask", "Decode", dec([0, MASK, 2]), OK, check=decoded(["<mask>"])),
    Row("dec/too-many", "Decode", dec(*[[0, 2]] * (MAX_ITEMS + 1)), RE, r"^9 sequences in one request; the limit is 8: split the request$"),
    # 200k one-byte varints decode to " the" x 200k: an 800 kB response from a 200 kB request.
    Row("dec/response-over-limit", "Decode", dec([5] * 200_000), RE, rf"over the {LIMIT}-byte message limit: .*(fewer|shorter)"),
    # ---- ExtractFeatures
    Row("ef/empty-list", "ExtractFeatures", feats(), IA, r"^inputs is empty: send at least one item$"),
    Row("ef/no-kind", "ExtractFeatures", feats(text("a"), pb.Input()), IA, r"^inputs\[1\] is empty: set one of text, pair or ids$"),
    Row("ef/empty-text", "ExtractFeatures", feats(text("")), OK, check=features([False], [2])),
    Row("ef/pair-empty-part", "ExtractFeatures", feats(pair("a", "")), OK, check=features([False], [5])),
    Row("ef/ids-empty", "ExtractFeatures", feats(ids()), IA, r"^inputs\[0\]: ids is empty$"),
    Row("ef/ids-out-of-vocab", "ExtractFeatures", feats(ids(0, VOCAB, 2)), IA, rf"^inputs\[0\]: token id {VOCAB} is out of range \[0, {VOCAB}\)$"),
    Row("ef/ids-negative", "ExtractFeatures", feats(ids(0, -1, 2)), IA, r"^inputs\[0\]: token id -1 is out of range \[0, 50265\)$"),
    Row("ef/ids-int64-min", "ExtractFeatures", feats(ids(0, -(2**63), 2)), IA, r"token id -9223372036854775808 is out of range"),
    Row("ef/ids-int64-max", "ExtractFeatures", feats(ids(0, 2**63 - 1, 2)), IA, r"token id 9223372036854775807 is out of range"),
    Row("ef/ids-pad", "ExtractFeatures", feats(ids(0, 5, PAD, 2)), IA, r"^inputs\[0\]: id 1 \(<pad>\) may not appear inside a sequence$"),
    Row("ef/ids-pad-second-item", "ExtractFeatures", feats(ids(0, 2), ids(PAD)), IA, r"^inputs\[1\]: id 1 \(<pad>\)"),
    Row("ef/ids-bos-only", "ExtractFeatures", feats(ids(0), pooling=pb.POOLING_MEAN), OK, check=features([False], [1])),
    Row("ef/ids-no-specials", "ExtractFeatures", feats(ids(5, 6, 7)), OK, check=features([False], [3])),
    Row("ef/ids-mask-inside", "ExtractFeatures", feats(ids(0, MASK, 2)), OK, check=features([False], [3])),
    Row("ef/ids-too-long", "ExtractFeatures", feats(ids(*LONG_IDS)), IA, r"^inputs\[0\]: tokens exceeds maximum length: 513 > 512; set truncate to cut it$"),
    Row("ef/ids-too-long-truncate", "ExtractFeatures", feats(ids(*LONG_IDS), truncate=True), OK, check=features([True], [512])),
    Row("ef/text-too-long", "ExtractFeatures", feats(text(LONG)), IA, r"^inputs\[0\]: tokens exceeds maximum length: 603 > 512; set truncate"),
    Row("ef/text-too-long-truncate", "ExtractFeatures", feats(text(LONG), truncate=True), OK, check=features([True], [512])),
    # Pooled outputs still report each sequence's real token count.
    Row("ef/truncate-pooled", "ExtractFeatures", feats(text(LONG), truncate=True, pooling=pb.POOLING_CLS), OK, check=features([True], [512])),
    # The truncated flag is per item: the short input was not cut.
    Row("ef/truncate-mixed-items", "ExtractFeatures", feats(text(LONG), text("b"), truncate=True), OK, check=features([True, False], [512, 3])),
    Row("ef/layer-too-high", "ExtractFeatures", feats(text("a"), layers=[3]), IA, r"^layer 3 does not exist: the model has layers 0\.\.2 \(0 = embeddings; negative counts from the end\)$"),
    Row("ef/layer-too-low", "ExtractFeatures", feats(text("a"), layers=[0, -4]), IA, r"^layer -4 does not exist: the model has layers 0\.\.2"),
    Row("ef/layer-int32-max", "ExtractFeatures", feats(text("a"), layers=[2**31 - 1]), IA, r"^layer 2147483647 does not exist"),
    Row("ef/layer-int32-min", "ExtractFeatures", feats(text("a"), layers=[-(2**31)]), IA, r"^layer -2147483648 does not exist"),
    Row("ef/layer-negative-first", "ExtractFeatures", feats(text("a"), layers=[-3, -1]), OK, check=features([False], [3], [0, 2])),
    Row("ef/layer-repeated", "ExtractFeatures", feats(text("a"), layers=[1, 1, 1]), OK, check=features([False], [3], [1, 1, 1])),
    Row("ef/all-layers-overrides-bad-layer", "ExtractFeatures", feats(text("a"), all_layers=True, layers=[99]), OK, check=features([False], [3], [0, 1, 2])),
    Row("ef/pooling-99", "ExtractFeatures", feats(text("a"), pooling=99), IA, r"pooling.*99.*(POOLING_NONE|none).*(POOLING_CLS|cls).*(POOLING_MEAN|mean)"),
    Row("ef/pooling-negative", "ExtractFeatures", feats(text("a"), pooling=-1), IA, r"pooling.*-1.*(POOLING_NONE|none)"),
    Row("ef/dtype-99", "ExtractFeatures", feats(text("a"), dtype=99), IA, r"dtype.*99.*(FLOAT32|float32).*(FLOAT16|float16).*(BFLOAT16|bfloat16)"),
    Row("ef/dtype-negative", "ExtractFeatures", feats(text("a"), dtype=-7), IA, r"dtype.*-7.*(FLOAT32|float32)"),
    Row("ef/too-many-items", "ExtractFeatures", feats(*[text("a")] * (MAX_ITEMS + 1)), RE, r"^9 inputs in one request; the limit is 8: split the request$"),
    Row("ef/over-receive-limit", "ExtractFeatures", feats(text(BIG), truncate=True), RE, rf"Received message larger than max \(\d+ vs\. {LIMIT}\)"),
    Row("ef/response-over-limit", "ExtractFeatures", feats(ids(*LONG_IDS[:512]), ids(*LONG_IDS[:512]), all_layers=True), RE,
        rf"^the response would be 786432 bytes, over the {LIMIT}-byte message limit: send fewer items, fewer layers, pool, or ask for float16$"),
    # The tensors alone are exactly the limit; the rest of the message puts it over.
    Row("ef/response-at-limit-plus-framing", "ExtractFeatures", feats(ids(*LONG_IDS[:512]), ids(*LONG_IDS[:512])), RE,
        rf"over the {LIMIT}-byte message limit: .*fewer items"),
    # ---- Classify
    Row("cls/unknown-head", "Classify", cls("nope", text("a")), NF, r"^unknown classification head 'nope' \(registered: .*mnli.*\)$"),
    Row("cls/empty-head", "Classify", cls("", text("a")), NF, r"^unknown classification head '' \(registered: .*mnli"),
    Row("cls/head-wrong-case", "Classify", cls("MNLI", text("a")), NF, r"'MNLI'"),
    Row("cls/empty-list", "Classify", cls("mnli"), IA, r"^inputs is empty: send at least one item$"),
    Row("cls/no-kind", "Classify", cls("mnli", pb.Input()), IA, r"^inputs\[0\] is empty: set one of"),
    Row("cls/ids-empty", "Classify", cls("mnli", ids()), IA, r"^inputs\[0\]: ids is empty$"),
    Row("cls/ids-pad", "Classify", cls("mnli", ids(0, PAD, 2)), IA, r"<pad>"),
    Row("cls/ids-out-of-vocab", "Classify", cls("mnli", ids(0, 99999, 2)), IA, r"token id 99999 is out of range \[0, 50265\)"),
    Row("cls/too-long", "Classify", cls("mnli", pair(LONG, "b")), IA, r"^inputs\[0\]: tokens exceeds maximum length: 606 > 512; set truncate"),
    Row("cls/pair-empty-part", "Classify", cls("mnli", pair("a", ""), pair("", "")), OK, check=classified([False, False])),
    Row("cls/truncate", "Classify", cls("mnli", pair(LONG, "b"), text("c"), truncate=True), OK, check=classified([True, False])),
    Row("cls/too-many-items", "Classify", cls("mnli", *[text("a")] * (MAX_ITEMS + 1)), RE, r"^9 inputs in one request; the limit is 8"),
    # ---- FillMask
    Row("fm/empty-list", "FillMask", fill(), IA, r"^texts is empty: send at least one item$"),
    Row("fm/empty-text", "FillMask", fill(""), IA, r"^texts\[0\]: masked input must contain '<mask>' exactly once, found 0$"),
    Row("fm/no-mask", "FillMask", fill("no mask here"), IA, r"^texts\[0\]: masked input must contain '<mask>' exactly once, found 0$"),
    Row("fm/two-masks", "FillMask", fill("<mask> and <mask>"), IA, r"found 2$"),
    Row("fm/adjacent-masks", "FillMask", fill("<mask><mask>"), IA, r"found 2$"),
    Row("fm/mask-wrong-case", "FillMask", fill("<MASK>"), IA, r"found 0$"),
    Row("fm/second-text-bad", "FillMask", fill("a <mask>", "b"), IA, r"^texts\[1\]: masked input must contain"),
    Row("fm/only-mask", "FillMask", fill("<mask>", topk=3), OK, check=candidates(3)),
    Row("fm/nested-brackets", "FillMask", fill("<<mask>>", topk=1), OK, check=candidates(1)),
    Row("fm/topk-0-means-5", "FillMask", fill("a <mask>"), OK, check=candidates(5)),
    Row("fm/topk-negative", "FillMask", fill("a <mask>", topk=-1), IA, r"^topk must be in \[1, 50265\], got -1$"),
    Row("fm/topk-vocab-plus-1", "FillMask", fill("a <mask>", topk=VOCAB + 1), IA, r"^topk must be in \[1, 50265\], got 50266$"),
    Row("fm/topk-int32-max", "FillMask", fill("a <mask>", topk=2**31 - 1), IA, r"got 2147483647$"),
    Row("fm/topk-int32-min", "FillMask", fill("a <mask>", topk=-(2**31)), IA, r"got -2147483648$"),
    Row("fm/topk-response-over-limit", "FillMask", fill("hello <mask> world", topk=VOCAB), RE, rf"over the {LIMIT}-byte message limit: .*(fewer|smaller).*topk"),
    Row("fm/too-long", "FillMask", fill(LONG + "<mask>"), IA, r"^texts\[0\]: tokens exceeds maximum length: 603 > 512"),
    Row("fm/too-many-items", "FillMask", fill(*["<mask>"] * (MAX_ITEMS + 1)), RE, r"^9 texts in one request; the limit is 8: split the request$"),
    Row("fm/unicode-around-mask", "FillMask", fill("👩\u200d💻<mask>\u0301\x00", "\uffff <mask> שלום", topk=2), OK, check=candidates(2)),
    # ---- RegisterClassificationHead
    Row("reg/empty-name", "RegisterClassificationHead", reg("", 2), IA, r"^head name must be 1-128 printable characters$"),
    Row("reg/newline-name", "RegisterClassificationHead", reg("bad\nname", 2), IA, r"^head name must be 1-128 printable"),
    Row("reg/nul-name", "RegisterClassificationHead", reg("bad\x00", 2), IA, r"^head name must be 1-128 printable"),
    Row("reg/129-char-name", "RegisterClassificationHead", reg("h" * 129, 2), IA, r"^head name must be 1-128 printable"),
    Row("reg/128-char-name", "RegisterClassificationHead", reg("h" * 128, 2), OK, check=head_is("h" * 128, 2)),
    Row("reg/num-classes-0", "RegisterClassificationHead", reg("h", 0), IA, r"^num_classes must be in \[1, 65536\], got 0$"),
    Row("reg/num-classes-negative", "RegisterClassificationHead", reg("h", -3), IA, r"^num_classes must be in \[1, 65536\], got -3$"),
    Row("reg/num-classes-65537", "RegisterClassificationHead", reg("h", 65537), IA, r"got 65537$"),
    Row("reg/too-few-labels", "RegisterClassificationHead", reg("h", 2, ["a"]), IA, r"^1 labels given for 2 classes$"),
    Row("reg/too-many-labels", "RegisterClassificationHead", reg("h", 1, ["a", "b"]), IA, r"^2 labels given for 1 classes$"),
    Row("reg/ok-with-labels", "RegisterClassificationHead", reg("bi-ok", 2, ["neg", "pos"]), OK, check=head_is("bi-ok", 2)),
    Row("info/ok", "GetModelInfo", pb.GetModelInfoRequest(), OK),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_table(stub, server, row: Row):
    rpc, want, pattern, check = row.rpc, row.code, row.pattern, row.check
    code, details, resp = call(stub, rpc, row.request)
    assert server.proc.poll() is None, f"server died:\n{server.tail()}"
    assert code == want, f"{rpc}: want {want.name}, got {code.name}: {details!r}"
    if code == OK:
        if check is not None:
            check(row.request, resp)
        return
    matched = bool(details) and re.search(pattern, details) is not None
    assert matched, f"{rpc} {code.name} details {details!r} do not match {pattern!r}"


def test_too_wide_head_is_refused_and_model_info_keeps_working(stub):
    """65536 classes is within [1, 65536], but the head's 65536 default labels do not fit in a
    256 KiB ModelInfo, nor do one item's logits in a ClassifyResponse: registering it must be
    refused up front, not half-done with every later GetModelInfo failing."""
    try:
        code, details, _ = call(stub, "RegisterClassificationHead", reg("bi-wide", 65536))
        assert code == RE, f"{code.name}: {details!r}"
        assert re.search(rf"{LIMIT}-byte message limit", details), details
        code, details, info = call(stub, "GetModelInfo", pb.GetModelInfoRequest())
        assert code == OK, f"GetModelInfo broken after the refused head: {code.name} {details!r}"
        assert "bi-wide" not in {h.name for h in info.heads}
    finally:  # undo a half-registered head so that the bug does not cascade into later tests
        stub.RegisterClassificationHead(reg("bi-wide", 2), timeout=CALL_TIMEOUT)


# ---------------------------------------------------------------------------- health


def scrape(server) -> dict[tuple, float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


GAUGES = ("roberta_queue_items", "roberta_queue_tokens", "roberta_requests_in_flight")


def assert_healthy(server, stub) -> dict[tuple, float]:
    assert server.proc.poll() is None, f"server died:\n{server.tail()}"
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="roberta.v1.Roberta"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    resp = stub.ExtractFeatures(feats(text("still alive")), timeout=CALL_TIMEOUT)
    assert len(resp.results) == 1
    deadline = time.monotonic() + 5  # a handler whose caller timed out may still be finishing
    while True:
        metrics = scrape(server)
        gauges = {g: metrics[(g, ())] for g in GAUGES}
        if not any(gauges.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert gauges == dict.fromkeys(GAUGES, 0.0)
    bad = {k: v for k, v in metrics.items() if k[0] == "roberta_requests_total" and v and
           dict(k[1])["code"] in ("UNKNOWN", "INTERNAL")}  # fmt: skip
    assert not bad, bad
    return metrics


def test_server_healthy_after_the_table(server, stub):
    assert_healthy(server, stub)


# ---------------------------------------------------------------------------- fuzz

# Outcomes by RPC and status code, filled by the fuzz tests and reported by the last test.
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
CORE_SEND_FAILURES: list[str] = []

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Protobuf strings cannot hold lone surrogates; everything else is fair game.
chars = st.characters(exclude_categories=("Cs",))
pieces = st.sampled_from(
    ["<mask>", "<s>", "</s>", "<pad>", "<unk>", " ", "  ", "\n", "\x00", "\u200d", "\u0301",
     "👩\u200d💻", "\uffff", "é", "a", "'s", "1234"]
)  # fmt: skip
short_text = st.text(chars, max_size=30)
texts = st.one_of(
    short_text,
    st.lists(st.one_of(short_text, pieces), max_size=8).map("".join),
    st.tuples(st.one_of(short_text, pieces), st.integers(1, 400)).map(lambda t: t[0] * t[1]),
)
token_ids = st.one_of(
    st.integers(3, VOCAB - 1),
    st.sampled_from([0, 1, 2, 3, MASK, 50261, VOCAB, -1]),
    st.integers(-(2**63), 2**63 - 1),
)
id_lists = st.one_of(
    st.lists(token_ids, max_size=20),
    st.lists(st.integers(3, 50260), min_size=500, max_size=520),
)
inputs = st.one_of(
    texts.map(text),
    st.tuples(texts, texts).map(lambda t: pair(*t)),
    id_lists.map(lambda xs: ids(*xs)),
    st.just(pb.Input()),
)
# Mostly well-formed items, so that requests also succeed and reach the model.
valid_inputs = st.one_of(
    short_text.map(text),
    st.tuples(short_text, short_text).map(lambda t: pair(*t)),
    st.lists(st.integers(3, 50260), max_size=40).map(lambda xs: ids(0, *xs, 2)),
)
input_lists = st.one_of(
    st.lists(inputs, max_size=MAX_ITEMS + 2),
    st.lists(valid_inputs, min_size=1, max_size=MAX_ITEMS),
)
int32 = st.integers(-(2**31), 2**31 - 1)
enum_values = st.one_of(st.sampled_from([0, 1, 2, 3, -1, 4, 99]), int32)
# Mostly the real head (a drawn index, so that hypothesis does not run out of distinct choices).
HEAD_NAMES = ["mnli"] * 6 + ["", "nope", "MNLI", "bi-ok"]
heads = st.tuples(st.integers(0, len(HEAD_NAMES)), st.text(chars, max_size=8)).map(
    lambda t: HEAD_NAMES[t[0]] if t[0] < len(HEAD_NAMES) else t[1]
)


def fuzz_call(server, stub, rpc: str, request):
    code, details, resp = call(stub, rpc, request)
    key = code.name
    if CORE_SEND_LIMIT in details:
        key += " (grpc send limit)"
        CORE_SEND_FAILURES.append(f"{rpc}: {details} <- {str(request)[:300]!r}")
    COUNTS[rpc][key] += 1
    assert server.proc.poll() is None, f"server died:\n{server.tail()}"
    assert code in ALLOWED, f"{rpc} -> {code.name}: {details!r}"
    assert code == OK or details.strip(), f"{rpc} -> {code.name} with an empty message"
    return code, resp


@FUZZ
@given(
    inputs=input_lists,
    layers=st.one_of(st.lists(st.integers(-3, 2), max_size=4), st.lists(int32, max_size=3)),
    all_layers=st.booleans(),
    pooling=enum_values,
    dtype=enum_values,
    truncate=st.booleans(),
    no_separator=st.booleans(),
)
def test_fuzz_extract_features(server, stub, inputs, layers, all_layers, pooling, dtype,
                               truncate, no_separator):  # fmt: skip
    opts = pb.FeatureOptions(
        layers=layers, all_layers=all_layers, pooling=pooling, dtype=dtype,
        encode=pb.EncodeOptions(truncate=truncate, no_separator=no_separator),
    )  # fmt: skip
    req = pb.ExtractFeaturesRequest(inputs=inputs, options=opts)
    code, resp = fuzz_call(server, stub, "ExtractFeatures", req)
    if code == OK:
        assert len(resp.results) == len(inputs)
        for res in resp.results:
            n_layers = 3 if all_layers else max(len(layers), 1)
            assert len(res.layers) == res.tensor.shape[0] == n_layers
            assert all(0 <= x <= 2 for x in res.layers)


@FUZZ
@given(head=heads, inputs=input_lists, truncate=st.booleans(), no_separator=st.booleans())
def test_fuzz_classify(server, stub, head, inputs, truncate, no_separator):
    opts = pb.EncodeOptions(truncate=truncate, no_separator=no_separator)
    req = pb.ClassifyRequest(head=head, inputs=inputs, options=opts)
    code, resp = fuzz_call(server, stub, "Classify", req)
    if code == OK:
        assert len(resp.results) == len(inputs)
        assert all(len(r.logits) == len(r.log_probs) > 0 for r in resp.results)


@FUZZ
@given(inputs=input_lists, truncate=st.booleans(), no_separator=st.booleans())
def test_fuzz_tokenize(server, stub, tokenizer, inputs, truncate, no_separator):
    req = tok(*inputs, truncate=truncate, no_separator=no_separator)
    code, resp = fuzz_call(server, stub, "Tokenize", req)
    if code == OK:
        assert len(resp.results) == len(inputs)
        for inp, res in zip(inputs, resp.results, strict=True):
            check_tokenization(inp, res)
            want = tokenizer.encode(
                *input_texts(inp), no_separator=no_separator, truncate=truncate,
                max_positions=MAX_POS if truncate else None,
            )  # fmt: skip
            assert list(res.ids) == want


masked_texts = st.one_of(
    texts,
    st.tuples(texts, texts).map(lambda t: f"{t[0]}<mask>{t[1]}"),
    st.tuples(short_text, short_text).map(lambda t: f"{t[0]}<mask>{t[1]}"),
)
masked_lists = st.one_of(
    st.lists(masked_texts, max_size=MAX_ITEMS + 2),
    st.lists(
        st.tuples(short_text, short_text).map(lambda t: f"{t[0]}<mask>{t[1]}"),
        min_size=1,
        max_size=MAX_ITEMS,
    ),
)


@FUZZ
@given(
    texts=masked_lists,
    topk=st.one_of(st.integers(-2, 12), st.integers(-2, VOCAB + 2), int32),
)
def test_fuzz_fill_mask(server, stub, texts, topk):
    code, resp = fuzz_call(server, stub, "FillMask", fill(*texts, topk=topk))
    if code == OK:
        assert [len(r.candidates) for r in resp.results] == [topk or 5] * len(texts)


@FUZZ
@given(sequences=st.lists(id_lists, max_size=MAX_ITEMS + 2))
def test_fuzz_decode(server, stub, tokenizer, sequences):
    code, resp = fuzz_call(server, stub, "Decode", dec(*sequences))
    if code == OK:
        for seq, res in zip(sequences, resp.results, strict=True):
            want = tokenizer.decode(seq)
            assert list(res.segments) == ([want] if isinstance(want, str) else want)


def test_fuzz_outcome_counts(server, stub, tmp_path_factory):
    """Report the fuzz outcomes by RPC and status code (shown by `pytest -rA`), and check the
    server is still healthy with an empty queue."""
    if not COUNTS:
        pytest.skip("no fuzz test ran in this session")
    report = {rpc: dict(sorted(c.items())) for rpc, c in sorted(COUNTS.items())}
    path = tmp_path_factory.getbasetemp() / "bad-input-fuzz-counts.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"fuzz outcomes by RPC and status code (also in {path}):")
    for rpc, counts in report.items():
        print(f"  {rpc:16} " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    assert_healthy(server, stub)
    assert all(c["OK"] > 0 for c in COUNTS.values()), "some RPC never succeeded: weak fuzzing"
    assert sum(c["INVALID_ARGUMENT"] for c in COUNTS.values()) > 0


def test_fuzz_never_hit_the_grpc_send_limit():
    """A response over the message limit must be refused by the server with a message that says
    what to change, not by grpc core ("Sent message larger than max", with a logged traceback)."""
    if not COUNTS:
        pytest.skip("no fuzz test ran in this session")
    assert not CORE_SEND_FAILURES, "\n".join(CORE_SEND_FAILURES[:5])


def test_server_logged_no_errors(server):
    errors = [r for r in server.logs if r.get("level") in ("ERROR", "CRITICAL")]
    assert not errors, "\n".join(json.dumps(r)[:400] for r in errors[:5])
