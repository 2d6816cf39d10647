"""A/B of server configurations: several servers at once, phases taking turns between them.

Each configuration is a set of server flags. All the servers start first (one model copy each),
then every phase runs against each server in turn, in rounds whose order alternates (A B C, then
C B A), so a slow stretch of the machine falls on all of them alike. Phases, on the standard
workload in `../shared/reference/measurements.md`:

- b: 32 clients, one text per unary request (ExtractFeatures `<s>` pooling and Classify);
- c: 16 clients, 64 texts per request (rate from the server's token counter);
- e: one client, one 32-token text at a time (latency);
- f: one client, GetModelInfo calls, which do no model work: the gRPC round trip alone.

A number after the letter sets the clients: `c64` is phase c with 64 clients.

Example (as in `bench/gpu.sh`; the first server runs another version of the code):

    python bench/bench_ab.py --model random:large --device cuda --dtype bfloat16 --inputs ids \\
        --config "before=PYTHONPATH=/tmp/old/server:/tmp/old/client" --config "now="

Prints one line per phase and configuration (median over rounds; model busy share and mean batch
time from each server's /metrics) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_server import BenchConfig, CpuMonitor, LoadGenProcess, build_workload  # noqa: E402
from roberta_server.launcher import ServerProcess  # noqa: E402

log = logging.getLogger("bench_ab")

PHASES = {
    "b": dict(concurrency=32, items_per_request=1),
    "c": dict(concurrency=16, items_per_request=64),
    "e": dict(concurrency=1, items_per_request=1, source="idle", rpc="features"),
    "f": dict(concurrency=1, items_per_request=1, source="idle", rpc="info"),
}


def phase_spec(name: str) -> dict[str, Any]:
    spec = dict(PHASES[name[0]])
    if name[1:]:
        spec["concurrency"] = int(name[1:])
    return spec


def parse_config(text: str) -> tuple[str, dict[str, str], list[str]]:
    """NAME=[VAR=VALUE ...] [FLAGS]: leading VAR=VALUE words set the server's environment (say,
    PYTHONPATH to another version of the code)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"want NAME=FLAGS, got {text!r}")
    words = rest.split()
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return name, env, words


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    servers = [r.get("server", {}) for r in results]
    return {
        "useful_tokens_per_s": med([r["useful_tokens_per_s"] for r in results]),
        "requests_per_s": med([r.get("requests_per_s") for r in results]),
        "p50_ms": med([r["latency_ms"]["p50"] for r in results]),
        "p99_ms": med([r["latency_ms"]["p99"] for r in results]),
        "model_busy_fraction": med([s.get("model_busy_fraction") for s in servers]),
        "mean_batch_ms": med([s.get("mean_batch_ms") for s in servers]),
        "items_per_batch": med([s.get("items_per_batch") for s in servers]),
        "padding_waste": med([s.get("padding_waste") for s in servers]),
        "server_cores": med([r.get("cpu", {}).get("server_cores") for r in results]),
        "errors": sum(len(r["errors"]) for r in results),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="random:base")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--inputs", choices=("text", "ids"), default="text")
    p.add_argument("--config", action="append", type=parse_config, required=True,
                   help="NAME=[VAR=VALUE ...] FLAGS: one configuration's environment and server "
                        "flags (repeatable)")  # fmt: skip
    p.add_argument(
        "--phases",
        default="b,c,e",
        help="some of b, c, e, f (each with an optional client count), comma-separated",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds of b and c")
    p.add_argument("--out", type=Path, default=HERE / "results" / "ab-latest.json")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    phases = [ph for ph in args.phases.split(",") if ph]
    for ph in phases:
        phase_spec(ph)  # unknown phases fail before any server starts
    cfg = BenchConfig(dtypes=[args.dtype], model=args.model, device=args.device, inputs=args.inputs)
    workload = Path(tempfile.mkdtemp()) / "workload.json"
    build_workload(cfg, workload)
    gen = LoadGenProcess()
    gen.workload(workload)
    cpu = CpuMonitor()
    servers: dict[str, ServerProcess] = {}
    started = time.perf_counter()
    try:
        common = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
        for name, env, flags in args.config:
            servers[name] = ServerProcess(*common, *flags, env=env)
        for name, server in servers.items():
            server.wait_ready(timeout=600)
            gen.target(name, server)
            cpu.pids[name] = server.proc.pid
        log.info("%d servers ready in %.0f s", len(servers), time.perf_counter() - started)
        raw: dict[str, dict[str, list[dict]]] = {ph: {n: [] for n in servers} for ph in phases}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for ph in phases:
                for name in order:
                    timing = (
                        dict(requests=40, warmup_requests=10)
                        if ph[0] in "ef"
                        else dict(warmup_s=1.0, duration_s=args.seconds)
                    )
                    out = gen.phase(cpu, quiet=True, name=f"{ph}/{name}", target=name,
                                    **phase_spec(ph), **timing)  # fmt: skip
                    if "cpu" in out:
                        out["cpu"]["server_cores"] = out["cpu"].get(f"{name}_cores")
                    # Calls cut at the window's end leave a batch running: the next phase,
                    # on another server, must not share the device with it.
                    out["settle_s"] = cpu.wait_idle([name])
                    raw[ph][name].append(out)
                    log.info("round %d %s %s: %.0f tok/s, p50 %.2f ms", r, ph, name,
                             out["useful_tokens_per_s"], out["latency_ms"]["p50"] or 0)  # fmt: skip
    finally:
        for server in servers.values():
            server.terminate()
        gen.close()
    summary = {ph: {n: summarize(rs) for n, rs in per.items() if rs} for ph, per in raw.items()}
    print(f"\n== {args.model} {args.dtype} on {args.device}, inputs {args.inputs}, "
          f"{args.rounds} rounds")  # fmt: skip
    header = (
        f"{'phase':5} {'config':22} {'useful tok/s':>12} {'req/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'busy':>5} {'batch ms':>8} {'items/b':>7} {'pad':>5} {'cores':>5} "
        f"{'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for ph in phases:
        for name, s in summary[ph].items():

            def f(key: str, spec: str, s: dict = s) -> str:
                return "-" if s[key] is None else format(s[key], spec)

            print(
                f"{ph:5} {name:22} {f('useful_tokens_per_s', '.0f'):>12} "
                f"{f('requests_per_s', '.0f'):>8} {f('p50_ms', '.2f'):>7} {f('p99_ms', '.1f'):>7} "
                f"{f('model_busy_fraction', '.2f'):>5} {f('mean_batch_ms', '.1f'):>8} "
                f"{f('items_per_batch', '.1f'):>7} {f('padding_waste', '.2f'):>5} "
                f"{f('server_cores', '.2f'):>5} {s['errors']:>6}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "raw": raw},
            indent=1,
            default=str,
        )  # fmt: skip
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
