"""The server over HTTP, as clients call it: the `openai` package for the happy paths,
httpx for the raw cases. Most tests share one `gemma-export serve` subprocess on the tiny
fp32 artifact; those that need a request to stay in flight (queue full, disconnect,
streaming timing) or a fault run the app in a thread over a slowed or failing session."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from gemma_export.runtime.session import DecoderSession
from gemma_export.runtime.tokenizer import Tokenizer
from gemma_export.server.engine import Engine
from gemma_export.server.http import Settings, create_app
from tests.server.helpers import CliServer, SlowSession, ThreadServer, metric, wait_healthy

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_fp32):
    s = CliServer(tiny_fp32, "--served-model-name", "tiny")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _thread_server(path, *, delay=0.0, poison=None, settings=None, **engine_kw):
    def load():
        sess = SlowSession(DecoderSession(path, provider="cpu", threads=1), delay, poison)
        return Engine(sess, Tokenizer.from_file(path / "tokenizer.model"), **engine_kw)

    app = create_app(load, settings or Settings(model_name="tiny"))
    s = ThreadServer(app)
    wait_healthy(s.url)
    return s


# -- the OpenAI client ------------------------------------------------------------------------------


def test_models_and_completion(client, tiny_fp32):
    n_prompt = len(Tokenizer.from_file(tiny_fp32 / "tokenizer.model").encode("Hello there"))
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, **GREEDY)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == 6 + n_prompt
    again = client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, **GREEDY)
    assert again.choices[0].text == r.choices[0].text  # greedy is reproducible


def test_chat_folds_the_system_message_into_the_first_turn(client, tiny_fp32):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, **GREEDY)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    tok = Tokenizer.from_file(tiny_fp32 / "tokenizer.model")
    expected = tok.encode("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert r.usage.prompt_tokens == len(expected)
    # content as a list of text parts is the same prompt
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r2 = client.chat.completions.create(model="tiny", messages=parts, max_completion_tokens=5, **GREEDY)
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_stream_equals_whole_and_reports_usage(client):
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell"}],
                                           max_tokens=12, **GREEDY)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    comp = list(client.completions.create(model="tiny", prompt="abc", max_tokens=7, stream=True, **GREEDY))
    assert comp[-1].choices[0].finish_reason == "length"


def test_stop_strings(client):
    kw = {"model": "tiny", "prompt": "Hello", "max_tokens": 20, "temperature": 1.0, "seed": 11,
          "extra_body": {"ignore_eos": True}}  # seeded: the same text every time, and not one repeated token
    full = client.completions.create(**kw).choices[0].text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full.find(full[i:i + 2]) == i)
    r = client.completions.create(stop=["never there", stop], **kw)
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_requests_each_match_their_run_alone(client, server):
    """Greedy fp32: a request's text does not depend on its neighbours in the batch."""
    rng = np.random.default_rng(3)
    words = "the of a model server batch token alpha beta gamma delta river stone light".split()
    prompts = [" ".join(rng.choice(words, int(rng.integers(1, 30)))) for _ in range(16)]
    lengths = [int(n) for n in rng.integers(4, 20, 16)]

    def one(i):
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], **GREEDY)

    alone = [one(i).choices[0].text for i in range(16)]
    with cf.ThreadPoolExecutor(16) as ex:
        together = list(ex.map(one, range(16)))
    assert [r.choices[0].text for r in together] == alone
    assert [r.usage.completion_tokens for r in together] == lengths
    assert metric(server.url, "gemma_export_running_batch_size") == 0


# -- raw HTTP: refusals -------------------------------------------------------------------------------

BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 255}, 400, "max_tokens"),  # + prompt > context 256
    ("/v1/completions", {"prompt": "word " * 300}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -5},
     400, "max_completion_tokens"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_malformed_request_gets_its_4xx_and_the_server_stays_healthy(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_fields_are_ignored(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "user": "x",
                                                         "some_new_field": {"a": 1}}, timeout=30)
    assert r.status_code == 200


# -- in-flight behaviour (slowed session in a thread) -------------------------------------------------


def test_streaming_chunks_arrive_before_the_end(tiny_fp32):
    s = _thread_server(tiny_fp32, delay=0.03)
    try:
        times = []
        with httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                          json={"prompt": "hi", "max_tokens": 20, "ignore_eos": True, "stream": True,
                                "temperature": 0}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    times.append((time.monotonic(), line[6:]))
        assert times[-1][1] == "[DONE]"
        # A token that ends inside a UTF-8 character (the tiny vocabulary has byte tokens) sends
        # no chunk of its own, so the count of chunks depends on the tokens drawn; what must hold
        # is that text came in several chunks spread over the 20 steps, not all at the end.
        texts = [json.loads(d)["choices"][0]["text"] for _, d in times[:-1]]
        assert sum(1 for t in texts if t) >= 3
        assert times[-1][0] - times[0][0] > 0.3  # 20 steps of >= 30 ms: the first chunk came early
    finally:
        s.close()


def test_queue_full_is_429_with_retry_after(tiny_fp32):
    s = _thread_server(tiny_fp32, delay=0.05, max_batch=1, max_queue=1)
    body = {"prompt": "hi", "max_tokens": 40, "ignore_eos": True}
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            running = ex.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=60)
            t0 = time.monotonic()
            while metric(s.url, "gemma_export_running_batch_size") < 1:
                assert time.monotonic() - t0 < 20
                time.sleep(0.02)
            waiting = ex.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=60)
            while metric(s.url, "gemma_export_queue_depth") < 1:
                assert time.monotonic() - t0 < 20
                time.sleep(0.02)
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 429
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert running.result().status_code == 200 and waiting.result().status_code == 200
        assert 'status="429"' in httpx.get(s.url + "/metrics").text
    finally:
        s.close()


def test_disconnect_mid_stream_frees_the_slot(tiny_fp32):
    s = _thread_server(tiny_fp32, delay=0.05)
    try:
        with httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                          json={"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()  # kept open: closing this generator closes the connection
            while not next(lines).startswith("data: "):
                pass
            t0 = time.monotonic()  # the row joins the batch just after its first token is sent
            while metric(s.url, "gemma_export_running_batch_size") != 1:
                assert time.monotonic() - t0 < 3
                time.sleep(0.02)
        # the client hung up after one token of 200 (10 s of steps): the slot is free at once
        t0 = time.monotonic()
        while metric(s.url, "gemma_export_running_batch_size") != 0:
            assert time.monotonic() - t0 < 3, "the disconnected request kept its slot"
            time.sleep(0.05)
        generated = metric(s.url, "gemma_export_generation_tokens_total")
        time.sleep(0.3)
        assert metric(s.url, "gemma_export_generation_tokens_total") == generated < 50
    finally:
        s.close()


def test_a_failing_sequence_is_a_500_and_the_others_finish(tiny_fp32):
    tok = Tokenizer.from_file(tiny_fp32 / "tokenizer.model")
    s = _thread_server(tiny_fp32, delay=0.01, poison=tok.encode("zebra", add_bos=False)[0])
    try:
        good = {"prompt": "hello", "max_tokens": 10, "ignore_eos": True, "temperature": 0}
        bad = {"prompt": "zebra", "max_tokens": 10, "ignore_eos": True}
        with cf.ThreadPoolExecutor(3) as ex:
            fs = [ex.submit(httpx.post, s.url + "/v1/completions", json=b, timeout=60) for b in (good, bad, good)]
            rs = [f.result() for f in fs]
        assert [r.status_code for r in rs] == [200, 500, 200]
        assert rs[1].json()["error"]["type"] == "server_error"
        assert rs[0].json()["usage"]["completion_tokens"] == 10
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()


def test_health_is_503_until_the_model_is_loaded(tiny_fp32):
    gate = threading.Event()

    def load():
        gate.wait(30)
        return Engine(DecoderSession(tiny_fp32, provider="cpu", threads=1),
                      Tokenizer.from_file(tiny_fp32 / "tokenizer.model"))

    s = ThreadServer(create_app(load, Settings(model_name="tiny")))
    try:
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        gate.set()
        wait_healthy(s.url, timeout=30)
    finally:
        gate.set()
        s.close()


def test_api_key_and_cors(tiny_fp32):
    s = _thread_server(tiny_fp32, settings=Settings(model_name="tiny", api_key="s3cret",
                                                     cors_origins=("https://app.example",)))
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # no key needed
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0)
        assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="nope", max_retries=0).models.list()
        pre = httpx.options(s.url + "/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        s.close()


def test_no_cors_headers_by_default(server):
    r = httpx.get(server.url + "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# -- the CLI process: key from the environment, SIGTERM ------------------------------------------------


def test_cli_key_from_env_and_sigterm_finishes_in_flight_work_and_exits_0(tiny_fp32):
    s = CliServer(tiny_fp32, "--grace", "20", env={"GEMMA_EXPORT_API_KEY": "k3y"})
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer k3y"}
        lines = []
        with httpx.stream("POST", s.url + "/v1/completions", headers=auth, timeout=60,
                          json={"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not lines:
                        s.proc.send_signal(signal.SIGTERM)  # mid-stream
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
        assert finish[-1] == "length"  # the in-flight request ran to its end
        assert s.proc.wait(60) == 0
        assert "Traceback" not in s.proc.stderr.read()
    finally:
        s.close()
