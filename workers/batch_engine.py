"""Continuous batching: many generation jobs share each forward pass of one model.

A job's thread hands its sequence to the engine and waits. The engine thread loops: admit
waiting sequences (their prompts prefilled together, unpadded, into slots of the batch's
KV cache: workers/slot_cache.py), run one decode step for every row, pick each row's token
with that job's own sampler, and retire rows that finished, at once, so a short job never
waits for a long one and a waiting job joins at the next step. Rows in a batch share one
adapter (or none); a job for another adapter waits until the rows ahead of it drain (first
come, first served).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import DynamicCache

from workers.adapter_cache import AdapterUnavailable, has_adapter_files
from workers.generation import GenerationError, GenerationOutput, finish_text, prompt_ids_within_context
from workers.greedy_screen import GreedyScreen
from workers.model_loader import LoadedModel
from workers.row_invariance import invariant_rows
from workers.sampling import Sampler
from workers.slot_cache import NO_MASKS, SLOT_ATTENTION, PrefillSegments, SlotCache
from workers.stopping import stop_string_seen
from workers.token_publisher import StepWrites

log = structlog.get_logger(__name__)

# The most prompt tokens packed into one prefill pass on a GPU (a longer prompt goes alone).
PREFILL_TOKENS = 8192

@dataclass
class Sequence:
    """One job's generation while it is in the engine."""

    prompt_ids: list[int]
    params: dict[str, Any]
    sampler: Sampler
    should_stop: Callable[[], bool] | None
    on_tokens: Callable[[list[int]], None] | None
    adapter_id: str | None
    adapter_path: Path | None
    tokens: list[int] = field(default_factory=list)
    gpu_seconds: float = 0.0  # this job's share of the forward passes it took part in
    submitted: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    output: GenerationOutput | None = None
    error: BaseException | None = None

    def result(self) -> GenerationOutput:
        """Wait until the engine is done with this sequence; return its output or raise its error."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.output

    def history(self) -> torch.Tensor:
        """Return the prompt and the tokens so far (what a repetition penalty looks at)."""
        return torch.tensor(self.prompt_ids + self.tokens)


class BatchEngine:
    """Runs up to `max_batch` sequences of one model together, one token per row per step."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int,
        adapters=None,
        static: bool = False,
        cpu_threads=None,
        step_writes: StepWrites | None = None,
        greedy_screen: GreedyScreen | None = None,
        exact_attention: bool | None = None,
    ):
        self.loaded = loaded
        self.max_batch = max_batch
        # Static batching (a benchmark baseline): admit only into an empty batch.
        self.static = static
        self.adapters = adapters  # the worker's AdapterCache; None runs the bare model
        self.cpu_threads = cpu_threads  # a CPU worker's CpuThreads; applied in the thread that steps
        # Token-stream writes that jobs' `on_tokens` queue during a step; sent before any job is handed back.
        self.step_writes = step_writes
        # Picks greedy rows' tokens without the float32 output layer (base-model batches only).
        self.greedy_screen = greedy_screen
        # On the CPU a row's numbers must not depend on its batch (a job's greedy tokens are the
        # same batched or alone): attention runs per row over its own columns and, in bf16, every
        # step runs all slots so that no matrix product changes shape. A GPU batches attention.
        cpu = loaded.device.type == "cpu"
        fixed_rows = cpu and loaded.dtype == torch.bfloat16
        # Without fixed rows (float32), steps and the output layer run at least two rows: a
        # one-row float32 product gives other bits on the CPU than the same row among several.
        self.batch = SlotCache(
            max_batch,
            exact=cpu if exact_attention is None else exact_attention,
            fixed_rows=fixed_rows,
            min_rows=2 if cpu and not fixed_rows else 1,
        )
        loaded.model.set_attn_implementation(SLOT_ATTENTION)  # plain SDPA except in the engine's passes
        self._prefill_tokens: int | None = None  # see prefill_tokens()
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.group: str | None = None  # adapter of the rows now in the batch
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(
        self,
        params: dict[str, Any],
        *,
        should_stop: Callable[[], bool] | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
        adapter_id: str | None = None,
        adapter_path: Path | None = None,
    ) -> Sequence:
        """Queue one job's generation; a bad prompt raises GenerationError here, in the caller."""
        sequence = Sequence(
            prompt_ids=prompt_ids_within_context(self.loaded, params),
            params=params,
            sampler=Sampler(params, self.loaded.device),
            should_stop=should_stop,
            on_tokens=on_tokens,
            adapter_id=adapter_id,
            adapter_path=adapter_path,
        )
        with self._wake:
            self.waiting.append(sequence)
            self._wake.notify()
        return sequence

    def generate(self, params: dict[str, Any], **kwargs) -> GenerationOutput:
        """Run one job's generation with whatever else is running, and wait for its output."""
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
                self._thread.start()
        return self.submit(params, **kwargs).result()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.active and not self.waiting:
                    self._wake.wait()
            self.step()

    def step(self) -> None:
        """One scheduling round: admit, decode one token for every row, retire finished rows."""
        joining: list[Sequence] = []
        try:
            if self.cpu_threads is not None:
                self.cpu_threads.apply()
            self._drop_stopped_waiting()
            joining = self._admit()  # set first: a round that raises fails what it admitted
            joining = self._without_removed_adapters(joining)
            if not joining and not self.active:
                return  # all it admitted failed: the next round admits the next group
            with torch.inference_mode(), self._model_for_group(joining) as model:
                if joining:
                    self._prefill(model, joining)
                self._retire()
                if self.active:
                    self._decode(model)
            self._retire()
        except Exception as exc:  # noqa: BLE001 - fail these jobs, keep the engine serving
            # All of the round is in here: an error that ended the engine's thread left every
            # job thread waiting on its sequence for good, renewing its lease all the while.
            self._fail_round(exc, joining)

    def _fail_round(self, exc: Exception, joining: list[Sequence]) -> None:
        """Fail the jobs of a round that raised; if none was in it, the waiting ones (else the
        next round would raise again at once, and again)."""
        log.exception("batch_step_failed", rows=len(self.active))
        failing = self.active + joining
        if not failing:
            with self._wake:
                failing, self.waiting = list(self.waiting), deque()
        for sequence in failing:
            if not sequence.done.is_set():
                self._complete(sequence, error=_as_generation_error(exc))
        self.active = []
        self.batch.keep([])

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences, oldest first, while there is room and they share the batch's adapter."""
        joining: list[Sequence] = []
        with self._wake:
            if self.static and self.active:
                return joining
            if not self.active and self.waiting:
                self.group = self.waiting[0].adapter_id
            while (
                self.waiting
                and len(self.active) + len(joining) < self.max_batch
                and self.waiting[0].adapter_id == self.group
            ):
                joining.append(self.waiting.popleft())
        return joining

    def _without_removed_adapters(self, joining: list[Sequence]) -> list[Sequence]:
        """Fail the joining sequences whose adapter's files are gone (deleted after their job was
        claimed); return the others. An adapter still in memory would have run them all the same."""
        kept = []
        for sequence in joining:
            if sequence.adapter_id is None or has_adapter_files(sequence.adapter_path):
                kept.append(sequence)
            else:
                gone = AdapterUnavailable.files_missing(sequence.adapter_id)
                self._complete(sequence, error=_as_generation_error(gone))
        return kept

    def _drop_stopped_waiting(self) -> None:
        """Hand back, unrun, waiting sequences whose job was cancelled or stopped: a job waiting
        for the batch's adapter to change must not wait for the rows ahead to drain to stop."""
        with self._wake:
            stopped = [s for s in self.waiting if s.should_stop is not None and s.should_stop()]
            for sequence in stopped:
                self.waiting.remove(sequence)
        for sequence in stopped:
            self._complete(sequence)

    def _model_for_group(self, joining: list[Sequence]):
        """Return a context giving the model with the batch's adapter active (or none)."""
        if self.adapters is None:
            return nullcontext(self.loaded)
        path = next((s.adapter_path for s in self.active + joining if s.adapter_id == self.group), None)
        return self.adapters.applied(self.loaded, self.group, path)

    def _prefill(self, loaded: LoadedModel, joining: list[Sequence]) -> None:
        """Prefill new sequences' prompts (packed, unpadded), add them as rows, and pick their first tokens."""
        started = time.monotonic()
        prefilled, hidden = [], []
        for pack in _packs(joining, self.prefill_tokens() if self.group is None else 1):
            lengths = [len(sequence.prompt_ids) for sequence in pack]
            starts = [sum(lengths[:index]) for index in range(len(pack))]
            try:
                prompt_cache = DynamicCache()
                states = self._prefill_pass(loaded, pack, starts, lengths, prompt_cache)
            except Exception as exc:  # noqa: BLE001 - these prompts failed; the batch goes on
                log.exception("prefill_failed", prompts=len(pack), prompt_tokens=sum(lengths))
                for sequence in pack:
                    self._complete(sequence, error=_as_generation_error(exc))
                continue
            for sequence, start, length in zip(pack, starts, lengths):
                self.batch.add(prompt_cache, start, length)
                prefilled.append(sequence)
                hidden.append(states[start + length - 1])
        if not prefilled:
            return
        rows = torch.stack(hidden)
        if self.batch.fixed_rows:  # the output layer always sees as many rows as a decode step
            rows = torch.nn.functional.pad(rows, (0, 0, 0, self.batch.slots - len(prefilled)))
        tokens = self._pick(loaded, prefilled, rows, list(range(len(prefilled))))
        share = (time.monotonic() - started) / len(prefilled)
        for sequence, token in zip(prefilled, tokens):
            sequence.gpu_seconds += share
            self.active.append(sequence)
            self._append(sequence, token)

    def prefill_tokens(self) -> int:
        """Return how many prompt tokens one prefill pass packs: on the CPU only as many as its matrix
        products keep each row's bits at (workers/row_invariance.py); adapters' batches never pack.

        Measured on first use, in the thread that steps, not where the engine is created: on the
        CPU, another thread that runs multi-threaded torch work keeps an OpenMP team of its own
        while it lives, and the engine's steps then ran ~20% slower on 2 cores (likely because
        OpenMP stops spinning between parallel regions when it has more threads than cores;
        bench/openmp_teams.py).
        """
        if self._prefill_tokens is None:
            head = self.loaded.model.get_output_embeddings()
            self._prefill_tokens = invariant_rows(self.loaded.model, skip=head) if self.batch.exact else PREFILL_TOKENS
        return self._prefill_tokens

    def _prefill_pass(
        self, loaded: LoadedModel, pack: list[Sequence], starts: list[int], lengths: list[int], cache: DynamicCache
    ) -> torch.Tensor:
        """Run packed prompts through the decoder in one pass (each attends only to its own tokens) into
        `cache`; return the final hidden state of every prompt token."""
        device = self.loaded.device
        ids = torch.tensor([[token for sequence in pack for token in sequence.prompt_ids]], device=device)
        positions = torch.cat([torch.arange(length, device=device) for length in lengths])[None]
        return loaded.model.get_decoder()(
            input_ids=ids,
            position_ids=positions,
            attention_mask=dict(NO_MASKS),
            cache=cache,
            use_cache=True,
            prefill_segments=PrefillSegments(starts, lengths),
        ).last_hidden_state[0]

    def _decode(self, loaded: LoadedModel) -> None:
        """Feed every row its newest token and pick the next one."""
        started = time.monotonic()
        newest = {slot: s.tokens[-1] for slot, s in zip(self.batch.row_slots, self.active)}
        pad = self.loaded.tokenizer.pad_token_id or 0
        ids = [[newest.get(slot, pad)] for slot in self.batch.forward_slots()]
        inputs = self.batch.step_inputs()
        decoder = loaded.model.get_decoder()
        hidden = decoder(input_ids=torch.tensor(ids, device=self.loaded.device), use_cache=True, **inputs)
        at = [self.batch.forward_row(row) for row in range(len(self.active))]
        tokens = self._pick(loaded, self.active, hidden.last_hidden_state[:, -1], at)
        for sequence, token in zip(self.active, tokens):
            self._append(sequence, token)
        share = (time.monotonic() - started) / len(self.active)
        for sequence in self.active:
            sequence.gpu_seconds += share

    def _pick(self, loaded: LoadedModel, rows: list[Sequence], hidden: torch.Tensor, at: list[int]) -> list[int]:
        """Pick each row's next token with its own sampler; row i's final hidden state is hidden[at[i]]."""
        screen = self.greedy_screen if self.group is None else None
        tokens: dict[int, int] = {}
        if screen is not None:  # greedy rows without the float32 output layer
            plain = [i for i, s in enumerate(rows) if s.sampler.plain_greedy]
            tokens = dict(zip(plain, screen.pick(hidden[[at[i] for i in plain]]))) if plain else {}
        rest = [i for i in range(len(rows)) if i not in tokens]
        if not rest:
            return [tokens[i] for i in range(len(rows))]
        if screen is None:  # every forward row, so the output layer's shape does not change
            logits, logit_row = _output_logits(loaded.model, hidden, self.batch.min_rows), at
        else:  # only the rows that sample or penalise need every logit
            logits = _output_logits(loaded.model, hidden[[at[i] for i in rest]], self.batch.min_rows)
            logit_row = {i: k for k, i in enumerate(rest)}
        # One batched max serves most rows (its index is the first largest, as argmax; 4x faster in bf16).
        greedy = logits.max(dim=-1).indices.tolist()
        for i in rest:
            sequence, row = rows[i], logit_row[i]
            plain = sequence.sampler.plain_greedy
            tokens[i] = greedy[row] if plain else sequence.sampler.pick(logits[row], sequence.history())
        return [tokens[i] for i in range(len(rows))]

    def _append(self, sequence: Sequence, token: int) -> None:
        sequence.tokens.append(token)
        if sequence.on_tokens is not None:
            sequence.on_tokens(sequence.tokens)

    def _retire(self) -> None:
        """Finish every row that is done and drop it from the batch."""
        self._flush_writes()
        keep = []
        for row, sequence in enumerate(self.active):
            if self._finished(sequence):
                self._complete(sequence)
            else:
                keep.append(row)
        if len(keep) < len(self.active):
            self.active = [self.active[row] for row in keep]
            self.batch.keep(keep)

    def _finished(self, sequence: Sequence) -> bool:
        tokens, params = sequence.tokens, sequence.params
        return bool(
            (tokens and tokens[-1] in self.loaded.eos_token_ids)
            or len(tokens) >= params["max_new_tokens"]
            or (params.get("stop") and stop_string_seen(self.loaded.tokenizer, tokens, params["stop"]))
            or (sequence.should_stop is not None and sequence.should_stop())
        )

    def _complete(self, sequence: Sequence, error: BaseException | None = None) -> None:
        """Hand a sequence's output (or error) back to the job thread waiting for it."""
        self._flush_writes()  # its thread writes the stream's end next; earlier writes go first
        if error is None:
            text, reason = finish_text(self.loaded, sequence.tokens, sequence.params)
            sequence.output = GenerationOutput(
                text=text,
                finish_reason=reason,
                token_ids=list(sequence.tokens),
                # A sequence that never joined the batch did not read its prompt.
                prompt_tokens=len(sequence.prompt_ids) if sequence.tokens else 0,
                seconds=time.monotonic() - sequence.submitted,
                gpu_seconds=sequence.gpu_seconds,
            )
        if isinstance(error, GenerationError):
            # The tokens it produced before its round failed are charged, as a timeout's are.
            error = GenerationError(error.code, error.message, usage={
                "prompt_tokens": len(sequence.prompt_ids) if sequence.tokens else 0,
                "completion_tokens": len(sequence.tokens),
                "gpu_seconds": round(sequence.gpu_seconds, 4),
            })
        sequence.error = error
        sequence.done.set()


    def _flush_writes(self) -> None:
        if self.step_writes is not None:
            self.step_writes.flush()


def _packs(joining: list[Sequence], tokens: int) -> list[list[Sequence]]:
    """Group joining sequences, in order, into prefill passes of at most `tokens` prompt tokens
    (a longer prompt goes alone)."""
    packs: list[list[Sequence]] = []
    for sequence in joining:
        if packs and sum(len(s.prompt_ids) for s in packs[-1]) + len(sequence.prompt_ids) <= tokens:
            packs[-1].append(sequence)
        else:
            packs.append([sequence])
    return packs


def _output_logits(model: torch.nn.Module, hidden: torch.Tensor, min_rows: int = 1) -> torch.Tensor:
    """Return a causal LM's logits for final hidden states: what its forward does after the layers,
    on at least `min_rows` rows (zero rows fill in, and their logits are dropped)."""
    rows = hidden.shape[0]
    logits = model.lm_head(torch.nn.functional.pad(hidden, (0, 0, 0, max(0, min_rows - rows))))[:rows]
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def generate_alone(loaded: LoadedModel, params: dict[str, Any], **kwargs) -> GenerationOutput:
    """Run one job's generation in this thread (tests, benchmarks, one-off use)."""
    engine = BatchEngine(loaded, max_batch=1)
    sequence = engine.submit(params, **kwargs)
    while not sequence.done.is_set():
        engine.step()
    return sequence.result()


def _as_generation_error(exc: Exception) -> GenerationError:
    if isinstance(exc, GenerationError):
        return exc
    if isinstance(exc, AdapterUnavailable):
        return GenerationError("adapter_unavailable", str(exc))
    return GenerationError("internal_error", f"{exc.__class__.__name__}: {exc}")
