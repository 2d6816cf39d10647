"""End-to-end server benchmark on the standard mixed-length workload (`make bench`).

For each dtype (float32 then bfloat16 by default), on this one machine:
  a. ceiling: the model alone, in-process (`roberta_server.load`), fixed shapes with no padding,
     best of a few batch shapes of <= 2048 tokens (the server's CPU batch budget; 16384 on
     CUDA): useful tok/s;
  b. server: a separate load-generator process (loadgen.py, grpc.aio, one event loop) with N
     concurrent clients (default 32), each sending unary requests of ONE text of the standard mix,
     alternately ExtractFeatures (CLS pooling) and Classify (head mnli): tok/s and latency;
  c. bulk: the same server, requests of 64 texts each (4 in flight, as the SDK sends a long list);
  d. naive baseline: the real server started with `--max-batch-size 1` (one forward pass per
     sequence, no batching), loaded exactly as b;
  e. idle: one request at a time (a 32-token text) against the model's own forward time of that
     one sequence in-process: the serving overhead in ms;
  plus throughput at concurrency 1, 4, 16, 64 (the plot), and padding waste and model busy time
  from the server's /metrics (scraped before and after each measurement window).
Texts are made of words that are one BPE token each, so every text has exactly its sampled length.

The machine is shared (2 cores; other jobs run tests): every phase records the CPU time that
other processes used meanwhile (/proc/stat minus this benchmark's processes) and is flagged
NOISY, and re-run (--noisy-retries, not in --quick), when it is above 0.2 cores. The in-process
ceiling is measured in bursts between the served phases (the best burst counts) and (e)
interleaves served requests with in-process forward passes block by block, so changing load hits
both sides alike; ratios are also given per CPU-second of the working process, which moves much
less under foreign load.

    python bench/bench_server.py [--quick] [--model random:base] [--dtype float32|bfloat16|both]

Writes bench/results/bench-<timestamp>.json, bench/results/latest.json and
bench/results/throughput.png. Compare ratios within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import roberta_server  # noqa: F401
except ImportError:  # a source tree that was not pip-installed
    sys.path.insert(0, str(HERE.parent / "server"))
    sys.path.insert(0, str(HERE.parent / "client"))

from roberta_server.launcher import ServerProcess  # noqa: E402
from workload import (  # noqa: E402
    describe,
    random_token_seqs,
    single_token_words,
    standard_lengths,
    texts_of_lengths,
)

log = logging.getLogger("bench_server")
T = TypeVar("T")

DTYPES = ("float32", "bfloat16")
# Candidate ceiling shapes (batch, length), all within the CPU server's 2048-token batch budget.
CEILING_SHAPES = ((16, 64), (32, 64), (64, 32))
QUICK_CEILING_SHAPES = ((16, 64), (32, 64))
# On CUDA: shapes of the GPU server's 16384-token batch budget.
CUDA_CEILING_SHAPES = ((64, 256), (128, 128), (256, 64))
IDLE_LENGTH = 32
# Foreign CPU use (cores) above which a phase is flagged as disturbed by other jobs.
NOISY_FOREIGN_CORES = 0.2
NAIVE_METHOD = "real server with the flag --max-batch-size 1 (one sequence per forward pass)"


@dataclass
class Durations:
    ceiling_s: float = 8.0  # per burst; three bursts between the served phases
    warmup_s: float = 5.0
    phase_s: float = 30.0
    bulk_s: float = 40.0
    sweep_warmup_s: float = 3.0
    sweep_s: float = 15.0
    idle_warmup: int = 20
    idle_requests: int = 200

    @classmethod
    def quick(cls) -> Durations:
        return cls(
            ceiling_s=1.0,
            warmup_s=1.5,
            phase_s=6.0,
            bulk_s=8.0,
            sweep_warmup_s=1.0,
            sweep_s=4.0,
            idle_warmup=5,
            idle_requests=30,
        )


@dataclass
class BenchConfig:
    model: str = "random:base"
    dtypes: list[str] = field(default_factory=lambda: list(DTYPES))
    device: str = "auto"
    quick: bool = False
    concurrency: int = 32
    sweep: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    bulk_items: int = 64
    bulk_concurrency: int = 4
    inputs: str = "text"
    sequences: int = 2000
    seed: int = 0
    durations: Durations = field(default_factory=Durations)
    profile: str = ""  # py-spy output format for phase b ("" = no profile)
    retries: int = 2  # extra runs of a phase that other jobs on the machine disturbed
    server_args: list[str] = field(default_factory=list)
    out_dir: Path = HERE / "results"


# ---------------------------------------------------------------- processes


class CpuMonitor:
    """CPU time of the whole machine vs. this benchmark's processes: flags foreign load (other
    jobs on a shared machine), which makes a phase's figures unreliable."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self) -> None:
        self.pids: dict[str, int] = {"bench": os.getpid()}

    def _busy(self) -> float | None:
        try:
            with open("/proc/stat") as f:
                values = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return (sum(values[:8]) - idle) / self.TICK

    def _pid_cpu(self, pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields_ = f.read().rsplit(")", 1)[1].split()
            return (int(fields_[11]) + int(fields_[12])) / self.TICK  # utime + stime
        except (OSError, IndexError, ValueError):
            return 0.0

    def wait_idle(self, names: Sequence[str], timeout: float = 60.0) -> float:
        """Until these processes use (almost) no CPU, e.g. a server finishing the batch of a
        cancelled request; returns the seconds waited."""
        started = time.perf_counter()
        last = sum(self._pid_cpu(self.pids[n]) for n in names if n in self.pids)
        while time.perf_counter() - started < timeout:
            time.sleep(0.1)
            now = sum(self._pid_cpu(self.pids[n]) for n in names if n in self.pids)
            if now - last < 0.005:  # under 5% of a core over the last 100 ms
                break
            last = now
        return time.perf_counter() - started

    def snapshot(self) -> dict[str, float] | None:
        busy = self._busy()
        if busy is None:
            return None
        snap = {name: self._pid_cpu(pid) for name, pid in self.pids.items()}
        snap["_busy"], snap["_t"] = busy, time.perf_counter()
        return snap

    def since(self, before: dict[str, float]) -> dict[str, float]:
        after = self.snapshot()
        if after is None:
            return {}
        wall = after["_t"] - before["_t"]
        out = {f"{k}_cores": (after[k] - before.get(k, after[k])) / wall for k in self.pids}
        ours = sum(after[k] - before.get(k, after[k]) for k in self.pids)
        out["wall_s"] = wall
        out["machine_busy_cores"] = (after["_busy"] - before["_busy"]) / wall
        out["foreign_cores"] = max(0.0, out["machine_busy_cores"] - ours / wall)
        return out


def _noise_note(cpu: dict[str, float] | None) -> str:
    if not cpu or cpu.get("foreign_cores", 0.0) < NOISY_FOREIGN_CORES:
        return ""
    return f" [NOISY: other jobs used {cpu['foreign_cores']:.2f} cores]"


class LoadGenProcess:
    """bench/loadgen.py in its own process, driven by JSON lines."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "loadgen.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited ({self.proc.poll()})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"load generator: {reply.get('error')}")
        return reply

    def workload(self, path: Path) -> None:
        self.command({"op": "workload", "path": str(path)})

    def target(self, name: str, server: ServerProcess) -> None:
        self.command(
            {
                "op": "target",
                "name": name,
                "target": f"127.0.0.1:{server.port}",
                "metrics_url": f"http://127.0.0.1:{server.metrics_port}/metrics",
            }
        )

    def phase(self, cpu: CpuMonitor | None = None, quiet: bool = False, **spec: Any) -> dict:
        load = os.getloadavg()[0]
        snap = cpu.snapshot() if cpu else None
        started = time.perf_counter()
        result = self.command({"op": "phase", "spec": spec})["result"]
        if cpu and snap:
            result["cpu"] = cpu.since(snap)
            # Calls cut at the end of the window leave their batch running: let it finish, so
            # that the next phase (or an in-process burst) has the machine to itself.
            result["settle_s"] = cpu.wait_idle(("server", "naive"))
        result["elapsed_s"] = time.perf_counter() - started
        result["loadavg_1m_before"] = load
        if cpu and snap:
            cores = result["cpu"].get(
                "naive_cores" if spec.get("target") == "naive" else "server_cores"
            )
            # Useful tokens per CPU-second of the server: less sensitive to other jobs' load.
            result["tokens_per_cpu_s"] = result["useful_tokens_per_s"] / cores if cores else None
        if result["errors"]:
            log.warning("%s: errors %s", spec["name"], result["errors"])
        if not quiet:
            log.info(
                "%s: %.0f useful tok/s, p50 %.1f ms (%d requests)%s",
                spec["name"],
                result["useful_tokens_per_s"],
                result["latency_ms"]["p50"] or float("nan"),
                result["requests"],
                _noise_note(result.get("cpu")),
            )
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- workload


def build_workload(cfg: BenchConfig, path: Path) -> dict[str, Any]:
    """The standard mix as texts (or ids) of exactly the sampled lengths, written for loadgen."""
    from roberta_server.tokenizer import Tokenizer

    lengths = standard_lengths(cfg.sequences, cfg.seed)
    if cfg.inputs == "ids":
        items: list[Any] = random_token_seqs(lengths, cfg.seed)
        idle_item: Any = random_token_seqs([IDLE_LENGTH], cfg.seed + 2)[0]
        idle_ids = idle_item
    else:
        tok = Tokenizer.default()
        *items, idle_item = texts_of_lengths(
            single_token_words(tok), [*lengths, IDLE_LENGTH], cfg.seed
        )
        bad = [
            i
            for i, (t, n) in enumerate(zip(items, lengths, strict=True))
            if len(tok.encode(t)) != n
        ]
        if bad:
            raise RuntimeError(f"{len(bad)} texts do not tokenize to their length, e.g. #{bad[0]}")
        idle_ids = tok.encode(idle_item)
        assert len(idle_ids) == IDLE_LENGTH
    data = {
        "inputs": cfg.inputs,
        "items": items,
        "lengths": lengths,
        "idle_item": idle_item,
        "idle_length": IDLE_LENGTH,
    }
    path.write_text(json.dumps(data))
    return {"lengths": lengths, "idle_ids": idle_ids}


# ---------------------------------------------------------------- in-process model


class InProcessModel:
    """The model alone in this process (`roberta_server.load`): the ceiling and the forward time
    of one sequence. Measured in short bursts between the served phases (never at the same
    time), so that a shared machine's changing load hits both sides alike."""

    def __init__(self, cfg: BenchConfig, dtype: str):
        import torch
        from roberta_server import load
        from roberta_server.cpu_memory import retain_freed_memory
        from roberta_server.model import cu_seqlens_of

        retain_freed_memory()  # as the server does
        self.torch, self.cu_seqlens_of = torch, cu_seqlens_of
        self.hub = load(cfg.model, cfg.device, dtype)
        self.model, self.device = self.hub.model, self.hub.device
        shapes = QUICK_CEILING_SHAPES if cfg.quick else CEILING_SHAPES
        if self.device.type == "cuda":
            shapes = CUDA_CEILING_SHAPES
        self.batches = {f"{b}x{n}": random_token_seqs([n] * b, cfg.seed + 1) for b, n in shapes}
        self.bursts: list[dict[str, Any]] = []
        for seqs in self.batches.values():
            self.run(seqs)  # warm-up: allocation, kernel choice

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def run(self, seqs: list[list[int]]) -> float:
        """Seconds of one packed forward pass of `seqs` (equal lengths: a plain dense batch)."""
        torch = self.torch
        lengths = [len(s) for s in seqs]
        with torch.inference_mode():
            flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=self.device)
            cu = self.cu_seqlens_of(lengths, self.device)
            self._sync()
            start = time.perf_counter()
            self.model(flat, cu, max(lengths))
            self._sync()
            return time.perf_counter() - start

    def ceiling_burst(self, seconds: float, cpu: CpuMonitor) -> dict[str, Any]:
        """Rounds of every candidate shape (interleaved) for about `seconds`, at least one."""
        snap = cpu.snapshot()
        spent = dict.fromkeys(self.batches, 0.0)
        tokens = dict.fromkeys(self.batches, 0)
        started = time.perf_counter()
        while True:
            for name, seqs in self.batches.items():
                spent[name] += self.run(seqs)
                tokens[name] += len(seqs) * len(seqs[0])
            if time.perf_counter() - started >= seconds:
                break
        used = cpu.since(snap) if snap else {}
        cores = used.get("bench_cores")
        burst = {
            "tokens_per_s": {k: tokens[k] / spent[k] for k in self.batches},
            # Per CPU-second of this process (all shapes together): robust to other jobs' load.
            "tokens_per_cpu_s": {
                k: tokens[k] / (spent[k] * cores) if cores else None for k in self.batches
            },
            "cores": cores,
            "spent": spent,
            "tokens": tokens,
            "cpu": used,
        }
        log.info(
            "ceiling burst: %s%s",
            ", ".join(f"{k} {v:.0f} tok/s" for k, v in burst["tokens_per_s"].items()),
            _noise_note(burst["cpu"]),
        )
        self.bursts.append(burst)
        return burst

    def forward_ms(self, ids: list[int], reps: int) -> list[float]:
        return [1e3 * self.run([ids]) for _ in range(reps)]

    def summary(self) -> dict[str, Any]:
        """Per shape, the best rate of the bursts that no other job disturbed (if there are none,
        the least disturbed one); the ceiling is the best shape's. The best burst, not their
        average: a burst runs slower for many reasons (a bfloat16 process's first burst ran at
        6,124 tok/s, its next two at 7,803 and 7,522) and none of them is the model's to claim."""
        used = _quiet(self.bursts, lambda b: b["cpu"])
        shapes = {}
        for name in self.batches:
            shapes[name] = {
                "tokens_per_s": max(b["tokens"][name] / b["spent"][name] for b in used),
                "seconds": sum(b["spent"][name] for b in used),
            }
        best = max(shapes, key=lambda k: shapes[k]["tokens_per_s"])
        cpu_s = sum(b["spent"][best] * b["cores"] for b in used if b["cores"])
        tokens_cpu = sum(b["tokens"][best] for b in used if b["cores"])
        return {
            "device": str(self.device),
            "threads": self.torch.get_num_threads(),
            "torch": self.torch.__version__,
            "shapes": shapes,
            "best_shape": best,
            "useful_tokens_per_s": shapes[best]["tokens_per_s"],
            "tokens_per_cpu_s": tokens_cpu / cpu_s if cpu_s else None,
            "bursts": [
                {k: b[k] for k in ("tokens_per_s", "tokens_per_cpu_s", "cpu")} | {"used": b in used}
                for b in self.bursts
            ],
        }


def _foreign(cpu: dict[str, float] | None) -> float:
    return (cpu or {}).get("foreign_cores", 0.0)


def _quiet(runs: list[T], cpu_of: Callable[[T], dict | None]) -> list[T]:
    """The runs no other job disturbed, or else the least disturbed one."""
    quiet = [r for r in runs if _foreign(cpu_of(r)) < NOISY_FOREIGN_CORES]
    return quiet or [min(runs, key=lambda r: _foreign(cpu_of(r)))]


# ---------------------------------------------------------------- served phases


def start_server(cfg: BenchConfig, dtype: str, extra: Sequence[str] = ()) -> ServerProcess:
    started = time.perf_counter()
    server = ServerProcess(
        "--model", cfg.model, "--device", cfg.device, "--dtype", dtype, *cfg.server_args, *extra
    )
    try:
        server.wait_ready()
    except Exception:
        server.terminate(timeout=5)
        raise RuntimeError(f"server did not start:\n{server.tail(20)}") from None
    log.info(
        "server %s %s ready in %.1f s (port %d, metrics %d)",
        dtype,
        " ".join(extra),
        time.perf_counter() - started,
        server.port,
        server.metrics_port,
    )
    return server


def profile_start(cfg: BenchConfig, server: ServerProcess, name: str, seconds: float):
    if not cfg.profile:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    ext = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[cfg.profile]
    out = cfg.out_dir / f"profile-{name}.{ext}"
    cmd = [spy, "record", "--pid", str(server.proc.pid), "--duration", str(int(seconds) + 1),
           "--rate", "100", "--threads", "--format", cfg.profile, "--output", str(out)]  # fmt: skip
    log.info("profiling the server for %s into %s", name, out)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_dtype(cfg: BenchConfig, dtype: str, wl: dict[str, Any], gen: LoadGenProcess) -> dict:
    """Every phase of one dtype. Two servers (batching and naive) stay up together; only one
    of them, or the in-process model, works at any moment. A phase during which other jobs
    used the CPU is run again (up to `noisy_retries` times) and the quietest run is kept."""
    d = cfg.durations
    cpu = CpuMonitor()
    model = InProcessModel(cfg, dtype)
    servers: list[ServerProcess] = []
    out: dict[str, Any] = {}

    def clean(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        tries = [run()]
        while _foreign(tries[-1].get("cpu")) >= NOISY_FOREIGN_CORES and len(tries) <= cfg.retries:
            log.info("... run again: other jobs disturbed it")
            tries.append(run())
        best = min(tries, key=lambda r: _foreign(r.get("cpu")))
        best["attempts"] = len(tries)
        return best

    def ceiling_burst() -> None:
        clean(lambda: model.ceiling_burst(d.ceiling_s, cpu))

    try:
        main_srv = start_server(cfg, dtype)
        servers.append(main_srv)
        naive_srv = start_server(cfg, dtype, ["--max-batch-size", "1"])
        servers.append(naive_srv)
        cpu.pids.update(server=main_srv.proc.pid, naive=naive_srv.proc.pid, loadgen=gen.proc.pid)
        gen.target("main", main_srv)
        gen.target("naive", naive_srv)
        out["idle"] = idle_phase(cfg, dtype, wl["idle_ids"], gen, model, cpu)

        timed = dict(cpu=cpu, warmup_s=d.warmup_s, duration_s=d.phase_s)
        ceiling_burst()
        spy = profile_start(cfg, main_srv, f"{dtype}-b", d.warmup_s + d.phase_s)
        out["server"] = clean(
            lambda: gen.phase(name=f"{dtype}/b-server", concurrency=cfg.concurrency, **timed)
        )
        if spy is not None:
            spy.wait()
        out["naive"] = clean(
            lambda: gen.phase(
                name=f"{dtype}/d-naive", target="naive", concurrency=cfg.concurrency, **timed
            )
        )
        out["naive"]["method"] = NAIVE_METHOD
        ceiling_burst()
        out["bulk"] = clean(
            lambda: gen.phase(
                name=f"{dtype}/c-bulk", cpu=cpu, concurrency=cfg.bulk_concurrency,
                items_per_request=cfg.bulk_items, warmup_s=d.warmup_s, duration_s=d.bulk_s,
            )
        )  # fmt: skip
        out["sweep"] = {}
        for n in cfg.sweep:
            out["sweep"][str(n)] = clean(
                lambda n=n: gen.phase(
                    name=f"{dtype}/sweep-{n}", cpu=cpu, concurrency=n,
                    warmup_s=d.sweep_warmup_s, duration_s=d.sweep_s,
                )
            )  # fmt: skip
        ceiling_burst()
    finally:
        for server in servers:
            server.terminate()
    out["ceiling"] = model.summary()
    out["ceiling"]["idle_forward_ms"] = out["idle"].pop("forward_ms")
    log.info(
        "%s/a-ceiling: %.0f tok/s (best %s)",
        dtype,
        out["ceiling"]["useful_tokens_per_s"],
        out["ceiling"]["best_shape"],
    )
    return out


def idle_phase(
    cfg: BenchConfig,
    dtype: str,
    idle_ids: list[int],
    gen: LoadGenProcess,
    model: InProcessModel,
    cpu: CpuMonitor,
) -> dict[str, Any]:
    """(e) Blocks of served requests, one at a time, alternate with blocks of the same
    sequence's forward pass in-process; blocks disturbed by other jobs are left out."""
    d = cfg.durations
    spec = dict(target="main", concurrency=1, source="idle", rpc="features", parse=True,
                scrape=False, quiet=True)  # fmt: skip
    gen.phase(name=f"{dtype}/e-idle-warmup", requests=d.idle_warmup, **spec)
    model.forward_ms(idle_ids, 3)
    block = 5
    pairs = []
    for _ in range(max(1, d.idle_requests // block)):
        snap = cpu.snapshot()
        served = gen.phase(name=f"{dtype}/e-idle", requests=block, **spec)
        forward = model.forward_ms(idle_ids, block)
        pairs.append((served, forward, cpu.since(snap) if snap else {}))
    used = _quiet(pairs, lambda p: p[2])
    if len(used) < max(3, len(pairs) // 3):  # too few quiet blocks: take them all
        used = pairs
    result = merge_counted([p[0] for p in used])
    fwd = sorted(x for p in used for x in p[1])
    result["forward_ms"] = {"p50": _median(fwd), "min": fwd[0], "n": len(fwd)}
    result["blocks"] = {"total": len(pairs), "used": len(used), "size": block}
    result["cpu"] = {"foreign_cores": sum(_foreign(p[2]) for p in used) / len(used)}
    log.info(
        "%s/e-idle: served p50 %.1f ms, in-process forward p50 %.1f ms (%d of %d blocks)%s",
        dtype,
        result["latency_ms"]["p50"],
        result["forward_ms"]["p50"],
        len(used),
        len(pairs),
        _noise_note(result["cpu"]),
    )
    return result


def merge_counted(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several fixed-count blocks (latency percentiles over all samples)."""
    lat = sorted(x for p in parts for x in p["latencies_ms"])
    first = parts[0]
    seconds = sum(p["window_s"] for p in parts)
    usage_keys = first.get("server_usage_ms_p50", {}).keys()
    usages = {k: sorted(u[k] for p in parts for u in p.get("usages", [])) for k in usage_keys}
    minus = sorted(x for p in parts for x in p.get("latency_minus_inference_ms", []))
    return {
        "spec": first["spec"] | {"requests": sum(p["requests"] for p in parts)},
        "window_s": seconds,
        "requests": len(lat),
        "useful_tokens": sum(p["useful_tokens"] for p in parts),
        "useful_tokens_per_s": sum(p["useful_tokens"] for p in parts) / seconds,
        "requests_per_s": len(lat) / seconds,
        "errors": {k: v for p in parts for k, v in p["errors"].items()},
        "latency_ms": latency_stats(lat),
        "server_usage_ms_p50": {k: _median(v) for k, v in usages.items()},
        "latency_minus_inference_ms_p50": _median(minus),
    }


def _median(xs: list[float]) -> float | None:
    return xs[len(xs) // 2] if xs else None


def latency_stats(lat: list[float]) -> dict[str, float | None]:
    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, round(q / 100 * (len(lat) - 1)))] if lat else None

    return {
        "mean": sum(lat) / len(lat) if lat else None,
        "p50": pct(50),
        "p95": pct(95),
        "p99": pct(99),
        "max": lat[-1] if lat else None,
    }


# ---------------------------------------------------------------- report


def ratios_and_targets(r: dict[str, Any]) -> tuple[dict[str, Any], list[tuple]]:
    a = r["ceiling"]["useful_tokens_per_s"]
    b = r["server"]["useful_tokens_per_s"]
    c = r["bulk"]["useful_tokens_per_s"]
    dd = r["naive"]["useful_tokens_per_s"]
    idle_p50 = r["idle"]["latency_ms"]["p50"]
    overhead = idle_p50 - r["ceiling"]["idle_forward_ms"]["p50"]
    waste = (r["server"].get("server") or {}).get("padding_waste")
    sweep = r["sweep"]
    hi, lo = sweep.get("64"), sweep.get("16")
    ratios = {
        "b_over_a": b / a,
        "c_over_a": c / a,
        "b_over_d": b / dd if dd else None,
        # What b/d would be if the server ran at the ceiling: naive serving is one forward pass
        # per request, so this is what batching can be worth on this machine at all.
        "a_over_d": a / dd if dd else None,
        "idle_overhead_ms": overhead,
        "idle_overhead_vs_server_inference_ms": r["idle"].get("latency_minus_inference_ms_p50"),
        "padding_waste_b": waste,
        "padding_waste_c": (r["bulk"].get("server") or {}).get("padding_waste"),
        "sweep_64_over_16": (
            hi["useful_tokens_per_s"] / lo["useful_tokens_per_s"] if hi and lo else None
        ),
    }
    # The same ratios per CPU-second of the process doing the work: they move much less than
    # the wall-clock ones when other jobs share the machine (shown next to them, not judged).
    a_cpu = r["ceiling"].get("tokens_per_cpu_s")
    b_cpu, c_cpu, d_cpu = (r[k].get("tokens_per_cpu_s") for k in ("server", "bulk", "naive"))
    ratios["per_cpu_s"] = {
        "b_over_a": _ratio(b_cpu, a_cpu),
        "c_over_a": _ratio(c_cpu, a_cpu),
        "b_over_d": _ratio(b_cpu, d_cpu),
    }
    targets = [
        ("b/a (server / ceiling)", ratios["b_over_a"], ">=", 0.85),
        ("c/a (bulk / ceiling)", ratios["c_over_a"], ">=", 0.9),
        ("b/d (server / naive)", ratios["b_over_d"], ">=", 3.0),
        ("idle overhead ms (p50 served - p50 forward)", overhead, "<=", 3.0),
        ("padding waste in b", waste, "<=", 0.05),
        ("throughput at 64 / at 16 clients", ratios["sweep_64_over_16"], ">=", 1.0),
    ]
    return ratios, targets


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(cfg: BenchConfig, results: dict[str, Any]) -> bool:
    all_pass = True
    for dtype, r in results["dtypes"].items():
        a = r["ceiling"]
        print()
        print(
            f"== {cfg.model} {dtype} on {a['device']}, {a['threads']} torch threads, "
            f"{os.cpu_count()} cores, torch {a['torch']}{', quick' if cfg.quick else ''}"
        )
        header = (
            f"{'phase':44} {'useful tok/s':>12} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'p99 ms':>8} {'items/b':>7} {'pad':>6} {'busy':>5} {'other':>5} {'tok/CPU-s':>9}"
        )
        print(header)
        print("-" * len(header))
        shapes = ", ".join(f"{k} {v['tokens_per_s']:.0f}" for k, v in a["shapes"].items())
        print(f"{'a ceiling, in-process, ' + a['best_shape'] + ' no padding':44} "
              f"{a['useful_tokens_per_s']:12.0f} {'':68} {_fmt(a.get('tokens_per_cpu_s')):>9}"
              f"\n  (shapes: {shapes})")  # fmt: skip
        rows = [
            (f"b server, {cfg.concurrency} clients x 1 text", r["server"]),
            (f"c bulk, {cfg.bulk_concurrency} clients x {cfg.bulk_items} texts", r["bulk"]),
            (f"d naive (--max-batch-size 1), {cfg.concurrency} cl.", r["naive"]),
            (f"e idle, 1 client x {IDLE_LENGTH}-token text", r["idle"]),
        ] + [(f"  sweep: {n} clients x 1 text", p) for n, p in r["sweep"].items()]
        for label, p in rows:
            lat, srv = p["latency_ms"], p.get("server") or {}
            star = "*" if p.get("rate_source") == "server metrics" else " "
            print(
                f"{label:44} {p['useful_tokens_per_s']:11.0f}{star} {p['requests_per_s']:7.1f} "
                f"{_fmt(lat['p50'], '.1f'):>8} {_fmt(lat['p95'], '.1f'):>8} "
                f"{_fmt(lat['p99'], '.1f'):>8} {_fmt(srv.get('items_per_batch'), '.1f'):>7} "
                f"{_fmt(_pct(srv.get('padding_waste')), '.1f'):>5}% "
                f"{_fmt(_pct(srv.get('model_busy_fraction')), '.0f'):>4}% "
                f"{_fmt((p.get('cpu') or {}).get('foreign_cores'), '.2f'):>5} "
                f"{_fmt(p.get('tokens_per_cpu_s')):>9}"
            )
        bursts = ", ".join(
            f"{b['tokens_per_s'][a['best_shape']]:.0f}{'' if b['used'] else ' (noisy, unused)'}"
            for b in a["bursts"]
        )
        print(
            f"(ceiling bursts {bursts} tok/s; items/b: mean sequences per batch; pad: padding "
            "waste from /metrics; busy: model busy time / window; other: CPU cores used by other "
            "jobs on this machine during the phase, i.e. noise; tok/CPU-s: useful tokens per "
            "CPU-second of the serving process; *: rate from the server's token counter, as the "
            "replies were too few or each carried several texts)"
        )
        idle = r["idle"]
        usage = idle.get("server_usage_ms_p50") or {}
        print(
            f"idle: served p50 {idle['latency_ms']['p50']:.1f} ms, in-process forward p50 "
            f"{a['idle_forward_ms']['p50']:.1f} ms; server-reported p50 inference "
            f"{_fmt(usage.get('inference_ms'), '.1f')} ms, tokenize "
            f"{_fmt(usage.get('tokenize_ms'), '.2f')} ms, queue {_fmt(usage.get('queue_ms'), '.2f')}"
            f" ms; latency - server inference p50 "
            f"{_fmt(idle.get('latency_minus_inference_ms_p50'), '.2f')} ms"
        )
        srv = r["server"].get("server") or {}
        print(
            f"b decomposed: model busy {_fmt(_pct(srv.get('model_busy_fraction')), '.0f')}% x "
            f"rate while busy {_fmt(srv.get('real_tokens_per_busy_s'))} tok/s "
            f"(= {_fmt(_ratio(srv.get('real_tokens_per_busy_s'), a['useful_tokens_per_s']), '.2f')}"
            f" of ceiling); mean batch {_fmt(srv.get('mean_batch_ms'), '.0f')} ms, "
            f"{_fmt(srv.get('real_tokens_per_batch'))} real tokens"
        )
        ratios, targets = r["ratios"], r["targets"]
        print(
            f"naive baseline: {NAIVE_METHOD}; a/d {_fmt(ratios['a_over_d'], '.2f')} (b/d if the "
            "server ran at the ceiling: what batching can be worth here)"
        )
        print(
            f"ratios: b/a {_fmt(ratios['b_over_a'], '.2f')}, c/a {_fmt(ratios['c_over_a'], '.2f')},"
            f" b/d {_fmt(ratios['b_over_d'], '.2f')}, idle overhead "
            f"{ratios['idle_overhead_ms']:.2f} ms, padding waste b "
            f"{_fmt(_pct(ratios['padding_waste_b']), '.1f')}% / c "
            f"{_fmt(_pct(ratios['padding_waste_c']), '.1f')}%"
        )
        per_cpu = ratios["per_cpu_s"]
        print(
            f"per server CPU-second (robust to other jobs): b/a {_fmt(per_cpu['b_over_a'], '.2f')},"
            f" c/a {_fmt(per_cpu['c_over_a'], '.2f')}, b/d {_fmt(per_cpu['b_over_d'], '.2f')}"
        )
        print("targets:")
        for name, value, op, bound, ok in targets:
            all_pass &= ok is not False
            verdict = "n/a" if ok is None else "PASS" if ok else "FAIL"
            print(f"  {name:46} {_fmt(value, '.3f'):>8} {op} {bound:<5} {verdict}")
    return all_pass


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def plot(cfg: BenchConfig, results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"float32": "tab:blue", "bfloat16": "tab:orange", "float16": "tab:green"}
    for dtype, r in results["dtypes"].items():
        color = colors.get(dtype)
        points = {int(n): p["useful_tokens_per_s"] for n, p in r["sweep"].items()}
        points[cfg.concurrency] = r["server"]["useful_tokens_per_s"]
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], "o-", color=color, label=f"{dtype}: server")
        ax.axhline(
            r["ceiling"]["useful_tokens_per_s"], color=color, ls="--", lw=1,
            label=f"{dtype}: model alone, {r['ceiling']['best_shape']} (ceiling)",
        )  # fmt: skip
        ax.plot(
            [cfg.concurrency], [r["naive"]["useful_tokens_per_s"]], "x", color=color, ms=9,
            label=f"{dtype}: naive, --max-batch-size 1",
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    ticks = sorted({*cfg.sweep, cfg.concurrency})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("concurrent clients (one text per request)")
    ax.set_ylabel("useful tokens / s")
    ax.set_title(f"{cfg.model}, standard mix, {os.cpu_count()} CPU cores")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short phases (whole run ~3 min)")
    p.add_argument("--model", default="random:base", help="model to serve and measure")
    p.add_argument(
        "--dtype", default="both", choices=[*DTYPES, "float16", "both"], help="both: f32 then bf16"
    )
    p.add_argument("--device", default="auto", help="device of the server and the ceiling")
    p.add_argument("--concurrency", type=int, default=32, help="clients in phases b and d")
    p.add_argument("--sweep", default="1,4,16,64", help="client counts for the plot")
    p.add_argument("--bulk-items", type=int, default=64, help="texts per bulk request")
    p.add_argument("--bulk-concurrency", type=int, default=4, help="bulk requests in flight")
    p.add_argument("--inputs", choices=["text", "ids"], default="text", help="what clients send")
    p.add_argument("--sequences", type=int, default=2000, help="size of the standard mix drawn")
    p.add_argument("--seed", type=int, default=0, help="workload seed (0: the standard mix)")
    p.add_argument("--duration", type=float, help="seconds per measured phase (b, d)")
    p.add_argument("--warmup", type=float, help="warm-up seconds before each phase")
    p.add_argument(
        "--profile", choices=["flamegraph", "speedscope", "raw"], default="",
        help="py-spy the server during phase b into results/profile-<dtype>-b.*",
    )  # fmt: skip
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra server flag (repeatable)"
    )
    p.add_argument(
        "--noisy-retries", type=int, help="reruns of a phase disturbed by other jobs (2; quick 0)"
    )
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    durations = Durations.quick() if args.quick else Durations()
    if args.duration:
        durations.phase_s = args.duration
        durations.bulk_s = max(args.duration, durations.bulk_s)
    if args.warmup is not None:
        durations.warmup_s = args.warmup
    sweep = sorted({int(x) for x in args.sweep.split(",") if x.strip()})
    server_args = [a for arg in args.server_arg for a in arg.split()]
    return BenchConfig(
        model=args.model,
        dtypes=list(DTYPES) if args.dtype == "both" else [args.dtype],
        device=args.device,
        quick=args.quick,
        concurrency=args.concurrency,
        sweep=sweep,
        bulk_items=args.bulk_items,
        bulk_concurrency=args.bulk_concurrency,
        inputs=args.inputs,
        sequences=args.sequences,
        seed=args.seed,
        durations=durations,
        profile=args.profile,
        retries=args.noisy_retries if args.noisy_retries is not None else (0 if args.quick else 2),
        server_args=server_args,
        out_dir=args.out_dir,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "server", "dtypes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        workload_path = Path(tmp) / "workload.json"
        wl = build_workload(cfg, workload_path)
        log.info("workload: %s, inputs as %s", describe(wl["lengths"]), cfg.inputs)
        gen = LoadGenProcess()
        try:
            gen.workload(workload_path)
            for dtype in cfg.dtypes:
                r: dict[str, Any] = run_dtype(cfg, dtype, wl, gen)
                gc.collect()  # the in-process model goes before the next dtype's is loaded
                r["ratios"], targets = ratios_and_targets(r)
                r["targets"] = [
                    (name, value, op, bound, _passes(value, op, bound))
                    for name, value, op, bound in targets
                ]
                results["dtypes"][dtype] = r
        finally:
            gen.close()
    results["config"] = asdict(cfg) | {
        "out_dir": str(cfg.out_dir),
        "workload": describe(wl["lengths"]) | {"seed": cfg.seed},
        "naive_baseline": NAIVE_METHOD,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
    }
    results["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["elapsed_s"] = time.perf_counter() - started
    all_pass = print_report(cfg, results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(results, indent=2) + "\n"
    (cfg.out_dir / f"bench-{stamp}.json").write_text(text)
    (cfg.out_dir / "latest.json").write_text(text)
    plot(cfg, results, cfg.out_dir / "throughput.png")
    print(
        f"\nwrote {cfg.out_dir / f'bench-{stamp}.json'}, latest.json and throughput.png "
        f"in {results['elapsed_s']:.0f} s; all targets {'PASS' if all_pass else 'not met'}"
    )
    return 0


def _passes(value: float | None, op: str, bound: float) -> bool | None:
    """None when the value was not measured (e.g. a sweep without 16 or 64 clients)."""
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


if __name__ == "__main__":
    sys.exit(main())
