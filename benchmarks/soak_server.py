"""Soak test of `prefixflow serve` on loopback: twice its measured capacity for N minutes.

Starts the server, measures its capacity (a closed loop of 16 normal requests), then sends
Poisson arrivals at --load times that rate: ~70% normal requests (greedy ones checked
against reference texts, sampled ones for their n choices), ~15% hostile ones (each must
be refused with a 4xx) and ~15% abandoned ones (closed early). It checks that (a) resident
memory less the KV pages touched does not grow after --settle-minutes (the later half of
the load against the earlier half), (b) no request is lost or duplicated, (c) no 5xx
appears, and exits 1 if any of them fails. At twice the
capacity half the offered work cannot be served: the server turns it away with 429 and
Retry-After, and a request still turned away after 5 minutes of retries is counted as
turned away, not lost (the server answered it). Not part of the test suite; run by hand:

    .venv/bin/python benchmarks/soak_server.py --minutes 20
    .venv/bin/python benchmarks/soak_server.py --minutes 2 --warmup-seconds 20 --settle-minutes 1

The server's data memory is capped (--server-memory-limit, RLIMIT_DATA): a request that
makes it allocate without bound then fails inside the server (and the soak with it),
instead of the kernel's OOM killer picking some process of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

KEY = "soak-test-key"
# A normal request retries backpressure (429 + Retry-After) for this long, then gives up:
# turned away, which the server said, not lost. Once let in, it has ATTEMPT_S to finish.
RETRY_BUDGET_S = 300.0
ATTEMPT_S = 120.0
HOSTILE_TIMEOUT_S = 120.0
SLOW_REFUSAL_S = 10.0  # a refusal slower than this is reported, though no property fails
MB = 1 << 20
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GAUGES = ("unfinished_requests", "running_sequences", "kv_pages_used")
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Once upon a time, in a small village,",
    "Explain what a hash table is.",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "Translate 'good morning' into Spanish:",
]


@dataclass
class Tally:
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    probes: dict[str, dict] = field(default_factory=dict)
    notes: dict[str, dict] = field(default_factory=dict)  # "FAIL what [kind] status" -> count
    # sent, skipped (never sent: the client's own cap on open requests was reached),
    # normal_ok, retries, lost, duplicated, greedy_mismatches, server_5xx
    n: Counter = field(default_factory=Counter)
    open: int = 0

    def note(self, level: str, what: str, kind: str, status: object, **example: object) -> None:
        # Grouped, with the first example of each: a soak repeats the same fault many times.
        n = self.notes.setdefault(f"{level} {what} [{kind}] {status}", {"count": 0, **example})
        n["count"] += 1


def backpressure(r: httpx.Response) -> bool:
    return r.status_code in (429, 503) and "retry-after" in r.headers


def check_5xx(t: Tally, category: str, kind: str, r: httpx.Response) -> None:
    if r.status_code >= 500 and not backpressure(r):
        t.n["server_5xx"] += 1
        t.note("FAIL", f"5xx to {category}", kind, r.status_code, body=r.text[:300])


def greedy_body(url: str, i: int) -> dict:
    if url == COMPLETIONS:
        body: dict = {"prompt": PROMPTS[i]}
    else:
        body = {"messages": [{"role": "user", "content": PROMPTS[i]}]}
    return {**body, "n": 1, "max_tokens": 16, "temperature": 0.0}


def normal_request(rng: random.Random) -> tuple[str, dict, int | None]:
    """(url, body, the reference prompt's index if the request is greedy)."""
    url, i, greedy = rng.choice((COMPLETIONS, CHAT)), rng.randrange(len(PROMPTS)), rng.random()
    body = {**greedy_body(url, i), "stream": rng.random() < 0.5}
    if greedy < 0.5:
        return url, body, i
    sampled = {"n": rng.randint(1, 4), "max_tokens": rng.randint(8, 32), "temperature": 0.8}
    return url, body | sampled, None


def read_reply(r: httpx.Response, lines: list[str] | None) -> tuple[dict, list[str]]:
    """(choice index -> its texts, problems). A finished choice adds one text, so a choice
    answered twice has two and a lost one none."""
    texts: dict[int, list[str]] = defaultdict(list)
    parts: dict[int, str] = defaultdict(str)
    events = [x[6:] for x in lines or [] if x.startswith("data: ")]
    problems = [] if lines is None or events[-1:] == ["[DONE]"] else ["no data: [DONE] at the end"]
    try:
        for c in r.json()["choices"] if lines is None else []:
            texts[c["index"]].append(c["text"] if "text" in c else c["message"]["content"])
        for e in events:
            obj = {} if e == "[DONE]" else json.loads(e)
            if "error" in obj:
                problems.append(f"error event: {e[:300]}")
            for c in obj.get("choices", []):
                parts[c["index"]] += c.get("text") or (c.get("delta") or {}).get("content") or ""
                if c.get("finish_reason") is not None:
                    texts[c["index"]].append(parts[c["index"]])
    except (ValueError, KeyError, TypeError) as e:
        problems.append(f"unreadable reply: {e!r}")
    return texts, problems


async def post(
    client: httpx.AsyncClient, url: str, body: dict
) -> tuple[httpx.Response, list | None]:
    if not body["stream"]:
        return await client.post(url, json=body, timeout=ATTEMPT_S), None
    async with client.stream("POST", url, json=body, timeout=ATTEMPT_S) as r:
        if r.status_code != 200:
            await r.aread()
            return r, None
        return r, [x async for x in r.aiter_lines()]


async def send_normal(
    client: httpx.AsyncClient, t: Tally, url: str, body: dict, ref: int | None, refs: dict
) -> str | None:
    """One normal request, retried on backpressure; its first choice's text, or None."""
    deadline, kind = time.monotonic() + RETRY_BUDGET_S, f"{url} stream={body.get('stream', False)}"
    body = {"stream": False, **body}
    while True:
        try:
            async with asyncio.timeout(ATTEMPT_S):
                r, lines = await post(client, url, body)
        except (TimeoutError, httpx.HTTPError) as e:
            label = "timeout" if isinstance(e, TimeoutError | httpx.TimeoutException) else "conn"
            t.statuses["normal"][label] += 1
            t.n["lost"] += 1
            t.note("FAIL", "lost", kind, label, error=repr(e)[:200], request=body)
            return None
        t.statuses["normal"][str(r.status_code)] += 1
        if not backpressure(r):
            break
        if time.monotonic() >= deadline:  # told to come back all along: the client gives up
            t.n["turned_away"] += 1
            return None
        t.n["retries"] += 1
        try:
            wait = float(r.headers["retry-after"])
        except ValueError:
            wait = 1.0
        await asyncio.sleep(max(0.0, min(wait, 5.0, deadline - time.monotonic())))
    check_5xx(t, "normal", kind, r)
    if r.status_code != 200:
        t.n["lost"] += 1
        t.note("FAIL", "refused", kind, r.status_code, body=r.text[:300], request=body)
        return None
    texts, problems = read_reply(r, lines)
    t.n["server_5xx"] += any(p.startswith("error event") for p in problems)
    missing = [i for i in range(body["n"]) if not texts.get(i)]
    extra = [i for i, v in texts.items() if len(v) > 1 or not 0 <= i < body["n"]]
    t.n["lost"] += bool(missing or problems)
    t.n["duplicated"] += bool(extra)
    if missing or extra or problems:
        t.note("FAIL", "bad reply", kind, 200, missing=missing, dup=extra, problems=problems[:3])
        return None
    t.n["normal_ok"] += 1
    text = texts[0][0]
    if ref is not None and refs.get((url, ref), text) != text:
        t.n["greedy_mismatches"] += 1
        t.note("FAIL", "greedy mismatch", kind, 200, got=text, want=refs[url, ref], request=body)
    return text


def hostile_probes() -> dict[str, tuple[str, bytes, dict, str]]:
    """kind -> (path, body, headers, what must come back: '4xx', '401' or '4xx|200')."""

    def body(**fields: object) -> bytes:
        return json.dumps({"prompt": "Hello", "max_tokens": 4, **fields}).encode()

    # Written as text: json.dumps itself would pass Python's recursion limit at this depth.
    deep = '{"type": "object", "properties": {"a": ' * 3000 + '{"type": "string"}' + "}}" * 3000
    rf = f'{{"type": "json_schema", "json_schema": {{"name": "x", "schema": {deep}}}}}'
    chat = '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4'
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    bias = dict.fromkeys(map(str, range(200_000)), 1.0)
    choices = [f"option {i}" for i in range(20000)]
    weights, not_utf8 = "/update_weights_from_disk", b'{"prompt": "\xff\xfe\xc3\x28"}'
    return {
        "n_100000": (COMPLETIONS, body(n=100_000), {}, "4xx"),
        "n_1e9": (COMPLETIONS, body(n=1_000_000_000), {}, "4xx"),
        "prompt_ids_1M": (COMPLETIONS, body(prompt=[1] * 1_000_000), {}, "4xx"),
        "schema_deep_3000": (CHAT, f'{chat}, "response_format": {rf}}}'.encode(), {}, "4xx"),
        # Within max_grammar_bytes: compiled (about a second) and served.
        "schema_wide_5000": (COMPLETIONS, body(structured_outputs={"json": wide}), {}, "4xx|200"),
        "regex_(a+)+$": (COMPLETIONS, body(structured_outputs={"regex": "(a+)+$"}), {}, "4xx|200"),
        "choices_20000": (COMPLETIONS, body(structured_outputs={"choice": choices}), {}, "4xx"),
        "logit_bias_200000": (COMPLETIONS, body(logit_bias=bias), {}, "4xx"),
        "body_40MB": (COMPLETIONS, body(prompt="the quick brown fox " * 2_000_000), {}, "4xx"),
        "invalid_utf8": (COMPLETIONS, not_utf8, {}, "4xx"),
        "malformed_json": (COMPLETIONS, b'{"prompt": "Hello", "max_tokens": ', {}, "4xx"),
        "wrong_api_key": (COMPLETIONS, body(), {"authorization": "Bearer wrong"}, "401"),
        "unknown_field": (COMPLETIONS, body(frobnicate=True), {}, "4xx"),
        "weights_/etc/passwd": (weights, b'{"model_path": "/etc/passwd"}', {}, "4xx"),
        "weights_/proc/self": (weights, b'{"model_path": "/proc/self"}', {}, "4xx"),
    }


async def send_hostile(
    client: httpx.AsyncClient, t: Tally, kind: str, probe: tuple[str, bytes, dict, str]
) -> None:
    path, content, headers, expect = probe
    headers = {"content-type": "application/json", **headers}
    start, refused = time.monotonic(), False
    try:
        async with asyncio.timeout(HOSTILE_TIMEOUT_S):
            r = await client.post(path, content=content, headers=headers, timeout=HOSTILE_TIMEOUT_S)
        status, refused = str(r.status_code), 400 <= r.status_code < 500
        check_5xx(t, "hostile", kind, r)
        fine = status in expect.split("|") or (refused and "4xx" in expect) or backpressure(r)
        if not fine and r.status_code < 500:
            t.note("WARN", "hostile probe not refused", kind, status, body=r.text[:200])
    except (TimeoutError, httpx.HTTPError) as e:
        status = "timeout" if isinstance(e, TimeoutError | httpx.TimeoutException) else "conn"
        t.note("WARN", "hostile probe got no answer", kind, status, error=repr(e)[:200])
    took = round(time.monotonic() - start, 2)
    t.statuses["hostile"][status] += 1
    p = t.probes.setdefault(kind, {"statuses": Counter(), "max_s": 0.0, "max_refusal_s": 0.0})
    p["statuses"][status] += 1
    p["max_s"] = max(p["max_s"], took)
    p["max_refusal_s"] = max(p["max_refusal_s"], took if refused else 0.0)


async def send_abandoned(client: httpx.AsyncClient, t: Tally, rng: random.Random) -> None:
    """Fine whatever happens but a 5xx: what matters is what the server does afterwards."""
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": 200, "ignore_eos": True}
    kind, status = "stream", "client_closed"
    try:
        if rng.random() < 0.5:
            chunks = rng.randint(1, 3)
            async with asyncio.timeout(ATTEMPT_S):
                async with client.stream("POST", COMPLETIONS, json={**body, "stream": True}) as r:
                    if r.status_code != 200:
                        await r.aread()
                        status = str(r.status_code)
                    async for line in r.aiter_lines():
                        chunks -= line.startswith("data: ")
                        if chunks <= 0:
                            break  # leaving the block closes the connection mid-stream
        else:
            kind = "timeout_0.5s"
            r = await client.post(COMPLETIONS, json=body, timeout=0.5)
            status = str(r.status_code)
        check_5xx(t, "abandoned", kind, r)
    except (TimeoutError, httpx.TimeoutException):
        status = "client_timeout"
    except httpx.HTTPError:
        status = "conn"
    t.statuses["abandoned"][status] += 1


def read_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


async def metrics(mon: httpx.AsyncClient) -> dict[str, float]:
    """The unlabelled prefixflow_* samples of /metrics; {} when the scrape fails."""
    try:
        text = (await mon.get("/metrics", timeout=30)).text
    except httpx.HTTPError:
        return {}
    out = {}
    for name, _, value in (line.rpartition(" ") for line in text.splitlines()):
        if name.startswith("prefixflow_"):
            try:
                out[name.removeprefix("prefixflow_")] = float(value)
            except ValueError:
                pass
    return out


def net(s: dict) -> float | None:
    return None if s["rss"] is None else s["rss"] - (s["kv"] or 0)


async def sampler(mon: httpx.AsyncClient, pid: int, t: Tally, samples: list) -> None:
    head = "   t(s) rss(MB) kv(MB) rss-kv unfin  run pages  sent   ok retry 5xx lost  skip open"
    while True:
        m = await metrics(mon)
        s = {"at": time.monotonic(), "rss": read_rss(pid), "kv": m.get("kv_bytes_touched")}
        samples.append(s | {k: m.get(k) for k in GAUGES})
        mb = ["-" if x is None else f"{x / MB:.0f}" for x in (s["rss"], s["kv"], net(s))]
        g = ["-" if m.get(k) is None else f"{m[k]:.0f}" for k in GAUGES]
        if len(samples) % 6 == 1:  # a header a minute keeps the table readable
            print(head, flush=True)
        c = [t.n[k] for k in ("sent", "normal_ok", "retries", "server_5xx", "lost", "skipped")]
        row = f"{s['at'] - samples[0]['at']:7.0f} {mb[0]:>7} {mb[1]:>6} {mb[2]:>6}"
        row += f" {g[0]:>5} {g[1]:>4} {g[2]:>5} {c[0]:5d} {c[1]:4d} {c[2]:5d} {c[3]:3d} {c[4]:4d}"
        print(f"{row} {c[5]:5d} {t.open:4d}", flush=True)
        await asyncio.sleep(10)


def memory_verdict(samples: list[dict], settle_at: float, stop_at: float) -> dict:
    """Whether RSS less the KV touched (the cache fills up to its budget by design) grows
    under load after the settle point: the later half of that window against the earlier
    half, by mean (a leak climbs) and by peak (the allocator's swings are ~100 MB), each
    within 5% + 64 MB. The drain runs another mix; its high-water mark is only reported."""
    use_kv = any(s["kv"] is not None for s in samples)
    pts = [(s["at"], net(s)) for s in samples if s["rss"] and (s["kv"] is not None or not use_kv)]
    load = [(at, v) for at, v in pts if settle_at < at <= stop_at]
    if len(load) < 4:
        return {"ok": False, "why": "too few samples under load after the settle point"}
    mid = (settle_at + stop_at) / 2
    early = [v for at, v in load if at <= mid]
    late = [v for at, v in load if at > mid]
    mean_early, mean_late = sum(early) / len(early), sum(late) / len(late)
    drain = [v for at, v in pts if at > stop_at]
    return {
        "ok": mean_late <= mean_early * 1.05 + 64 * MB and max(late) <= max(early) * 1.05 + 64 * MB,
        "measure": "rss - kv_bytes_touched" if use_kv else "rss",
        "early_mean_mb": round(mean_early / MB),
        "late_mean_mb": round(mean_late / MB),
        "early_max_mb": round(max(early) / MB),
        "late_max_mb": round(max(late) / MB),
        "drain_max_mb": drain and round(max(drain) / MB),
    }


async def measure_capacity(client: httpx.AsyncClient, t: Tally, refs: dict, args) -> float:
    """Completed normal requests per second of a closed loop: the server is kept busy but
    never flooded, so this is what it sustains."""
    rng, done, stop_at = random.Random(1), [0], time.monotonic() + args.warmup_seconds

    async def worker() -> None:
        while time.monotonic() < stop_at:
            if await send_normal(client, t, *normal_request(rng), refs) is not None:
                done[0] += time.monotonic() <= stop_at

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return max(done[0] / args.warmup_seconds, 0.05)


async def offer_load(
    client: httpx.AsyncClient, t: Tally, refs: dict, rate: float, proc: subprocess.Popen, args
) -> float:
    """Open loop, as real clients arrive whatever the server's state; the seconds sent."""
    rng, probes, tasks = random.Random(0), hostile_probes(), set()
    kinds, last_big, start = sorted(probes), -1e9, time.monotonic()
    arrival = start
    while arrival < start + args.minutes * 60 and proc.poll() is None:
        arrival += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, arrival - time.monotonic()))
        u = rng.random()
        if u < 0.70:
            coro = send_normal(client, t, *normal_request(rng), refs)
        elif u < 0.85:
            kind = rng.choice(kinds)
            if kind == "body_40MB" and time.monotonic() - last_big < args.big_body_interval:
                kind = rng.choice([k for k in kinds if k != "body_40MB"])
            last_big = time.monotonic() if kind == "body_40MB" else last_big
            coro = send_hostile(client, t, kind, probes[kind])
        else:
            coro = send_abandoned(client, t, random.Random(rng.random()))
        if t.open >= args.max_open:  # keeps the client itself bounded
            coro.close()
            t.n["skipped"] += 1
            continue
        t.n["sent"], t.open = t.n["sent"] + 1, t.open + 1
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(lambda k: (tasks.discard(k), setattr(t, "open", t.open - 1)))
    sent_for = time.monotonic() - start
    print(f"stopped sending after {sent_for:.0f} s; waiting for {len(tasks)} open requests")
    await asyncio.gather(*tasks)
    return sent_for


async def phases(client: httpx.AsyncClient, mon: httpx.AsyncClient, t: Tally, proc, args) -> dict:
    """References, capacity, the load, the drain, and the references again."""
    res: dict = {}
    keys = [(u, i) for u in (COMPLETIONS, CHAT) for i in range(len(PROMPTS))]
    texts = await asyncio.gather(
        *(send_normal(client, t, k[0], greedy_body(*k), None, {}) for k in keys)
    )
    if None in texts:
        raise SystemExit(f"could not record the reference texts: {t.notes}")
    refs = dict(zip(keys, texts, strict=True))
    print(f"recorded {len(refs)} greedy reference texts; measuring capacity", flush=True)
    res["capacity"] = await measure_capacity(client, t, refs, args)
    res["rate"] = res["capacity"] * args.load
    print(f"capacity {res['capacity']:.2f} req/s; offering {res['rate']:.2f} req/s", flush=True)
    res["start"] = time.monotonic()
    res["seconds"] = await offer_load(client, t, refs, res["rate"], proc, args)
    res["exit_code"] = proc.poll()
    for _ in range(30):  # aborts reach the engine's thread a step later
        m = await metrics(mon)
        if m.get("unfinished_requests") == 0 and m.get("running_sequences") == 0:
            break
        await asyncio.sleep(1)
    res["after_drain"] = {k: m.get(k) for k in GAUGES}
    try:
        res["health"] = (await mon.get("/health", timeout=30)).status_code
    except httpx.HTTPError as e:
        res["health"] = repr(e)
    before = (t.n["greedy_mismatches"], t.n["lost"])
    again = await asyncio.gather(
        *(send_normal(client, t, k[0], greedy_body(*k), k[1], refs) for k in keys)
    )
    res["refs_ok"] = None not in again and (t.n["greedy_mismatches"], t.n["lost"]) == before
    return res


async def soak(args: argparse.Namespace, base: str, proc: subprocess.Popen) -> dict:
    t, samples = Tally(), []
    limits = httpx.Limits(max_connections=args.max_open + 16, max_keepalive_connections=64)
    auth = {"authorization": f"Bearer {KEY}"}
    async with (
        httpx.AsyncClient(base_url=base, headers=auth, limits=limits) as client,
        httpx.AsyncClient(base_url=base, headers=auth) as mon,  # never queued behind the load
    ):
        watch = asyncio.create_task(sampler(mon, proc.pid, t, samples))
        try:
            res = await phases(client, mon, t, proc, args)
        finally:
            watch.cancel()
        m = await metrics(mon)
        samples.append(
            {"at": time.monotonic(), "rss": read_rss(proc.pid), "kv": m.get("kv_bytes_touched")}
        )
    settle_at = res["start"] + args.settle_minutes * 60
    res["memory"] = memory_verdict(samples, settle_at, res["start"] + res["seconds"])
    near = min(samples, key=lambda s: abs(s["at"] - settle_at))
    ends = (("start", samples[0]), ("settle", near), ("end", samples[-1]))
    res["rss_mb"] = {k: s["rss"] and round(s["rss"] / MB) for k, s in ends}
    res["samples"] = [{**s, "at": round(s["at"] - samples[0]["at"], 1)} for s in samples]
    return res | {"tally": t}


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prefixflow", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--kv-cache-memory", "512MiB", "--api-key", KEY, *shlex.split(args.server_args)]
    cap = int(args.server_memory_limit * 1024**3)

    def limit() -> None:
        if cap:
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    print(f"server: {shlex.join(cmd)}\nserver log: {log}", flush=True)
    proc = subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=limit,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"the server did not come up; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def report(res: dict) -> dict:
    t: Tally = res["tally"]
    after = res["after_drain"]
    drained = after["unfinished_requests"] == 0 == after["running_sequences"]
    lossless = not (t.n["lost"] or t.n["duplicated"] or t.n["greedy_mismatches"])
    verdict = {
        "memory_flat": res["memory"]["ok"],
        "no_loss_or_dup": lossless and res["refs_ok"] and drained,
        "no_5xx": t.n["server_5xx"] == 0 and res["health"] == 200 and res["exit_code"] is None,
    }
    probes = {k: {**p, "statuses": dict(p["statuses"])} for k, p in sorted(t.probes.items())}
    summary = {
        "minutes_sent": round(res["seconds"] / 60, 2),
        "capacity_rps": round(res["capacity"], 2),
        "offered_rps": round(res["rate"], 2),
        **{f"statuses_{k}": dict(sorted(v.items())) for k, v in sorted(t.statuses.items())},
        **{k: t.n[k] for k in ("sent", "skipped", "retries", "turned_away", "lost", "duplicated")},
        **{k: t.n[k] for k in ("greedy_mismatches", "server_5xx")},
        "after_drain": after,
        "health_after": res["health"],
        "server_exit_code": res["exit_code"],
        "references_after": res["refs_ok"],
        "rss_mb": res["rss_mb"],
        "memory": res["memory"],
    }
    print("\n==== soak summary ====")
    for k, v in summary.items():
        print(f"{k:>20}: {v}")
    print(f"\n{'hostile probe':<20} {'max s':>6} {'refusal s':>9}  statuses")
    for k, p in probes.items():
        slow = "  SLOW" if p["max_refusal_s"] > SLOW_REFUSAL_S else ""
        print(f"{k:<20} {p['max_s']:6.2f} {p['max_refusal_s']:9.2f}  {p['statuses']}{slow}")
    for k, note in sorted(t.notes.items()):
        example = {a: b for a, b in note.items() if a != "count"}
        print(f"{k} x{note['count']}: {json.dumps(example)[:400]}")
    print()
    for name, ok in verdict.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    extra = {"probes": probes, "notes": t.notes, "samples": res["samples"]}
    return summary | {"verdict": verdict} | extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--warmup-seconds", type=float, default=60.0, help="capacity measurement")
    ap.add_argument("--settle-minutes", type=float, default=3.0)
    ap.add_argument("--load", type=float, default=2.0, help="offered rate / capacity")
    ap.add_argument("--concurrency", type=int, default=16, help="of the capacity loop")
    ap.add_argument("--max-open", type=int, default=512, help="client's cap on open requests")
    ap.add_argument("--big-body-interval", type=float, default=60.0, help="s between 40 MB bodies")
    ap.add_argument(
        "--server-args", default="", help='serve flags: --server-args="--max-queued-requests 64"'
    )
    ap.add_argument("--server-memory-limit", type=float, default=8.0, help="GiB; 0: none")
    ap.add_argument("--json", type=Path, help="write the summary here too")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkdtemp(prefix="soak-server-")) / "server.log"
    proc = start_server(args, port, log)
    try:
        res = asyncio.run(soak(args, f"http://127.0.0.1:{port}", proc))
    finally:
        stop_server(proc)
    summary = report(res)
    print(f"server log: {log}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    sys.exit(0 if all(summary["verdict"].values()) else 1)


if __name__ == "__main__":
    main()
