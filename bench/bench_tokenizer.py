"""Tokens per second of Tokenizer.encode on real English text, with a cold and a warm cache.

The text is the Python documentation shipped with the standard library (pydoc_data), so the
benchmark runs offline. Prints one JSON line; finishes in a few seconds.

    python bench/bench_tokenizer.py [--lines 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench_tokenizer")


def _import_tokenizer():
    try:
        from roberta_server.tokenizer import DATA_DIR, Tokenizer
    except ImportError:  # running from a source tree that was not installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
        from roberta_server.tokenizer import DATA_DIR, Tokenizer
    return DATA_DIR, Tokenizer


def real_text_lines(limit: int) -> list[str]:
    """Non-empty lines of the stdlib's documentation topics, topped up with stdlib sources."""
    lines: list[str] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        lines.extend(line for line in topics[key].splitlines() if line.strip())
    if len(lines) < limit:
        stdlib = Path(json.__file__).resolve().parents[1]
        for path in sorted(stdlib.glob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            lines.extend(line for line in text.splitlines() if line.strip())
            if len(lines) >= limit:
                break
    return lines[:limit]


def _timed(fn, texts: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    n_tokens = sum(len(fn(t)) for t in texts)
    return time.perf_counter() - started, n_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=5000, help="lines of text to encode")
    parser.add_argument("--repeat", type=int, default=3, help="warm passes (best one is kept)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    data_dir, tokenizer_cls = _import_tokenizer()

    texts = real_text_lines(args.lines)
    n_chars = sum(map(len, texts))
    logger.info("%d lines, %d characters", len(texts), n_chars)

    started = time.perf_counter()
    tok = tokenizer_cls.from_fairseq(data_dir / "dict.txt")
    load_s = time.perf_counter() - started

    # Cold: every word is a cache miss the first time it is seen (a fresh tokenizer).
    cold_s, n_tokens = _timed(tok.encode, texts)
    misses = tok.cache_info().misses
    warm_s = min(_timed(tok.encode, texts)[0] for _ in range(max(1, args.repeat)))
    offsets_s = min(_timed(lambda t: tok.encode_with_offsets(t).ids, texts)[0] for _ in range(2))
    # Text tokens only (without <s> and </s>) is what "tokens/s" usually means.
    text_tokens = n_tokens - 2 * len(texts)

    result = {
        "bench": "tokenizer",
        "python": platform.python_version(),
        "lines": len(texts),
        "chars": n_chars,
        "tokens": text_tokens,
        "distinct_words": misses,
        "load_s": round(load_s, 3),
        "cold_s": round(cold_s, 4),
        "warm_s": round(warm_s, 4),
        "cold_tokens_per_s": round(text_tokens / cold_s),
        "warm_tokens_per_s": round(text_tokens / warm_s),
        "warm_lines_per_s": round(len(texts) / warm_s),
        "warm_offsets_tokens_per_s": round(text_tokens / offsets_s),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
