"""`prefixflow serve` with the official openai client: same greedy text as LLM.generate,
streamed or not; 200 concurrent streams; a disconnect frees its pages; metrics."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from prefixflow import SamplingParams

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def start_server(port: int, args: list[str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """`prefixflow serve` on a port, with these flags; (its URL, its process) once healthy."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefixflow", "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    try:
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    with start_server(free_port(), ["--dtype", "float32", "--kv-cache-memory", "1GiB"]) as s:
        yield s


def metric(base: str, name: str, headers: dict | None = None) -> float:
    text = httpx.get(f"{base}/metrics", headers=headers).text
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_completions_and_chat_streamed_or_not_equal_llm_generate(server, llm_f32):
    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    model = client.models.list().data[0].id
    prompt = "The three primary colours are"
    want = llm_f32.generate([prompt], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    want = want[0].outputs[0].text
    got = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    assert got.choices[0].text == want
    assert got.usage.completion_tokens == 16 or got.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == want

    messages = [{"role": "user", "content": "Name three rivers in Europe."}]
    want = llm_f32.chat(messages, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    want = want[0].outputs[0].text
    got = client.chat.completions.create(
        model=model, messages=messages, max_tokens=20, temperature=0
    )
    assert got.choices[0].message.content == want
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens

    # n samples, seeded, with logprobs (not streamed)
    got = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0.8, n=3, seed=5, logprobs=2
    )
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert all(len(c.logprobs.tokens) == len(c.logprobs.top_logprobs) for c in got.choices)


def test_200_concurrent_streams_complete_and_memory_returns(server):
    base, proc = server
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    prompts = [f"Write a sentence about the number {i}." for i in range(10)]

    async def once(prompt: str, stream: bool) -> str:
        if not stream:
            r = await client.completions.create(
                model="m", prompt=prompt, max_tokens=6, temperature=0
            )
            return r.choices[0].text
        s = await client.completions.create(
            model="m", prompt=prompt, max_tokens=6, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in s if c.choices])

    async def round_of_200() -> list[str]:
        return await asyncio.gather(*(once(prompts[i % 10], True) for i in range(200)))

    def resident_beyond_kv() -> float:
        """Resident memory less the KV cache pages written so far: the cache fills its
        budget by design (free pages keep prefixes); what must not grow is the rest."""
        return rss_mb(proc.pid) - metric(base, "prefixflow_kv_bytes_touched") / 2**20

    async def main():
        want = await asyncio.gather(*(once(p, False) for p in prompts))
        rounds, idle = [], []
        for _ in range(3):
            rounds.append(await round_of_200())
            idle.append(resident_beyond_kv())
        return want, rounds, idle

    want, rounds, idle = asyncio.run(main())
    for got in rounds:
        assert got == [want[i % 10] for i in range(200)]
    assert metric(base, "prefixflow_running_sequences") == 0
    assert metric(base, "prefixflow_kv_pages_used") == 0
    assert metric(base, "prefixflow_unfinished_requests") == 0
    assert idle[2] < idle[1] * 1.05 + 30, idle


def test_disconnect_mid_stream_frees_the_pages(server):
    base, _ = server
    before = metric(base, "prefixflow_disconnects_total")
    body = {"prompt": "Count upwards:", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert metric(base, "prefixflow_kv_pages_used") > 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and metric(base, "prefixflow_kv_pages_used") > 0:
        time.sleep(0.2)
    assert metric(base, "prefixflow_kv_pages_used") == 0
    assert metric(base, "prefixflow_running_sequences") == 0
    assert metric(base, "prefixflow_disconnects_total") == before + 1


def test_bad_requests_get_openai_shaped_400s(server):
    base, _ = server
    for body in (
        b"{not json",
        b'{"prompt": "hi", "max_tokens": -3}',
        b'{"prompt": "hi", "bogus": 1}',
        b'{"messages": []}',
        b"[]",
    ):
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(f"{base}{path}", content=body)
            assert r.status_code == 400, (path, body, r.text)
            assert r.json()["error"]["message"]


def test_vllm_benchmark_client_runs_every_request(server, tokenizer):
    """vLLM's own `vllm bench serve` request functions (vLLM installed without its
    dependencies in .venv/vllm-client by `make setup`), streamed with EOS ignored, as its
    benchmark sends them: every request succeeds with exactly the asked output length."""
    import pathlib

    client = pathlib.Path(sys.prefix) / "vllm-client"
    if str(client) not in sys.path:
        sys.path.insert(0, str(client))
    import aiohttp
    from vllm.benchmarks.lib import endpoint_request_func as vllm_client

    base, _ = server
    words = "the of and to in is was for on that with as by it at from".split()
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(20 + i)) for i in range(24)]

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            jobs = []
            for i, prompt in enumerate(prompts):
                chat = i % 3 == 2
                fn = (
                    vllm_client.async_request_openai_chat_completions
                    if chat
                    else vllm_client.async_request_openai_completions
                )
                url = f"{base}/v1/{'chat/completions' if chat else 'completions'}"
                job = vllm_client.RequestFuncInput(
                    prompt=prompt,
                    api_url=url,
                    prompt_len=len(tokenizer(prompt).input_ids),
                    output_len=4 + i % 5,
                    model="prefixflow",
                    ignore_eos=True,
                )
                jobs.append(fn(job, session))
            return await asyncio.gather(*jobs)

    outs = asyncio.run(main())
    assert [o.error for o in outs if not o.success] == []
    assert [o.output_tokens for o in outs] == [4 + i % 5 for i in range(len(prompts))]
    assert all(o.generated_text and o.ttft > 0 for o in outs)
