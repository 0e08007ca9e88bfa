"""The paper's figures from per-request times: throughput, first-token latency, SLO attainment."""

from __future__ import annotations

import numpy as np

SLO_FIRST_TOKEN_S = 6.0


class Timeline:
    """Per-request times of a run on one clock: arrival, first token, finish (+ output tokens)."""

    def __init__(self) -> None:
        self.arrival: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.finish: dict[str, float] = {}
        self.out_tokens: dict[str, int] = {}

    def record(self, outputs, t: float) -> None:
        """Engine RequestOutputs seen at time t."""
        for o in outputs:
            self.first.setdefault(o.request_id, t)
            if o.finished:
                self.finish[o.request_id], self.out_tokens[o.request_id] = t, o.num_output_tokens

    def summary(self) -> dict:
        return summarize(self.arrival, self.first, self.finish, self.out_tokens)


def summarize(arrival: dict[str, float], first: dict[str, float], finish: dict[str, float],
              out_tokens: dict[str, int]) -> dict:
    """Times in seconds on one clock; throughput over first arrival -> last completion."""
    done = [k for k in finish if k in first]
    ttft = np.array([first[k] - arrival[k] for k in done])
    e2e = np.array([finish[k] - arrival[k] for k in done])
    span = max(finish.values()) - min(arrival.values())
    return {
        "requests": len(done), "span_s": span,
        "throughput_req_s": len(done) / span, "throughput_tok_s": sum(out_tokens[k] for k in done) / span,
        "ttft_mean_s": float(ttft.mean()), "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p90_s": float(np.percentile(ttft, 90)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "slo_6s": float((ttft < SLO_FIRST_TOKEN_S).mean()),
        "e2e_p50_s": float(np.percentile(e2e, 50)), "e2e_p99_s": float(np.percentile(e2e, 99)),
    }
