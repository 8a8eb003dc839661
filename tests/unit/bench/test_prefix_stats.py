from prefixflow.bench.prefix_stats import prefix_stats


def test_shared_prefix_counted_once():
    s = prefix_stats([[1, 2, 3, 4], [1, 2, 3, 5], [9]], [[2], [2], [1]])
    assert s.prompt_tokens == 9
    assert s.distinct_prompt_tokens == 6  # 1,2,3 shared; 4; 5; 9
    assert s.output_tokens == 5
    assert s.decode_steps == 2
    # step 0: 6 distinct prompt tokens; step 1: 6 + one output token for each of 2 live seqs
    assert s.kv_token_reads == 6 + (6 + 2)


def test_attention_pairs():
    s = prefix_stats([[1, 2]], [[1, 1]])  # one prompt, two samples of one token each
    # prompt tokens see 1 and 2 keys; each output token sees 2 prompt keys + itself
    assert s.attention_pairs == 1 + 2 + 2 * 3
