"""Sampling parameters and the engine-side state of one request."""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field

from lorafleet.formats.lora_weights import LoraWeights

_INT32_LIMIT = 1 << 31


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < _INT32_LIMIT:  # staged as int64 per step: an unbounded int overflows it
            raise ValueError(f"top_k must be in [0, {_INT32_LIMIT}), got {self.top_k}")
        if self.max_tokens >= _INT32_LIMIT:
            raise ValueError(f"max_tokens must be < {_INT32_LIMIT}, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def default_seed(request_id: str) -> int:
    """A request without a seed samples from one derived from its id: a redelivered request
    (same id) then regenerates the same tokens, so replies can be de-duplicated by index."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None
    adapter_weights: LoraWeights | None = None
    arrival: float = 0.0
    # --- state owned by the scheduler ---
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the pool, or being written by a step already launched
    # Tokens sampled by a step already launched whose values the host does not know yet (0 or 1:
    # the engine reads a step's tokens before it schedules the step after next). They count in
    # num_tokens; the next step reads such a token's value on the device (asynchronous scheduling).
    num_pending: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.seed = self.params.seed if self.params.seed is not None else default_seed(self.request_id)

    @property
    def num_tokens(self) -> int:
        return self.num_known_tokens + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values the host knows: prompt + outputs read back (num_tokens less pending)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, known or pending (the index of the next one to draw)."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
