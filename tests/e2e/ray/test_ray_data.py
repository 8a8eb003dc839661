"""prefixflow.ray.build_processor on a local Ray cluster (2 replicas, 2 CPUs): one output
row per input row, with the greedy text of one process, and rows under one prefix on the
replica that computed it."""

from __future__ import annotations

import pytest

from prefixflow import SamplingParams
from tests.prompts import PARAGRAPHS

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")


def test_processor_returns_one_row_per_input_row(llm_f32):
    doc = " ".join(PARAGRAPHS[:4])
    rows = [{"prompt": f"{doc}\nQuestion {i}: what is this about?", "id": i} for i in range(4)]
    rows += [{"prompt": f"Say something about the number {i}.", "id": 10 + i} for i in range(3)]
    from prefixflow.ray import build_processor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        processor = build_processor(
            replicas=2,
            sampling_params={"temperature": 0, "max_tokens": 8, "ignore_eos": True},
            dtype="float32",
            kv_cache_memory="256MiB",
        )
        out = processor(ray.data.from_items(rows)).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    want = llm_f32.generate(
        [r["prompt"] for r in rows],
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    by_id = {r["id"]: r for r in out}
    for row, w in zip(rows, want, strict=True):
        got = by_id[row["id"]]
        assert got["generated_text"] == w.outputs[0].text
        assert got["num_input_tokens"] == len(w.prompt_token_ids)
        assert got["num_generated_tokens"] == 8 and got["finish_reason"] == "length"
    # The four questions on one document went to one replica: three of them read it.
    cached = sorted(by_id[i]["num_cached_tokens"] for i in range(4))
    half = len(want[0].prompt_token_ids) // 2
    assert cached[0] == 0 and all(c >= half for c in cached[1:])
