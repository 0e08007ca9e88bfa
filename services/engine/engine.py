"""The engine alone, as a Python API: add requests, abort them, step, read outputs.

    engine = LLMEngine(EngineConfig(model_dir="..."))     # tp_size=W: W processes, same API; close() ends them
    engine.add_request("r1", prompt="Hello", params=SamplingParams(temperature=0), adapter_id="a",
                       adapter=load_peft_adapter_dir(path, engine.spec))
    while engine.has_unfinished():
        for out in engine.step(): ...

One step (asynchronous scheduling, the default): schedule -> build the batch -> launch the forward
and sampling -> wait for the PREVIOUS step's sampled ids -> update -> detokenize them, so the host
prepares each step while the device still runs the one before, and a decode reads the token the
previous step sampled straight from the device (see step()). With async_scheduling off: schedule
-> build -> launch -> detokenize the previous step's tokens -> wait for this step's -> update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from time import perf_counter

import torch

from lorafleet.formats.lora_weights import LoraWeights

from .batch import build_batch
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, decode_batch
from .in_flight import InFlightStep, SampledIdsReadback
from .lora_step import LoraStep
from .request import Request, SamplingParams
from .runtime import Runtime, build_runtime
from .sampling import sample
from .scheduler import Scheduler
from .tp.engine_runtime import build_tp_runtime

PREFETCH_AHEAD = 64  # waiting requests (queue order) whose adapters are prefetched before admission


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    index: int  # output tokens of this request before new_token_ids
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int


# The parts of one step (LLMEngine.step_seconds), in the order a synchronous step runs them.
STEP_PHASES = ("prefetch", "schedule", "build_batch", "launch", "outputs", "wait", "update")


class LLMEngine:
    def __init__(self, config: EngineConfig, build: Callable[[EngineConfig], Runtime] | None = None):
        """build: what assembles the runtime (default: runtime.build_runtime, or the tensor-parallel
        tp.engine_runtime.build_tp_runtime when tp_size > 1); tests and benchmarks pass
        build_tp_runtime to run the TP path at W = 1."""
        if build is None:
            build = build_tp_runtime if config.tp_size > 1 else build_runtime
        rt = build(config)
        self.config, self.spec, self.tokenizer = config, rt.spec, rt.tokenizer
        self.device, self.pool, self.model = rt.device, rt.pool, rt.model
        self.lora_ops = rt.lora_ops  # the eager steps' LoRA ops (LoraStep)
        self.kv, self.adapters = rt.kv, rt.adapters
        self.decode_graphs = rt.decode_graphs  # None on the CPU or when disabled
        self.graph_steps = 0  # steps replayed from decode graphs (benchmarks and metrics)
        # Seconds spent in each part of step(), summed over steps (bench/host_step.py). On CUDA,
        # "launch" is the host queueing the forward and "wait" the GPU time not hidden behind the
        # host; on the CPU, "launch" is the forward itself.
        self.step_seconds = dict.fromkeys(STEP_PHASES, 0.0)
        # Host seconds between reading a step's sampled ids and launching the next forward while no
        # other step was queued: time a GPU would sit idle waiting for the host (bench/host_step.py).
        self.device_idle_seconds = 0.0
        self.scheduler = Scheduler(rt.scheduler_config, rt.kv, rt.adapters)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.eos_ids = rt.spec.eos_token_ids or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ())
        self._close = rt.close  # tp_size > 1: stops the worker ranks (also registered with atexit)
        self._pending: list[Request] = []  # requests sampled last step, not yet detokenized (synchronous steps)
        self._in_flight: InFlightStep | None = None  # launched, sampled ids not read yet (asynchronous steps)
        self._ids_read_at: float | None = None  # when the host last read sampled ids with nothing else queued
        self._readback = SampledIdsReadback(self.device)

    def close(self) -> None:
        """Release what the engine started (tensor-parallel worker processes); idempotent."""
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        adapter_id: str | None = None,
        adapter: LoraWeights | None = None,
        arrival: float = 0.0,
    ) -> None:
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        if (adapter_id is None) != (adapter is None):
            raise ValueError("adapter_id and adapter weights go together")
        ids = list(prompt_token_ids) if prompt_token_ids is not None else self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids {bad[:3]} are outside [0, {self.spec.vocab_size})")
        params = params or SamplingParams()
        if len(ids) + params.max_tokens > self.spec.max_position:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.spec.max_position} tokens"
            )
        req = Request(request_id, ids, params, adapter_id, adapter, arrival)
        self.scheduler.add_request(req)
        if adapter_id is not None and len(self.scheduler.waiting) <= PREFETCH_AHEAD:
            self._prefetch_queue_front()  # its adapter packed now, into free pages now if there are any
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, ids, params.stop)

    def abort_request(self, request_id: str) -> bool:
        """False when unknown or already finished (a finished request's last output may still be
        pending: it is emitted by the next step)."""
        if self.scheduler.finish_request(request_id, "abort") is None:
            return False
        self._detok.pop(request_id, None)
        self._pending = [r for r in self._pending if r.request_id != request_id]  # aborted: no more output
        return True

    def has_unfinished(self) -> bool:
        # A step still in flight holds nothing to emit once the scheduler has no request: a request
        # leaves it only finished, by a read-back that emitted its last output, or by abort / stop.
        return self.scheduler.has_unfinished() or bool(self._pending)

    @property
    def scheduler_stats(self) -> dict[str, int]:
        return {
            "preemptions": self.scheduler.num_preemptions,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "adapter_loads": self.adapters.num_loads,
            "adapter_evictions": self.adapters.num_evictions,
            "free_pages": self.kv.allocator.num_free,
        }

    def _prefetch_queue_front(self, step: bool = False) -> None:
        """Packs finished in the background go to free pages, then the adapters of the next
        waiting requests are prefetched in queue order, as far as half the packed-host budget
        goes (AdapterCache.prefetch_ahead). At arrival too: prefetching every arrival's adapter
        packed more than the budget holds (S2: 64 x up to 128 MB), and the host LRU dropped
        packs before their requests were admitted, which then packed again on this thread."""
        self.adapters.poll()
        # before the lookahead reads it; `step`: only a step's call may lower it
        self.adapters.fit_host_budget(self.scheduler.adapter_demand.bytes, step)
        self.adapters.prefetch_ahead((r.adapter_id, r.adapter_weights)
                                     for r in islice(self.scheduler.waiting, PREFETCH_AHEAD) if r.adapter_id is not None)

    # --- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step. Asynchronous (the default): schedule and build this step while the previous
        one may still run on the device, launch it, then wait for the PREVIOUS step's sampled ids,
        update and detokenize them, while the device runs this one. Outputs are the previous
        step's; a request the previous step finished (EOS, max_tokens, a stop string) may have been
        scheduled in this one: that extra token is dropped (update_from_output skips finished
        requests), so what is emitted is exactly what one step at a time would emit.

        Synchronous: launch this step, detokenize the previous step's tokens while the device
        works, wait for this step's ids and update. Either way `has_unfinished` stays true until
        the last outputs are out.
        """
        marks = [perf_counter()]  # one after each phase
        # Requests deeper in the queue than PREFETCH_AHEAD at arrival get their adapters packed
        # (and loaded into free pages) as they come near admission.
        self._prefetch_queue_front(step=True)
        marks.append(perf_counter())
        sched = self.scheduler.schedule()
        marks.append(perf_counter())
        launched = None
        if not sched.empty:
            batch = build_batch(sched, self.kv, self.adapters, self.device, self._in_flight)
            marks.append(perf_counter())
            self._note_launch(marks[-1])
            launched = self._readback.launched(sched, batch.sampled, self._launch(batch))  # ids still being computed
        else:
            marks.append(marks[-1])
        marks.append(perf_counter())
        if self.config.async_scheduling:
            done, self._in_flight = self._in_flight, launched
            touched = self._read_back(done, queued=launched is not None, marks=marks)
            outputs = self._outputs(touched)  # the device runs `launched` meanwhile
            marks.append(perf_counter())
            phases = ("prefetch", "schedule", "build_batch", "launch", "wait", "update", "outputs")
        else:
            outputs = self._outputs(self._pending)  # host work overlapped with the device
            marks.append(perf_counter())
            self._pending = self._read_back(launched, queued=False, marks=marks)
            phases = STEP_PHASES
        for phase, start, end in zip(phases, marks, marks[1:]):
            self.step_seconds[phase] += end - start
        return outputs

    def _note_launch(self, now: float) -> None:
        """Count the host time since the last read-back during which the device had nothing queued."""
        if self._ids_read_at is not None and self._in_flight is None:
            self.device_idle_seconds += now - self._ids_read_at
        self._ids_read_at = None

    def _read_back(self, step: InFlightStep | None, queued: bool, marks: list[float]) -> list[Request]:
        """Wait for a launched step's sampled ids and apply them (two marks: wait, update).
        queued: another step is already queued behind it (the device is not left idle)."""
        if step is None:
            marks += [marks[-1], marks[-1]]
            return []
        sampled_ids = self._readback.read(step)
        marks.append(perf_counter())
        self._ids_read_at = None if queued else marks[-1]
        sampled = {e.request.request_id: t for e, t in zip(step.sampled, sampled_ids)}
        touched = self.scheduler.update_from_output(step.sched, sampled, self.eos_ids)
        marks.append(perf_counter())
        return touched

    def _launch(self, batch) -> torch.Tensor | None:
        """Queue the forward pass and sampling; returns the sampled ids on the device (no sync)."""
        if self.decode_graphs is not None and self.decode_graphs.can_run(batch):
            # [N, V] float32, from a replayed CUDA graph
            logits = self.decode_graphs.run(batch.input_ids, batch.positions, batch.attn, batch.lora)
            self.graph_steps += 1
        else:
            lora = None if batch.lora.empty else LoraStep.one_device(self.pool, self.adapters.tables, batch.lora,
                                                                     self.lora_ops)
            hidden = self.model.forward(batch.input_ids, batch.positions, self.pool, batch.attn, lora)
            logits = self.model.logits(hidden[batch.logits_index]) if batch.sampled else None  # [N, V] float32
        return None if logits is None else sample(logits, batch.sampling)

    def _outputs(self, touched: list[Request]) -> list[RequestOutput]:
        """Detokenize every request's new token (one batched tokenizer call), apply stop strings."""
        touched = [r for r in touched if r.request_id in self._detok]  # aborted since: nothing to say
        detoks = [self._detok[r.request_id] for r in touched]
        windows = [d.push(r.output_token_ids[-1]) for d, r in zip(detoks, touched)]
        live = [i for i, w in enumerate(windows) if w is not None]
        texts = decode_batch(self.tokenizer, [part for i in live for part in windows[i]])
        for k, i in enumerate(live):
            detoks[i].accept(texts[2 * k], texts[2 * k + 1])
        outputs = []
        for req, detok in zip(touched, detoks):
            if detok.stopped and not req.finished:
                self.scheduler.finish_request(req.request_id, "stop")
            final = req.finished
            if final:
                del self._detok[req.request_id]
            outputs.append(RequestOutput(
                request_id=req.request_id,
                new_token_ids=[req.output_token_ids[-1]],
                new_text=detok.take_delta(final),
                index=len(req.output_token_ids) - 1,
                finished=final,
                finish_reason=req.finish_reason,
                num_prompt_tokens=req.num_prompt_tokens,
                num_output_tokens=len(req.output_token_ids),
            ))
        return outputs

    # --- convenience ---------------------------------------------------------------------
    def run_to_completion(self) -> dict[str, list[RequestOutput]]:
        """Step until every request is finished; outputs grouped by request id."""
        results: dict[str, list[RequestOutput]] = {}
        while self.has_unfinished():
            for out in self.step():
                results.setdefault(out.request_id, []).append(out)
        return results


def generated_ids(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def generated_text(outputs: list[RequestOutput]) -> str:
    return "".join(o.new_text for o in outputs)


__all__ = ["LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams", "generated_ids", "generated_text"]
