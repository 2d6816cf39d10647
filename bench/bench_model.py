"""Model-only throughput on the standard mixed-length workload: what packing buys.

For each dtype, useful tokens per second (real tokens; padding never counts) of
  (a) ceiling: fixed-shape batches of 16 x 64 with no padding at all;
  (b) padded:  length-sorted batches of <= BUDGET tokens, every sequence padded to the longest
               of its batch (the padding is computed, not counted); with `--arrival N`,
               batches of N sequences in the order drawn, as N one-text clients give the
               server;
  (c) packed:  the same batches packed, run through `Roberta.forward` with cu_seqlens;
  (d) packed again: each packed batch a second time at once, so its row count has run before;
  (e) equal rows: each packed batch's rows, in sequences of the ceiling's length (and one
      shorter sequence for the rest).
(c) to (e) tell where a packed batch loses against the ceiling: in its row count's first run
(c against d), in its mixed lengths (d against e), or in having fewer rows (e against a). On
the CPU in half precision, packed batches are rounded up to the server's row-count buckets
(`executor.shape_bucket`), as the server does.
All run interleaved, batch by batch, so that a noisy machine slows them alike; compare the
ratios inside one run, not absolute figures across runs. Random weights (`random:SIZE` shapes):
compute does not depend on the values.

On CUDA in half precision it also times one 32-token sequence, host to host, run eagerly and as
a replayed CUDA graph (`roberta_server.cuda_graphs`).

    python bench/bench_model.py [--quick] [--size base|tiny|large] [--dtypes float32,bfloat16]
    python bench/bench_model.py --device cuda --size large --dtypes bfloat16 --budget 16384 \
        --ceiling 128x128
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import roberta_server  # noqa: F401
except ImportError:  # a source tree that was not pip-installed
    sys.path.insert(0, str(HERE.parent / "server"))

from roberta_server.cpu_memory import retain_freed_memory  # noqa: E402
from roberta_server.cpu_prepack import prepack_linears  # noqa: E402
from roberta_server.cuda_graphs import EncoderGraphs  # noqa: E402
from roberta_server.executor import shape_bucket  # noqa: E402
from roberta_server.model import SIZES, Roberta, cu_seqlens_of, varlen_attn  # noqa: E402
from workload import describe, length_sorted_batches, random_token_seqs, standard_lengths  # noqa: E402

log = logging.getLogger("bench_model")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("ceiling", "padded", "packed", "packed_again", "equal_rows")
LABELS = {
    "ceiling": "fixed shape, no padding (ceiling)",
    "padded": "padded to the longest of its batch",
    "packed": "packed (cu_seqlens)",
    "packed_again": "the same packed batch again",
    "equal_rows": "its rows in ceiling-length sequences",
}
SINGLE_LENGTH = 32
# The default ceiling batch (--ceiling), also the stream benchmark's ceiling on the CPU.
CEILING_BATCH, CEILING_LEN = 16, 64


@dataclass
class Tally:
    batches: int = 0
    useful_tokens: int = 0
    computed_tokens: int = 0
    seconds: float = 0.0
    times: list[float] = field(default_factory=list)

    def add(self, seconds: float, useful: int, computed: int) -> None:
        self.batches += 1
        self.useful_tokens += useful
        self.computed_tokens += computed
        self.seconds += seconds
        self.times.append(seconds)

    @property
    def useful_per_s(self) -> float:
        return self.useful_tokens / self.seconds if self.seconds else 0.0

    @property
    def padding(self) -> float:
        return 1 - self.useful_tokens / self.computed_tokens if self.computed_tokens else 0.0


class Runner:
    """One model in one dtype on one device; each call runs one batch and returns its seconds."""

    def __init__(self, model: Roberta, device: torch.device):
        self.model = model
        self.device = device
        half = next(model.parameters()).dtype != torch.float32
        self.shape_buckets = device.type == "cpu" and half

    def packed_rows(self, useful: int) -> int:
        """Rows the server runs for a packed batch of `useful` tokens."""
        return shape_bucket(useful) if self.shape_buckets else useful

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def run(self, seqs: list[list[int]], rows: int = 0) -> float:
        """Packed forward of `seqs` (equal lengths: a plain dense batch), with a padding
        sequence that makes it `rows` rows, if that is more."""
        pad = rows - sum(len(s) for s in seqs)
        if pad > 0:
            seqs = [*seqs, [self.model.cfg.padding_idx] * pad]
        lengths = [len(s) for s in seqs]
        flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=self.device)
        cu = cu_seqlens_of(lengths, self.device)
        self._sync()
        start = time.perf_counter()
        self.model(flat, cu, max(lengths))
        self._sync()
        return time.perf_counter() - start


def pad_to_longest(seqs: list[list[int]], pad: int = 1) -> list[list[int]]:
    longest = max(len(s) for s in seqs)
    return [s + [pad] * (longest - len(s)) for s in seqs]


def bench_dtype(
    runner: Runner, groups: list[list[list[int]]], ceiling: list[list[int]], seconds: float
) -> dict[str, Tally]:
    """Rounds of (ceiling batch, padded group, packed group twice, its rows in equal lengths)
    until `seconds` have been spent."""
    tallies = {mode: Tally() for mode in MODES}
    ceiling_tokens = len(ceiling) * len(ceiling[0])
    length = len(ceiling[0])
    # Warm-up: first calls allocate and pick kernels.
    runner.run(ceiling)
    runner.run(groups[0][:8])
    started = time.perf_counter()
    for i in itertools.count():
        group = groups[i % len(groups)]  # cycles when the workload runs out before the time
        tallies["ceiling"].add(runner.run(ceiling), ceiling_tokens, ceiling_tokens)
        padded = pad_to_longest(group)
        useful = sum(len(s) for s in group)
        tallies["padded"].add(runner.run(padded), useful, len(padded) * len(padded[0]))
        rows = runner.packed_rows(useful)
        tallies["packed"].add(runner.run(group, rows), useful, rows)
        tallies["packed_again"].add(runner.run(group, rows), useful, rows)
        # Exactly the packed batch's rows, so that this row count has run before too.
        equal = [ceiling[0]] * (rows // length)
        if rows % length:
            equal.append(ceiling[0][: rows % length])
        tallies["equal_rows"].add(runner.run(equal), rows, rows)
        log.debug("round %d: %d sequences, %d useful tokens", i, len(group), useful)
        if time.perf_counter() - started >= seconds:
            break
    return tallies


@torch.inference_mode()
def single_sequence_ms(model: Roberta, device: torch.device, reps: int) -> dict[str, float]:
    """Median ms of one SINGLE_LENGTH-token sequence, host tokens in, synchronized: an eager
    forward pass and a replay of the CUDA graph the server would use."""
    seq = random_token_seqs([SINGLE_LENGTH], 7)[0]
    flat = np.array(seq, dtype=np.int64)
    graphs = EncoderGraphs(model, device, SINGLE_LENGTH, max_sequences=1)
    graphs.capture()
    bucket = graphs.bucket_for([SINGLE_LENGTH])

    def eager() -> None:
        model(
            torch.from_numpy(flat).to(device), cu_seqlens_of([SINGLE_LENGTH], device), SINGLE_LENGTH
        )

    def replay() -> None:
        graphs.run(flat, [SINGLE_LENGTH], bucket)

    out = {}
    for name, fn in (("eager", eager), ("cuda_graph", replay)):
        times = []
        for _ in range(reps + 5):  # the first five warm up
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            times.append(1e3 * (time.perf_counter() - start))
        out[f"{name}_ms"] = sorted(times[5:])[reps // 2]
    return out


def print_table(rows: list[dict], ratios: dict[str, dict[str, float]]) -> None:
    header = (
        f"{'dtype':9} {'mode':40} {'useful tok/s':>12} {'computed/s':>11} {'padding':>8} "
        f"{'batches':>8} {'seconds':>8} {'vs ceiling':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['dtype']:9} {LABELS[r['mode']]:40} {r['useful_tokens_per_s']:12.0f} "
            f"{r['computed_tokens_per_s']:11.0f} {r['padding'] * 100:7.1f}% {r['batches']:8d} "
            f"{r['seconds']:8.2f} {ratios[r['dtype']][r['mode']]:10.2f}"
        )
    for dtype, ratio in ratios.items():
        print(
            f"{dtype}: packed/ceiling {ratio['packed']:.2f}, padded/ceiling {ratio['padded']:.2f}, "
            f"packed/padded {ratio['packed'] / ratio['padded']:.2f}; packed again/ceiling "
            f"{ratio['packed_again']:.2f}, equal rows/ceiling {ratio['equal_rows']:.2f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few seconds per dtype (a smoke run)")
    p.add_argument("--size", choices=sorted(SIZES), default="base", help="model shapes")
    p.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma-separated: " + ",".join(DTYPES)
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--budget", type=int, default=2048, help="tokens per padded batch")
    p.add_argument(
        "--arrival",
        type=int,
        metavar="N",
        help="batches of N sequences in the order drawn, instead of length-sorted ones",
    )
    p.add_argument(
        "--ceiling", default=f"{CEILING_BATCH}x{CEILING_LEN}", help="fixed ceiling batch, BxT"
    )
    p.add_argument("--seconds", type=float, help="time per dtype (default 30, --quick 4)")
    p.add_argument("--sequences", type=int, default=2000, help="size of the standard mix drawn")
    p.add_argument("--seed", type=int, default=0, help="workload seed (0: the standard mix)")
    p.add_argument(
        "--plain-linears",
        action="store_true",
        help="keep F.linear in half precision on the CPU (the server packs the weights)",
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: PyTorch's)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "model.json")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    if args.seconds is None:
        args.seconds = 4.0 if args.quick else 30.0
    try:
        args.ceiling = tuple(int(x) for x in args.ceiling.lower().split("x"))
        if len(args.ceiling) != 2 or min(args.ceiling) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--ceiling takes BATCHxLENGTH, e.g. 16x64, not {args.ceiling!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the server does
    device = torch.device(args.device)

    lengths = standard_lengths(args.sequences, args.seed)
    seqs = random_token_seqs(lengths, args.seed)
    if args.arrival:
        # Packed in length order, as the server's executor packs a batch.
        groups = [
            sorted(seqs[i : i + args.arrival], key=len) for i in range(0, len(seqs), args.arrival)
        ]
    else:
        groups = [[seqs[i] for i in g] for g in length_sorted_batches(lengths, args.budget)]
    random.Random(args.seed).shuffle(groups)  # early stopping still samples the whole mix
    ceiling_batch, ceiling_len = args.ceiling
    ceiling = random_token_seqs([ceiling_len] * ceiling_batch, args.seed + 1)
    log.info(
        "workload: %s in %d batches of %s",
        describe(lengths),
        len(groups),
        f"{args.arrival} sequences" if args.arrival else f"<= {args.budget} tokens",
    )

    cfg = SIZES[args.size]
    started = time.perf_counter()
    model = Roberta(cfg, with_lm_head=False)
    model.init_random(0)
    model.eval()
    log.info("random:%s shapes built in %.1f s", args.size, time.perf_counter() - started)

    rows, ratios, single = [], {}, {}
    for name in args.dtypes:
        model_d = copy.deepcopy(model).to(device=device, dtype=DTYPES[name])
        if not args.plain_linears:
            prepack_linears(model_d.layers)  # as the server does
        runner = Runner(model_d, device)
        if device.type == "cuda" and varlen_attn is not None and name != "float32":
            single[name] = single_sequence_ms(model_d, device, 20 if args.quick else 100)
        log.info("%s: measuring for ~%.0f s", name, args.seconds)
        tallies = bench_dtype(runner, groups, ceiling, args.seconds)
        ceiling_rate = tallies["ceiling"].useful_per_s
        ratios[name] = {m: t.useful_per_s / ceiling_rate for m, t in tallies.items()}
        for mode, t in tallies.items():
            rows.append(
                {
                    "dtype": name,
                    "mode": mode,
                    "useful_tokens_per_s": t.useful_per_s,
                    "computed_tokens_per_s": t.computed_tokens / t.seconds,
                    "padding": t.padding,
                    **{k: v for k, v in asdict(t).items() if k != "times"},
                    "median_batch_s": sorted(t.times)[len(t.times) // 2],
                }
            )

    print()
    print(
        f"RoBERTa-{args.size} shapes ({cfg.num_layers} layers, {cfg.hidden_size} hidden, "
        f"{cfg.num_heads} heads), {device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}{', quick' if args.quick else ''}"
    )
    batches = f"{args.arrival} sequences in arrival order" if args.arrival else f"<= {args.budget}"
    print(f"ceiling shape {ceiling_batch}x{ceiling_len}, packed/padded batches {batches}")
    print_table(rows, ratios)
    for name, ms in single.items():
        print(
            f"{name}: one {SINGLE_LENGTH}-token sequence, host to host: eager "
            f"{ms['eager_ms']:.2f} ms, CUDA graph {ms['cuda_graph_ms']:.2f} ms"
        )

    result = {
        "benchmark": "model",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "size": args.size,
            "model": asdict(cfg),
            "device": str(device),
            "dtypes": args.dtypes,
            "quick": args.quick,
            "seconds_per_dtype": args.seconds,
            "budget_tokens": args.budget,
            "arrival_batch": args.arrival,
            "ceiling_shape": list(args.ceiling),
            "prepacked_linears": not args.plain_linears,
            "workload": describe(lengths) | {"seed": args.seed, "batches": len(groups)},
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "results": rows,
        "ratios_vs_ceiling": ratios,
        "single_sequence_ms": single,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
