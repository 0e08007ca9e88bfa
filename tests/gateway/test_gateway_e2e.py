"""The gateway through the official `openai` package against a real `lorafleet up` (zoo model,
several adapters): completions and chat completions, whole and streamed, equal to what the
Kafka path answers for the same request; the mapped errors; paged model listing; and a client
that goes away mid-answer leaves nothing running."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode, urlparse

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.client import LorafleetClient
from lorafleet.common.messages import DoneReply, ErrorReply
from tests.faults.up_stack import UpStack
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
ADAPTERS = {"t/attn": "r1-attn", "t/rslora": "r8-all-rslora", "t/pattern": "r4-pattern"}
BASE = "mha"  # the base model's `model` name: the zoo model's folder name
README_ADAPTER = "demo/pirate"  # the README's example names it; here it is a zoo adapter
PROMPTS = ["the sea", "once upon a time"]
CHAT = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "the fox and the sea"}]


@pytest.fixture(scope="module")
def stack(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    for adapter_id, name in {**ADAPTERS, README_ADAPTER: "r4-pattern"}.items():
        shutil.copytree(zoo.adapter("mha", name), tmp / "adapters" / adapter_id)
    up = UpStack(tmp, zoo.model("mha"), tmp / "adapters").start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.ready["gateway"], api_key="unused", max_retries=0, timeout=120)


def _kafka_answer(stack, request: dict) -> tuple[str, DoneReply]:
    async def run():
        async with LorafleetClient(stack.ready["kafka_bootstrap"], stack.ready["redis_url"]) as kafka:
            return await kafka.generate({"id": unique_name("k"), **request}, timeout=120)

    text, _ids, terminal = asyncio.run(run())
    assert isinstance(terminal, DoneReply), terminal
    return text, terminal


def _samples(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=20) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _wait_until(condition, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout_s}s"
        time.sleep(0.1)


@pytest.mark.parametrize("model", [BASE, *ADAPTERS])
def test_completions_whole_and_streamed_equal_the_kafka_path(stack, client, model):
    adapter = None if model == BASE else model
    for prompt in PROMPTS:
        text, done = _kafka_answer(stack, {"adapter": adapter, "prompt": prompt, "max_tokens": 12, "temperature": 0})
        whole = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        assert whole.object == "text_completion" and whole.model == model
        assert whole.choices[0].text == text and whole.choices[0].finish_reason == done.finish_reason
        usage = whole.usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (done.prompt_tokens, done.completion_tokens)
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == done.finish_reason
        assert chunks[-1].usage.completion_tokens == done.completion_tokens  # usage in every final answer


@pytest.mark.parametrize("model", [BASE, "t/rslora"])
def test_chat_completions_render_the_template_and_equal_the_kafka_path(stack, client, model):
    adapter = None if model == BASE else model
    text, done = _kafka_answer(stack, {"adapter": adapter, "messages": CHAT, "max_tokens": 10, "temperature": 0})
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0)
    message = whole.choices[0].message
    assert (message.role, message.content) == ("assistant", text)
    assert whole.usage.prompt_tokens == done.prompt_tokens
    # the template wrapped the turns: more prompt tokens than the two contents alone
    _plain_text, plain = _kafka_answer(stack, {"adapter": adapter, "prompt": "answer briefly the fox and the sea",
                                               "max_tokens": 1, "temperature": 0})
    assert done.prompt_tokens > plain.prompt_tokens
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == done.prompt_tokens + done.completion_tokens


def test_batches_of_prompts_and_n_choices(client):
    answer = client.completions.create(model="t/attn", prompt=PROMPTS, n=2, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    texts = [c.text for c in answer.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: the choices of one prompt agree
    assert answer.usage.completion_tokens == 4 * 6
    sampled = client.completions.create(model="t/attn", prompt="the sea", n=3, max_tokens=8, temperature=1.0, seed=5)
    again = client.completions.create(model="t/attn", prompt="the sea", n=3, max_tokens=8, temperature=1.0, seed=5)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible


def test_errors_come_in_openais_shape_with_the_mapped_status(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="t/missing", prompt="x", max_tokens=2)
    assert caught.value.body["code"] == "adapter_not_found"
    with pytest.raises(openai.NotFoundError):  # before the first token: still an HTTP status
        list(client.chat.completions.create(model="t/missing", messages=CHAT, max_tokens=2, stream=True))
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="../etc", prompt="x", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=BASE, prompt="x", max_tokens=2, temperature=-1)
    assert caught.value.body["code"] == "invalid_request" and "temperature" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=BASE, prompt="the sea " * 400, max_tokens=2)
    assert caught.value.body["code"] == "prompt_too_long"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=BASE, prompt="x", logprobs=2)
    assert caught.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=BASE, messages=[], max_tokens=2)
    assert caught.value.body["param"] == "messages"


def test_models_lists_the_base_then_every_adapter_in_pages(stack, client):
    listed = [m.id for m in client.models.list()]
    assert listed == [BASE, *sorted([*ADAPTERS, README_ADAPTER])]
    pages, after = [], None
    while True:
        query = {"limit": 2, **({"after": after} if after else {})}
        with urllib.request.urlopen(f"{stack.ready['gateway']}/models?{urlencode(query)}", timeout=20) as reply:
            page = json.loads(reply.read())
        pages.append([m["id"] for m in page["data"]])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [i for page in pages for i in page] == listed and all(len(p) <= 2 for p in pages)
    assert client.models.retrieve("t/attn").id == "t/attn"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("t/missing")


def _request_ids(redis_url: str, pattern: str) -> set[str]:
    import redis

    with redis.Redis.from_url(redis_url) as r:
        return {key.decode().split(":", 2)[2] for key in r.scan_iter(pattern)}


def _stream_terminal(redis_url: str, request_id: str) -> dict | None:
    import redis

    with redis.Redis.from_url(redis_url) as r:
        entries = r.xrange(f"lorafleet:out:{request_id}")
    fields = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
    terminal = [f for f in fields if f["type"] != "token"]
    assert len(terminal) <= 1 and (not terminal or fields[-1] is terminal[0]), fields[-3:]
    return terminal[0] if terminal else None


def _engine_idle(stack) -> bool:
    samples = _samples(stack.ready["metrics"]["engine-0"])
    return (samples.get(("lorafleet_engine_requests_running", ()), 1) == 0
            and samples.get(("lorafleet_engine_requests_waiting", ()), 1) == 0)


def _engine_process(stack) -> psutil.Process:
    """The stack's engine process (a child of `up`), to hold still while a client goes away."""
    for child in psutil.Process(stack.proc.pid).children(recursive=True):
        if "--engine-id" in child.cmdline():
            return child
    raise AssertionError("no engine process under lorafleet up")


def _cancelled_while_the_engine_is_held(stack, start, leave) -> None:
    """start() begins a long generation and returns its request id once a token is out; the engine
    is then stopped (SIGSTOP) so the request cannot finish meanwhile, leave() makes the client go
    away, and once the gateway has set the cancel key the engine runs on: the request must end
    `cancelled` and leave the engine idle. A request that finished before the engine was held (a
    fast machine) is tried again."""
    engine = _engine_process(stack)
    redis_url = stack.ready["redis_url"]
    for _attempt in range(5):
        request_id = start()
        engine.suspend()
        try:
            if _stream_terminal(redis_url, request_id) is not None:
                leave()
                continue  # done before the engine was held: nothing left to cancel
            leave()
            _wait_until(lambda: request_id in _request_ids(redis_url, "lorafleet:cancel:*"), what="the cancel key")
        finally:
            engine.resume()
        _wait_until(lambda: _stream_terminal(redis_url, request_id) is not None, what="a terminal entry")
        terminal = _stream_terminal(redis_url, request_id)
        assert terminal["type"] == "error" and terminal["code"] == "cancelled", terminal
        _wait_until(lambda: _engine_idle(stack), what="the engine idle")
        return
    raise AssertionError("every try finished before the engine could be held")


def test_a_client_gone_mid_stream_cancels_its_request_end_to_end(stack, client):
    streams = []

    def start() -> str:
        stream = client.completions.create(model="t/pattern", prompt="the sea", max_tokens=500, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        streams.append(stream)
        return next(stream).id + "-0"  # the first token is out

    _cancelled_while_the_engine_is_held(stack, start, lambda: streams[-1].close())
    gateway = _samples(stack.ready["metrics"]["gateway"])
    assert gateway[("lorafleet_gateway_abandoned_total", (("reason", "disconnect"),))] >= 1
    _wait_until(lambda: _samples(stack.ready["metrics"]["gateway"])[("lorafleet_gateway_reply_streams_open", ())] == 0,
                what="no reply stream open")


def test_a_client_gone_before_a_whole_answer_cancels_it(stack):
    body = json.dumps({"model": "t/pattern", "prompt": "the sea", "max_tokens": 500, "temperature": 0,
                       "ignore_eos": True}).encode()
    url = urlparse(stack.ready["gateway"])
    connections = []

    def start() -> str:
        before = _stream_keys(stack.ready["redis_url"])
        conn = socket.create_connection((url.hostname, url.port), timeout=20)
        connections.append(conn)
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _wait_until(lambda: _stream_keys(stack.ready["redis_url"]) - before, what="the request's first token")
        (key,) = _stream_keys(stack.ready["redis_url"]) - before
        return key.removeprefix("lorafleet:out:")

    _cancelled_while_the_engine_is_held(stack, start, lambda: connections[-1].close())


def _stream_keys(redis_url: str) -> set[str]:
    import redis

    with redis.Redis.from_url(redis_url) as r:
        return {key.decode() for key in r.scan_iter("lorafleet:out:cmpl-*")}


def test_the_readme_example_works_as_written(stack):
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- openai-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) == 3 and "http://127.0.0.1:8000/v1" in block
    script = block.replace("http://127.0.0.1:8000/v1", stack.ready["gateway"])  # this stack's port
    call = next(node for node in ast.walk(ast.parse(block)) if isinstance(node, ast.Call) and node.keywords
                and getattr(node.func, "attr", "") == "create")
    request = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    expected, _ = _kafka_answer(stack, {"adapter": request.pop("model"), **request})
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == expected + "\n"


def test_an_error_entry_of_the_kafka_path_and_the_gateway_agree(stack, client):
    """The same unknown adapter: the contract's error entry and the gateway's error body."""
    async def run():
        async with LorafleetClient(stack.ready["kafka_bootstrap"], stack.ready["redis_url"]) as kafka:
            return await kafka.generate({"id": unique_name("k"), "adapter": "t/none", "prompt": "x", "max_tokens": 2})

    _text, _ids, terminal = asyncio.run(run())
    assert isinstance(terminal, ErrorReply)
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="t/none", prompt="x", max_tokens=2)
    assert (caught.value.body["code"], caught.value.body["message"]) == (terminal.code, terminal.message)


@pytest.fixture
def replica(stack, tmp_path):
    """A second gateway, alone (as a pod runs it), against the stack's broker and Redis, with an API key."""
    ready_file = tmp_path / "gateway.json"
    env = dict(os.environ, LORAFLEET_KAFKA_BOOTSTRAP=stack.ready["kafka_bootstrap"],
               LORAFLEET_REDIS_URL=stack.ready["redis_url"], LORAFLEET_GATEWAY_API_KEY="s3cret")
    argv = ["gateway", "--port", "0", "--host", "127.0.0.1", "--served-model-name", BASE,
            "--adapters", str(stack.tmp / "adapters"), "--ready-file", str(ready_file)]
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "gateway.log", "wb"))
    _wait_until(lambda: ready_file.exists() or proc.poll() is not None, what="the replica ready")
    assert proc.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
    yield proc, json.loads(ready_file.read_text()), argv, env
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_replica_with_an_api_key_answers_alike_and_stops_cleanly(stack, client, replica):
    proc, ready, argv, env = replica
    url = f"http://127.0.0.1:{ready['port']}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).completions.create(model=BASE, prompt="x")
    keyed = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=120)
    answer = keyed.completions.create(model="t/attn", prompt="the sea", max_tokens=8, temperature=0)
    assert answer.choices[0].text == client.completions.create(model="t/attn", prompt="the sea", max_tokens=8,
                                                               temperature=0).choices[0].text
    assert [m.id for m in keyed.models.list()][0] == BASE
    for probe in ("/health", "/ready"):
        with urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}{probe}", timeout=20) as reply:
            assert reply.status == 200
    check = subprocess.run([sys.executable, "-m", "lorafleet.cli", *argv, "--check", "ready"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    taken = subprocess.run([sys.executable, "-m", "lorafleet.cli", "gateway", "--port", str(ready["port"]),
                            "--host", "127.0.0.1", "--served-model-name", BASE, "--metrics-port", "-1"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert taken.returncode != 0 and f"cannot listen on 127.0.0.1:{ready['port']}" in taken.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
