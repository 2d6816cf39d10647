"""What each RPC does, free of gRPC types: validation, tokenization off the event loop, items.

The transport (servicer.py) turns protobuf messages into the plain values these methods take and
their results back into messages; errors raised here are `errors.ServiceError`s whose class picks
the status code and whose text tells the caller what to change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import __version__
from .batch import (
    Classification,
    ClassifySpec,
    Features,
    FeatureSpec,
    FillMask,
    FillMaskSpec,
    Item,
    Output,
    Spec,
)
from .config import ServerConfig
from .errors import (
    Forbidden,
    InvalidInput,
    NotFound,
    NotReady,
    ServiceError,
    TooLarge,
    Unsupported,
)
from .executor import Executor, injected_faults
from .hub import RobertaHub
from .metrics import Metrics
from .model import NoLMHeadError
from .scheduler import BULK, INTERACTIVE, DeadlineExceeded, Scheduler, SchedulerConfig, Ticket
from .tokenize_workers import Input, Prepared, Preparer, TokenizeWorkers
from .tokenizer import Encoding

log = logging.getLogger(__name__)

POOLINGS = ("none", "cls", "mean")
OUT_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Usage:
    tokens: int = 0
    truncated: int = 0
    tokenize_seconds: float = 0.0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0


def item_error(out: Exception) -> Exception:
    """The error a caller sees for an item whose computation ended in `out`."""
    if isinstance(out, (ServiceError, DeadlineExceeded)):
        return out
    if isinstance(out, NoLMHeadError):
        return Unsupported(str(out))
    if isinstance(out, KeyError):
        return NotFound(str(out.args[0]))
    return RuntimeError(f"inference failed: {out!r}")


class RobertaService:
    """The model's operations for concurrent callers, batched through one scheduler."""

    def __init__(self, hub: RobertaHub, cfg: ServerConfig, metrics: Metrics):
        self.hub = hub
        self.cfg = cfg
        self.metrics = metrics
        self.tokenizer = hub.tokenizer
        self.mcfg = hub.model.cfg
        self.executor = Executor(hub, cfg.cuda_graph_tokens, cfg.max_batch_size)
        if cfg.fault_oom_tokens or cfg.fault_poison_id >= 0:
            log.warning("fault injection is on: this server is for testing only")
            self.executor.fault_injector = injected_faults(
                cfg.fault_oom_tokens, cfg.fault_poison_id
            )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_tokens=cfg.max_batch_tokens,
                max_batch_size=cfg.max_batch_size,
                max_queue_delay_ms=cfg.max_queue_delay_ms,
                refill_wait_ms=cfg.refill_wait_ms,
                bulk_batch_tokens=cfg.bulk_batch_tokens,
                lookahead=cfg.lookahead,
                pipeline_depth=2 if hub.device.type == "cuda" else 1,
                max_queued_tokens=cfg.max_queued_tokens,
            ),
            self.executor.submit,
            self.executor.batch_cost,
            metrics,
        )
        self.workers = TokenizeWorkers(
            Preparer(hub.tokenizer, self.mcfg.vocab_size, self.mcfg.max_positions),
            cfg.tokenizer_threads,
            cfg.tokenizer_processes,
        )
        self.accepting = True
        self.closing = asyncio.Event()  # set with accepting = False: streams stop reading

    async def start(self) -> None:
        await self.workers.start()
        if self.executor.graphs is not None:
            await asyncio.wrap_future(self.executor.call(self.executor.graphs.capture))
        self.scheduler.start()
        await self._warm_up()

    async def _warm_up(self) -> None:
        """Run each kind of work once so the first real request pays no start-up cost."""
        t0 = time.perf_counter()
        # At bulk priority: the warm-up is no interactive caller, and as one it made the scheduler
        # cap stream batches at --bulk-batch-tokens for the first seconds of serving.
        await self.extract_features(
            ["Hello world!", "warm " * 60], (), False, "cls", "float32", priority=BULK
        )
        if self.hub.model.heads:
            await self.classify(next(iter(self.hub.model.heads)), ["Hello world!"], priority=BULK)
        if self.hub.model.lm_head is not None:
            await self.fill_mask(["Hello <mask>!"], 5, priority=BULK)
        log.info("warm-up done", extra={"seconds": round(time.perf_counter() - t0, 3)})

    def stop_accepting(self) -> None:
        """Refuse new work from now on; streams stop reading once their current message is in."""
        self.accepting = False
        self.closing.set()

    async def close(self, grace: float) -> None:
        """Finish queued work (up to `grace` seconds), then stop the scheduler and the device."""
        self.stop_accepting()
        try:
            await asyncio.wait_for(self.scheduler.wait_idle(), grace)
        except TimeoutError:
            log.warning("shutdown grace of %.1fs passed with work still queued", grace)
        await self.scheduler.stop()
        self.executor.shutdown()
        self.workers.shutdown()

    # ---- validation and tokenization

    def _check_request(self, n: int, what: str = "inputs") -> None:
        if not self.accepting:
            raise NotReady("server is shutting down")
        if n == 0:
            raise InvalidInput(f"{what} is empty: send at least one item")
        if n > self.cfg.max_items_per_request:
            raise TooLarge(
                f"{n} {what} in one request; the limit is {self.cfg.max_items_per_request}: "
                "split the request"
            )

    async def _prepare(self, inputs: Sequence[Input], truncate: bool, no_sep: bool) -> Prepared:
        self._check_request(len(inputs))
        prepared = await self.workers.run(inputs, "prepare", inputs, truncate, no_sep)
        self.metrics.tokenize_seconds.observe(prepared.seconds)
        return prepared

    async def _run(
        self,
        ids: list[list[int]],
        specs: Sequence[Spec],
        deadline: float | None,
        priority: int = INTERACTIVE,
    ) -> Ticket:
        items = [Item(seq, spec) for seq, spec in zip(ids, specs, strict=True)]
        ticket = await self.scheduler.run_items(items, priority, deadline)
        for out in ticket.outputs:
            if isinstance(out, Exception):
                raise item_error(out) from out
        return ticket

    # ---- streams: items answered one by one, after the interactive requests

    async def prepare_stream(
        self, inputs: Sequence[tuple[str, Input]], truncate: bool, no_sep: bool
    ) -> list[tuple[list[int], bool] | ServiceError]:
        """Tokenize stream items; a bad item gets its error in place of its ids."""
        if not self.accepting:
            raise NotReady("server is shutting down")
        t0 = time.perf_counter()
        sized = [x for _, x in inputs]
        prepared = await self.workers.run(sized, "prepare_items", inputs, truncate, no_sep)
        self.metrics.tokenize_seconds.observe(time.perf_counter() - t0)
        return prepared

    def submit_stream(
        self,
        ids: list[list[int]],
        specs: Sequence[Spec],
        on_output: Callable[[int, Output | Exception], None],
        deadline: float | None,
    ) -> Ticket:
        """Queue stream items at bulk priority; `on_output(index, output)` gets each result.

        Streams are not refused when the queue is long: their flow-control window is what bounds
        them, so they wait instead.
        """
        if not self.accepting:
            raise NotReady("server is shutting down")
        items = [Item(seq, spec) for seq, spec in zip(ids, specs, strict=True)]
        future = asyncio.get_running_loop().create_future()
        ticket = Ticket(len(items), future, BULK, deadline, on_output=on_output)
        self.scheduler.enqueue(items, ticket, admit=False)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop the ticket's items that have not run yet (its caller went away)."""
        self.scheduler.cancel(ticket)

    @staticmethod
    def _usage(prepared: Prepared, ticket: Ticket) -> Usage:
        return Usage(
            tokens=sum(len(s) for s in prepared.ids),
            truncated=sum(prepared.truncated),
            tokenize_seconds=prepared.seconds,
            queue_seconds=ticket.queue_seconds,
            inference_seconds=ticket.inference_seconds,
        )

    # ---- operations

    async def tokenize(
        self, inputs: Sequence[Input], truncate: bool = False, no_separator: bool = False
    ) -> tuple[list[Encoding], Usage]:
        self._check_request(len(inputs))
        t0 = time.perf_counter()
        encs = await self.workers.run(inputs, "encode_all", inputs, truncate, no_separator)
        usage = Usage(
            tokens=sum(len(e.ids) for e in encs),
            truncated=sum(e.truncated for e in encs),
            tokenize_seconds=time.perf_counter() - t0,
        )
        return encs, usage

    def decode(self, sequences: Sequence[Sequence[int]]) -> list[list[str]]:
        self._check_request(len(sequences), "sequences")
        out = []
        for i, seq in enumerate(sequences):
            try:
                text = self.tokenizer.decode(list(seq))
            except ValueError as exc:
                raise InvalidInput(f"sequences[{i}]: {exc}") from exc
            out.append([text] if isinstance(text, str) else text)
        return out

    def resolve_layers(self, layers: Sequence[int], all_layers: bool) -> tuple[int, ...]:
        last = self.mcfg.num_layers
        if all_layers:
            return tuple(range(last + 1))
        if not layers:
            return (last,)
        out = []
        for layer in layers:
            if not -(last + 1) <= layer <= last:
                raise InvalidInput(
                    f"layer {layer} does not exist: the model has layers 0..{last} "
                    f"(0 = embeddings; negative counts from the end)"
                )
            out.append(layer % (last + 1))
        return tuple(out)

    async def extract_features(
        self,
        inputs: Sequence[Input],
        layers: Sequence[int] = (),
        all_layers: bool = False,
        pooling: str = "none",
        dtype: str = "float32",
        truncate: bool = False,
        no_separator: bool = False,
        deadline: float | None = None,
        priority: int = INTERACTIVE,
    ) -> tuple[list[tuple[Features, int, bool]], Usage]:
        """Per input: (features, its number of tokens, whether it was truncated)."""
        spec = self.feature_spec(layers, all_layers, pooling, dtype)
        prepared = await self._prepare(inputs, truncate, no_separator)
        self.check_response_size(prepared.ids, spec)
        ticket = await self._run(prepared.ids, [spec] * len(prepared.ids), deadline, priority)
        lengths = [len(seq) for seq in prepared.ids]
        results = list(zip(ticket.outputs, lengths, prepared.truncated, strict=True))
        return results, self._usage(prepared, ticket)  # type: ignore[return-value]

    def feature_spec(
        self, layers: Sequence[int], all_layers: bool, pooling: str, dtype: str
    ) -> FeatureSpec:
        if pooling not in POOLINGS:
            raise InvalidInput(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        if dtype not in OUT_DTYPES:
            raise InvalidInput(f"unknown dtype {dtype!r}; use one of {', '.join(OUT_DTYPES)}")
        return FeatureSpec(self.resolve_layers(layers, all_layers), pooling, dtype)

    def check_response_size(self, ids: list[list[int]], spec: FeatureSpec) -> None:
        per_vec = len(spec.layers) * self.mcfg.hidden_size * OUT_DTYPES[spec.dtype]
        vectors = sum(len(s) for s in ids) if spec.pooling == "none" else len(ids)
        size = vectors * per_vec
        if size > self.cfg.max_message_bytes:
            raise TooLarge(
                f"the response would be {size} bytes, over the {self.cfg.max_message_bytes}-byte "
                "message limit: send fewer items, fewer layers, pool, or ask for float16"
            )

    def check_head(self, head: str) -> None:
        if head not in self.hub.model.heads:
            known = ", ".join(sorted(self.hub.model.heads)) or "none"
            raise NotFound(f"unknown classification head {head!r} (registered: {known})")

    async def classify(
        self,
        head: str,
        inputs: Sequence[Input],
        truncate: bool = False,
        no_separator: bool = False,
        deadline: float | None = None,
        priority: int = INTERACTIVE,
    ) -> tuple[list[tuple[np.ndarray, np.ndarray, int, str, bool]], Usage]:
        """Per input: (logits, log-probabilities, argmax, label name, truncated)."""
        self.check_head(head)
        prepared = await self._prepare(inputs, truncate, no_separator)
        spec = ClassifySpec(head)
        ticket = await self._run(prepared.ids, [spec] * len(prepared.ids), deadline, priority)
        labels = self.hub.model.head_labels[head]
        outs = self.classifications(ticket.outputs, labels)  # type: ignore[arg-type]
        results = [(*out, cut) for out, cut in zip(outs, prepared.truncated, strict=True)]
        return results, self._usage(prepared, ticket)

    @staticmethod
    def classifications(
        outs: Sequence[Classification], labels: list[str]
    ) -> list[tuple[np.ndarray, np.ndarray, int, str]]:
        """Per output: logits, log-probabilities, argmax and its label. In one array for all:
        per item, numpy's calls cost 12% of a bulk server's event loop."""
        logits = np.stack([out.logits for out in outs]).astype(np.float32, copy=False)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return [
            (logits[j], log_probs[j], i, labels[i] if i < len(labels) else str(i))
            for j, i in enumerate(logits.argmax(axis=1).tolist())
        ]

    async def fill_mask(
        self,
        texts: Sequence[str],
        topk: int = 5,
        deadline: float | None = None,
        priority: int = INTERACTIVE,
    ) -> tuple[list[FillMask], Usage]:
        self._check_request(len(texts), "texts")
        if self.hub.model.lm_head is None:
            raise Unsupported("this checkpoint has no masked-LM head, so fill-mask is unavailable")
        topk = topk or 5
        if not 1 <= topk <= self.mcfg.vocab_size:
            raise InvalidInput(f"topk must be in [1, {self.mcfg.vocab_size}], got {topk}")

        prepared = await self.workers.run(texts, "encode_masked", list(texts))
        specs = [
            FillMaskSpec(seq.index(self.tokenizer.mask), topk, text)
            for seq, text in zip(prepared.ids, texts, strict=True)
        ]
        ticket = await self._run(prepared.ids, specs, deadline, priority)
        return ticket.outputs, self._usage(prepared, ticket)  # type: ignore[return-value]

    async def register_head(
        self,
        name: str,
        num_classes: int,
        labels: Sequence[str],
        check_fits: Callable[[list[str]], None] | None = None,
    ) -> tuple[str, int, list[str]]:
        """Add or replace a head; `check_fits(labels)` may refuse it once it is validated."""
        if not self.cfg.allow_register_head:
            raise Forbidden("registering classification heads is switched off on this server")
        if not name or not name.isprintable() or len(name) > 128:
            raise InvalidInput("head name must be 1-128 printable characters")
        if not 1 <= num_classes <= 65536:
            raise InvalidInput(f"num_classes must be in [1, 65536], got {num_classes}")
        if labels and len(labels) != num_classes:
            raise InvalidInput(f"{len(labels)} labels given for {num_classes} classes")
        if check_fits is not None:
            check_fits(list(labels) or [str(i) for i in range(num_classes)])
        model = self.hub.model

        def register() -> None:
            model.register_classification_head(name, num_classes, labels=list(labels) or None)

        # On the device thread, between batches: no batch sees a half-registered head.
        await asyncio.wrap_future(self.executor.call(register))
        log.info("registered classification head", extra={"head": name, "classes": num_classes})
        return name, num_classes, model.head_labels[name]

    def heads(self) -> list[tuple[str, int, list[str]]]:
        model = self.hub.model
        return [
            (name, model.heads[name].num_classes, model.head_labels[name])
            for name in sorted(model.heads)
        ]

    def model_info(self) -> dict:
        cfg = self.mcfg
        return {
            "name": self.hub.name,
            "source": self.hub.source,
            "untrained": self.hub.source.startswith("random:"),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "ffn_size": cfg.ffn_size,
            "max_positions": cfg.max_positions,
            "dtype": str(self.hub.dtype).replace("torch.", ""),
            "device": str(self.hub.device),
            "server_version": __version__,
        }
