"""`DecoderRunner` driven by hand, as a serving engine drives it: its own block ids, a prompt
prefilled in two calls (the second starting where the first left off, as after a prefix-cache
hit or an earlier chunk), then decode steps of several sequences at their own positions.
Reference: the transformers model in fp32, with the compiled model in exact numerics."""

from __future__ import annotations

import pytest
import torch

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import hf_logits, random_prompts, save_source
from optimum_npu import RBLNLlamaForCausalLM

MAX_SEQ_LEN, CHUNK = 256, 64
EXACT_LOGITS_ATOL = 1e-4  # fp32 rounding only: the device adds the same products in another order


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("src") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def model(source):
    m = RBLNLlamaForCausalLM.from_pretrained(
        source[0], export=True, rbln_batch_size=2, rbln_decoder_batch_sizes=[2, 1], rbln_max_seq_len=MAX_SEQ_LEN,
        rbln_prefill_chunk_size=CHUNK, rbln_numerics="exact")
    yield m
    m.close()


def test_runner_describes_what_was_compiled(model):
    runner = model.runner
    assert (runner.layout.block_size, runner.layout.num_blocks, runner.layout.max_blocks_per_seq) == (MAX_SEQ_LEN, 2, 1)
    assert (runner.max_seq_len, runner.prefill_chunk_size, runner.decoder_batch_sizes) == (MAX_SEQ_LEN, CHUNK, (2, 1))
    assert runner.vocab_size == model.config.vocab_size


def test_prefill_in_two_calls_then_batched_decode_match_transformers(model, source):
    hf = source[1]
    runner = model.runner
    first, second = random_prompts((90, 40), seed=31)
    # The engine's own block ids: the first sequence in block 1, the second in block 0.
    tables = torch.tensor([[1], [0]], dtype=torch.int32)
    clock = runner.clock_s
    head = runner.prefill(first[:70], tables[0], start=0)  # two chunks, the second padded
    last_first = runner.prefill(first[70:], tables[0], start=70)  # the rest: from position 70 on
    last_second = runner.prefill(second, tables[1])
    assert runner.clock_s > clock  # simulated time passes
    assert head.dtype == torch.float32 and head.shape == (model.config.vocab_size,)
    torch.testing.assert_close(head, hf_logits(hf, first[:70])[-1], atol=EXACT_LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(last_first, hf_logits(hf, first)[-1], atol=EXACT_LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(last_second, hf_logits(hf, second)[-1], atol=EXACT_LOGITS_ATOL, rtol=0)

    # Decode both sequences together, each at its own position, teacher forced with HF's greedy tokens.
    sequences = [first, second]
    logits = torch.stack([last_first, last_second])
    for _ in range(3):
        tokens = logits.argmax(-1)
        positions = torch.tensor([s.shape[0] for s in sequences])
        sequences = [torch.cat([s, t[None]]) for s, t in zip(sequences, tokens)]
        logits = runner.decode(tokens, positions, tables)
        assert logits.shape == (2, model.config.vocab_size)
        for row, sequence in enumerate(sequences):
            torch.testing.assert_close(logits[row], hf_logits(hf, sequence)[-1], atol=EXACT_LOGITS_ATOL, rtol=0)

    # One sequence alone runs in the bucket of 1; its KV cache is what the steps above wrote.
    tokens = logits[1:].argmax(-1)
    alone = runner.decode(tokens, torch.tensor([sequences[1].shape[0]]), tables[1:])
    expected = hf_logits(hf, torch.cat([sequences[1], tokens]))[-1]
    torch.testing.assert_close(alone[0], expected, atol=EXACT_LOGITS_ATOL, rtol=0)


def test_runner_refuses_what_the_graphs_cannot_run(model):
    runner = model.runner
    tables = torch.zeros((3, 1), dtype=torch.int32)
    with pytest.raises(ValueError, match=r"batch of 3 sequences is larger than the compiled decode batch sizes \[1, 2\]"):
        runner.decode(torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3]), tables)
    with pytest.raises(ValueError, match="one of each per sequence"):
        runner.decode(torch.tensor([5, 6]), torch.tensor([1]), tables[:2])
    with pytest.raises(ValueError, match=r"positions \[256\] must be in 0..255"):
        runner.decode(torch.tensor([5]), torch.tensor([MAX_SEQ_LEN]), tables[:1])
    with pytest.raises(ValueError, match="more than max_blocks_per_seq=1"):
        runner.prefill(torch.tensor([5, 6]), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="covers 0 positions"):
        runner.prefill(torch.tensor([5, 6]), torch.tensor([], dtype=torch.int32))
    # A chunk of 64 from position 200 would write K/V up to 263, past the 256 the sequence has; moving
    # it back would need the tokens before 200, which this call does not have.
    with pytest.raises(ValueError, match="would write K/V up to position 263"):
        runner.prefill(torch.tensor([5] * 20), torch.tensor([0], dtype=torch.int32), start=200)
    with pytest.raises(ValueError, match="embeds needs a model compiled with rbln_use_inputs_embeds=True"):
        runner.prefill(torch.tensor([5]), torch.tensor([0], dtype=torch.int32), embeds=torch.zeros(1, 64))


def test_host_embedding_of_a_vocabulary_split_model_is_the_whole_table(source):
    """Split over 2 devices, the embedding table is cut by vocabulary: the host lookup for
    rbln_use_inputs_embeds puts the ranks' rows back together (the first rank alone holds half)."""
    hf = source[1]
    model = RBLNLlamaForCausalLM.from_pretrained(
        source[0], export=True, rbln_batch_size=1, rbln_max_seq_len=MAX_SEQ_LEN, rbln_prefill_chunk_size=CHUNK,
        rbln_numerics="exact", rbln_use_inputs_embeds=True, rbln_tensor_parallel_size=2)
    try:
        assert "embed_tokens.weight" in model.runtimes["prefill"].program.tensor_shards
        table = model.runner.embedding_weight
        torch.testing.assert_close(table.float(), hf.model.embed_tokens.weight.float(), atol=0, rtol=0)
        ids, = random_prompts((20,), seed=33)
        out = model.generate(input_ids=ids[None], max_new_tokens=3, do_sample=False)
        expected = hf.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=3,
                               do_sample=False)
        assert out[0, -3:].tolist() == expected[0, -3:].tolist()
    finally:
        model.close()
