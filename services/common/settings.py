"""Every environment variable lorafleet reads, in one place, under the ``LORAFLEET_`` prefix.

Each variable is declared once below with its type, default and meaning. Services never call
``os.environ`` themselves: they call :func:`env_default` (for a CLI flag's default) or
:func:`read` (for a setting with no flag). ``lorafleet <cmd> --help`` shows the variable behind
each flag, and ``ENV_VARS`` is the table docs and the manifest tests read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable

PREFIX = "LORAFLEET_"


@dataclass(frozen=True)
class EnvVar:
    name: str  # without the prefix
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def full_name(self) -> str:
        return PREFIX + self.name


def _optional_int(text: str) -> int | None:
    """An integer, or None for an empty value or "none"."""
    return None if text.strip().lower() in ("", "none") else int(text)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {text!r}")


_DECLARED: list[EnvVar] = [
    # --- shared by every service -------------------------------------------------------
    EnvVar("KAFKA_BOOTSTRAP", str, "127.0.0.1:9092", "Kafka bootstrap servers, host:port[,host:port]"),
    EnvVar("REDIS_URL", str, "redis://127.0.0.1:6379/0", "Redis URL that receives the reply streams"),
    EnvVar("REQUESTS_TOPIC", str, "lorafleet.requests", "topic users produce requests to"),
    EnvVar("DLQ_TOPIC", str, "lorafleet.requests.dlq", "dead-letter topic for unreadable requests"),
    EnvVar("WORK_TOPIC", str, "lorafleet.work", "internal topic from ingest to the engines"),
    EnvVar("WORK_PARTITIONS", int, 8, "partitions of the work topic when lorafleet creates it"),
    EnvVar("MODEL", str, "", "Hugging Face model folder; empty: the built-in demo model"),
    EnvVar("ADAPTERS", str, "", "adapter root URL (file://, plain path, s3://); empty: demo adapters"),
    EnvVar("CACHE_DIR", str, "~/.cache/lorafleet", "where the demo model and adapters are built and kept"),
    EnvVar("LOG_LEVEL", str, "info", "log level: debug, info, warning, error"),
    EnvVar("DRAIN_TIMEOUT_S", float, 30.0, "seconds a service may take to drain on SIGTERM"),
    EnvVar("METRICS_PORT", int, 9400, "HTTP port of the service's /metrics, /health and /ready (0: any free port, written to its ready file; -1: none)"),
    EnvVar("METRICS_ADAPTER_LABELS", int, 50, "adapters with their own series in the per-adapter metrics: the top ones by finished requests at each scrape"),
    EnvVar("STREAM_MAXLEN", int, 10000, "approximate cap on entries per reply stream (XADD MAXLEN ~)"),
    EnvVar("STREAM_TTL_S", int, 86400, "reply streams expire this many seconds after their terminal entry"),
    # --- adapter store ------------------------------------------------------------------
    EnvVar("STORE_ADDRESS", str, "127.0.0.1:7070", "host:port the node's adapter store listens on"),
    EnvVar("STORE_SHM_DIR", str, "/dev/shm/lorafleet-adapters", "host-memory folder shared with engines"),
    EnvVar("STORE_MEMORY_BYTES", int, 8 << 30, "byte budget of validated adapters kept in host memory"),
    EnvVar("STORE_SPILL_DIR", str, "", "local-disk folder for adapters evicted from memory; empty: no spill"),
    EnvVar("STORE_SPILL_BYTES", int, 64 << 30, "byte budget of the local-disk spill (when STORE_SPILL_DIR is set)"),
    EnvVar("STORE_MAX_ADAPTER_BYTES", int, 2 << 30, "largest adapter file accepted"),
    EnvVar("STORE_NEGATIVE_TTL_S", float, 10.0, "how long not-found/invalid results are cached"),
    EnvVar("STORE_FETCH_ATTEMPTS", int, 4, "tries per storage request on transient errors (backoff in between)"),
    EnvVar("STORE_REQUEST_TIMEOUT_S", float, 300.0, "timeout of one storage request, body included"),
    EnvVar("S3_ENDPOINT", str, "", "S3 endpoint override for S3-compatible stores (else AWS_ENDPOINT_URL)"),
    EnvVar("S3_ALLOW_HTTP", _bool, False, "allow plain-http S3 endpoints (test servers, in-cluster MinIO)"),
    # --- service plumbing: kafka, redis, ingest ----------------------------------------------
    EnvVar("REQUESTS_PARTITIONS", int, 4, "partitions of the requests topic when lorafleet creates it"),
    EnvVar("KAFKA_SECURITY_PROTOCOL", str, "PLAINTEXT", "Kafka security: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (MSK, Confluent Cloud, Event Hubs: SASL_SSL)"),
    EnvVar("KAFKA_SASL_MECHANISM", str, "", "SASL mechanism with a SASL_* protocol: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
    EnvVar("KAFKA_SASL_USERNAME", str, "", "SASL user name"),
    EnvVar("KAFKA_SASL_PASSWORD", str, "", "SASL password (put it in the secret, not the config map)"),
    EnvVar("KAFKA_SSL_CAFILE", str, "", "CA bundle that signs the brokers' certificates (empty: the system's)"),
    EnvVar("KAFKA_SSL_CERTFILE", str, "", "client certificate for mutual TLS (with KAFKA_SSL_KEYFILE)"),
    EnvVar("KAFKA_SSL_KEYFILE", str, "", "client key for mutual TLS"),
    EnvVar("KAFKA_SESSION_TIMEOUT_MS", int, 10000, "consumer-group session timeout (Tansu: joins take ~half of it)"),
    EnvVar("KAFKA_RETRY_S", float, 30.0, "how long transient Kafka errors are retried before giving up"),
    EnvVar("KAFKA_TIMEOUT_S", float, 10.0, "bound of one offset commit on the engine's step path (a failed one is retried with the next)"),
    EnvVar("REDIS_RETRY_S", float, 30.0, "how long one Redis write is retried before the caller backs off (and pauses intake) and tries again"),
    EnvVar("REDIS_TIMEOUT_S", float, 10.0, "socket timeout of every Redis call: a Redis that stops answering is an error, not a hang"),
    EnvVar("REDIS_SERVER_BIN", str, "", "redis-server binary for an embedded Redis; empty: PATH, then /usr/bin"),
    EnvVar("INGEST_GROUP", str, "lorafleet-ingest", "consumer group of the ingest service"),
    EnvVar("INGEST_MAX_BATCH", int, 500, "most request messages ingest handles per batch"),
    EnvVar("INGEST_ROUTING", str, "affinity", "how ingest picks a work partition: affinity (an adapter's requests go "
           "to the engine holding it, hot adapters spread) or hash (of the request id: even, no affinity)"),
    EnvVar("HOT_ADAPTER_RPS", float, 20.0, "requests/s of one adapter one work partition takes before it spreads"),
    EnvVar("CHAT_TEMPLATE", str, "", "ingest: a Jinja chat-template file that renders chat `messages` (empty: the tokenizer's own, from tokenizer_config.json)"),
    EnvVar("HOT_WINDOW_S", float, 10.0, "sliding window over which ingest measures each adapter's request rate"),
    # --- gateway (OpenAI-compatible HTTP API) -----------------------------------------------
    EnvVar("GATEWAY_HOST", str, "0.0.0.0", "address the gateway's HTTP API listens on"),
    EnvVar("GATEWAY_PORT", int, 8000, "port of the gateway's HTTP API (/v1/...); 0: any free port (in the ready file); `up`: -1 starts no gateway"),
    EnvVar("GATEWAY_MODEL_NAME", str, "", "the `model` name of the base model (no adapter); empty: the model folder's name, `demo` for the demo model"),
    EnvVar("GATEWAY_API_KEY", str, "", "when set, every /v1 call needs `Authorization: Bearer <key>` (put it in the secret)"),
    EnvVar("GATEWAY_REQUEST_TIMEOUT_S", float, 600.0, "an answer not finished this long after the call is cancelled and answered 504 (its deadline_ms)"),
    EnvVar("GATEWAY_MAX_CHOICES", int, 64, "most contract requests one call may make (prompts x n)"),
    EnvVar("GATEWAY_MODELS_CACHE_S", float, 30.0, "how long GET /v1/models reuses its listing of the adapter root"),
    # --- command line: `up`, ready files, `send` / `tail` ------------------------------------
    EnvVar("READY_FILE", str, "", "services and `up`: write this JSON file once ready; `send` / `tail`: read the addresses from `up`'s"),
    EnvVar("UP_ENGINES", int, 1, "engine processes `lorafleet up` starts"),
    EnvVar("UP_RESTART_LIMIT", int, 5, "`up` restarts a dead service; more exits than this within UP_RESTART_WINDOW_S stop the stack"),
    EnvVar("UP_RESTART_WINDOW_S", float, 300.0, "the window over which `up` counts a service's exits"),
    EnvVar("WAIT_READY_S", float, 900.0, "how long `send` / `tail` wait for `up`'s ready file (the first `up` builds the demo)"),
    EnvVar("TAIL_TIMEOUT_S", float, 300.0, "how long `tail` (and `send --follow`) wait for a reply's terminal entry"),
    # --- engine -------------------------------------------------------------------------
    EnvVar("DEVICE", str, "auto", "cpu, cuda or auto"),
    EnvVar("DTYPE", str, "auto", "auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32"),
    EnvVar("GPU_MEMORY_FRACTION", float, 0.90, "share of GPU memory the unified pool may take"),
    EnvVar("POOL_PAGES", int, 0, "pages in the unified pool; 0: size from memory"),
    EnvVar("BLOCK_SIZE", int, 16, "tokens per KV page"),
    EnvVar("MAX_NUM_SEQS", int, 256, "most requests in one batch"),
    EnvVar("MAX_BATCHED_TOKENS", int, 2048, "token budget of one engine step (chunked prefill)"),
    EnvVar("MAX_ADAPTER_RANK", int, 256, "largest LoRA rank the engine accepts"),
    EnvVar("CPU_THREADS", int, 0, "torch threads of an engine on the CPU device; 0: every core but one (left to the event loop, Kafka and Redis)"),
    EnvVar("ENGINE_HOST_ADAPTER_BYTES", int, 4 << 30, "validated adapters an engine keeps mapped from the node store's shared memory (LRU, bytes; evicted store files stay alive while mapped)"),
    EnvVar("ENGINE_PACKED_ADAPTER_BYTES", int, 0, "adapters an engine keeps packed for one copy to the GPU (host memory, LRU, bytes); 0: sized to the work (twice the packs of the adapters its requests use, within a quarter of the host memory available at start)"),
    EnvVar("ENGINE_ADAPTER_PACK_THREADS", int, 4, "threads of an engine that pack adapters for the GPU copy, beside the engine loop"),
    EnvVar("ENGINE_GROUP", str, "lorafleet-engines", "consumer group of the engines on the work topic"),
    EnvVar("ENGINE_STEP_STALL_S", float, 300.0, "an engine step running longer than this withholds the liveness heartbeat (a GPU or collective hang)"),
    EnvVar("ENGINE_MAX_QUEUE_S", float, 300.0, "a request with no token this many seconds after ingest took it ends with error overloaded (load shedding)"),
    EnvVar("ENGINE_MAX_INFLIGHT", int, 1024, "work messages an engine holds (queued and running) before its consumer pauses"),
    EnvVar("ENGINE_ADAPTER_UNAVAILABLE_S", float, 60.0, "an engine gives up on an adapter its node's store cannot serve after this many seconds"),
    EnvVar("ENGINE_ID", str, "", "name of this engine in logs and the consumer group; empty: hostname-pid"),
    EnvVar("RANDOM_WEIGHTS_SEED", _optional_int, None, "benchmarks only: random weights made on the device from this seed instead of the checkpoint's (unset: the checkpoint)"),
    EnvVar("MAX_ADAPTER_SLOTS", int, 0, "adapters resident in the pool at once, at most; 0: 2 x max_num_seqs, at least 64"),
    EnvVar("CPU_POOL_BYTES", int, 1 << 30, "bytes of the unified pool on the CPU device (when pool_pages is 0)"),
    EnvVar("ELEMENTWISE_OPS", str, "auto", "RMSNorm / RoPE / SiLU-and-mul implementations: auto (as ops), torch, triton"),
    EnvVar("CUDA_GRAPHS", _bool, True, "replay decode steps from CUDA graphs (CUDA with the Triton ops; 0: eager)"),
    EnvVar("ASYNC_SCHEDULING", _bool, True, "schedule and build each step while the previous one runs on the device, feeding its sampled tokens on the device (0: one step at a time)"),
    EnvVar("DECODE_STEPS_PER_PREFILL", _optional_int, None, "decode-only steps between prefill steps (0: every step mixes both; unset: 4 with CUDA graphs, else 0)"),
    EnvVar("OPS", str, "auto", "op implementations: auto (triton on CUDA), torch, triton"),
    EnvVar("TP_SIZE", int, 1, "tensor-parallel size: processes (GPUs) one engine spans; 1: no tensor parallelism"),
    EnvVar("TP_CUDA_GRAPHS", _bool, True, "decode CUDA graphs under tensor parallelism (0: eager decode steps on every rank)"),
    EnvVar("TP_LORA_SCHEME", str, "fused", "how adapters are sharded under tensor parallelism: fused (fastest, docs/tp.md) or slora (the paper's)"),
    EnvVar("TP_RESEARCH_SCHEMES", _bool, False, "benchmarks only: also allow the TP LoRA schemes replicated_a and gather_outputs (measured slower, docs/tp.md)"),
]

ENV_VARS: dict[str, EnvVar] = {v.name: v for v in _DECLARED}


def read(name: str, environ: dict[str, str] | None = None) -> Any:
    """The parsed value of ``LORAFLEET_<name>``, or its declared default."""
    var = ENV_VARS[name]  # KeyError: an undeclared variable is a programming error
    env = os.environ if environ is None else environ
    raw = env.get(var.full_name)
    if raw is None:
        return var.default
    try:
        return var.parse(raw)
    except ValueError as exc:
        raise ValueError(f"{var.full_name}={raw!r}: {exc}") from None


def env_default(name: str) -> Any:
    """Default for a CLI flag: the environment variable when set, else the declared default."""
    return read(name)


def help_suffix(name: str, unset: str | None = None) -> str:
    var = ENV_VARS[name]
    if unset is not None:
        return f" [env {var.full_name}; unset: {unset}]"
    return f" [env {var.full_name}, default {var.default!r}]"


def config_field(name: str, *, flag: str | None = None, required: bool = False) -> Any:
    """A dataclass field whose default is LORAFLEET_<name>'s declared default, marked so that
    add_config_flags gives it a flag (`flag`, else --<name in lower case>) and config_values
    reads it back: a config's knob is declared once, here, with its type, default and help.
    required: no default in the dataclass (callers pass it), still a flag with the variable's."""
    metadata = {"env": name, "flag": flag}
    return field(metadata=metadata) if required else field(default=ENV_VARS[name].default, metadata=metadata)


def _knobs(config_cls: type) -> list:
    return [f for f in fields(config_cls) if "env" in f.metadata]


def add_config_flags(parser: Any, config_cls: type) -> None:
    """One flag per knob of a config dataclass: --max-num-seqs for LORAFLEET_MAX_NUM_SEQS, and so on."""
    for f in _knobs(config_cls):
        var = ENV_VARS[f.metadata["env"]]
        flag = f.metadata["flag"] or "--" + var.name.lower().replace("_", "-")
        add_flag(parser, flag, var.name, var.parse, var.help, dest=f.name)


def config_env_values(config_cls: type, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The knobs of `config_cls` from LORAFLEET_* variables (`environ`, default os.environ) or defaults."""
    return {f.name: read(f.metadata["env"], environ) for f in _knobs(config_cls)}


def config_values(config_cls: type, args: Any) -> dict[str, Any]:
    """The knobs of `config_cls` as parsed by add_config_flags (flag, else variable, else default)."""
    return {f.name: getattr(args, f.name) for f in _knobs(config_cls)}


def add_flag(parser: Any, flag: str, name: str, kind: Callable[[str], Any], text: str, *,
             unset: str | None = None, dest: str | None = None) -> None:
    """A CLI flag whose default is ``LORAFLEET_<name>`` (or its declared default), shown in --help.

    ``unset`` names what the command does when neither the flag nor the variable is given, for a
    command whose own fallback differs from the declared default (`up` starts an embedded broker
    where a service would connect to the declared 127.0.0.1:9092): the flag's default is then ""
    unless the variable is set."""
    if unset is None:
        default = env_default(name)
    else:
        default = read(name) if ENV_VARS[name].full_name in os.environ else ""
    extra = {"dest": dest} if dest else {}
    parser.add_argument(flag, type=kind, default=default, help=text + help_suffix(name, unset), **extra)
