"""Reading back an interrupted run's output: what to skip, and the cut-off last line removed."""

from __future__ import annotations

import json

from prefixflow.entrypoints.batch_resume import read_done
from prefixflow.errors import RequestError
from prefixflow.inputs.batch_file import error_line, result_line


def lines(*objs: dict) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def test_missing_output_means_nothing_done(tmp_path):
    done = read_done(tmp_path / "none.jsonl")
    assert done.count == 0 and not done.custom_ids and not done.line_numbers


def test_whole_lines_are_done_and_a_cut_off_last_line_is_removed(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = lines(
        result_line("a", {"x": 1}),
        error_line(None, RequestError("invalid JSON"), 7),
        error_line("c", RequestError("max_tokens must be >= 1"), 9),
    )
    out.write_bytes(whole + b'{"id": "batch_req_1", "custom_id": "b", "respo')
    done = read_done(out)
    assert done.count == 3
    assert done.custom_ids == {"a", "c"}
    assert done.line_numbers == {7, 9}
    assert done.truncated_bytes > 0
    assert out.read_bytes() == whole
    assert done.covers(7, None) and done.covers(3, "a") and not done.covers(8, "b")


def test_a_torn_line_ends_what_counts_as_done(tmp_path):
    out = tmp_path / "out.jsonl"
    first = lines(result_line("a", {}))
    out.write_bytes(first + b"\x00\x00garbage\n" + lines(result_line("z", {})))
    done = read_done(out)
    assert done.custom_ids == {"a"}
    assert out.read_bytes() == first


def test_complete_output_is_left_untouched(tmp_path):
    out = tmp_path / "out.jsonl"
    data = lines(result_line("a", {}), result_line("b", {}))
    out.write_bytes(data)
    done = read_done(out)
    assert done.custom_ids == {"a", "b"} and done.truncated_bytes == 0
    assert out.read_bytes() == data
