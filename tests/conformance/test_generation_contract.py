"""Block generation: K tokens per block, HF semantics, streamers, caches across calls."""

import pytest
import torch
from architectures import CASES, MAIN_CASES, case_id
from test_model_contract import build, random_ids
from transformers import GenerationMixin, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from strata import RecurrentCache


def hf_generate(model, ids, **kwargs):
    """The plain Transformers token-by-token loop, for comparison."""
    return model.generate(ids, custom_generate=GenerationMixin._sample, **kwargs)


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("case", CASES, ids=case_id)
@torch.no_grad()
def test_greedy_block_generation_equals_token_by_token(case):
    model = build(case, block_size=4)
    ids = random_ids(model, batch=2, length=7)
    ours = model.generate(ids, max_new_tokens=11, do_sample=False)
    theirs = hf_generate(model, ids, max_new_tokens=11, do_sample=False)
    assert ours.shape == (2, 18)
    assert torch.equal(ours, theirs)
    # and equals plain argmax decoding with full forwards (no cache at all)
    seq = ids
    for _ in range(11):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours, seq)


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
@torch.no_grad()
def test_sampling_with_processors_matches_hf_loop(case):
    model = build(case, block_size=3)
    ids = random_ids(model, batch=2, length=5)
    kwargs = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3,
                  min_new_tokens=4, max_new_tokens=9)
    torch.manual_seed(123)
    ours = model.generate(ids, **kwargs)
    torch.manual_seed(123)
    theirs = hf_generate(model, ids, **kwargs)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
@torch.no_grad()
def test_streamer_gets_blocks_and_eos_truncates(case):
    k = 4
    model = build(case, block_size=k)
    ids = random_ids(model, batch=1, length=6)
    free = model.generate(ids, max_new_tokens=10, do_sample=False)[0, 6:]
    streamer = RecordingStreamer()
    out = model.generate(ids, max_new_tokens=10, do_sample=False, streamer=streamer)
    assert streamer.ended
    assert torch.equal(streamer.puts[0], ids)  # the prompt first, as in Transformers
    sizes = [p.shape[-1] for p in streamer.puts[1:]]
    assert sizes == [4, 4, 2]  # blocks of K, the last one cut at max_new_tokens
    assert torch.equal(torch.cat([p.reshape(-1) for p in streamer.puts[1:]]), out[0, 6:])

    # EOS: stop exactly at the first occurrence of the 3rd generated token.
    eos = int(free[2])
    first = int((free == eos).nonzero()[0])
    streamer = RecordingStreamer()
    out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, streamer=streamer)
    assert out.shape[1] == 6 + first + 1 and int(out[0, -1]) == eos
    assert [p.shape[-1] for p in streamer.puts[1:]] == [first + 1]


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
@torch.no_grad()
def test_finished_rows_are_padded(case):
    model = build(case, block_size=2)
    ids = random_ids(model, batch=2, length=6)
    free = model.generate(ids, max_new_tokens=8, do_sample=False)
    eos = int(free[0, 7])  # row 0 stops at its 2nd token (or earlier)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    theirs = hf_generate(model, ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, theirs)
    row0 = out[0, 6:].tolist()
    stop = row0.index(eos)
    assert all(t == 0 for t in row0[stop + 1 :])


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
@torch.no_grad()
def test_return_dict_scores_and_cache_continuation(case):
    model = build(case, block_size=4)
    ids = random_ids(model, batch=2, length=6)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    theirs = hf_generate(model, ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, output_logits=True)
    assert torch.equal(out.sequences, theirs.sequences)
    assert len(out.scores) == 6 and len(out.logits) == 6
    for a, b in zip(out.scores, theirs.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    cache = out.past_key_values
    assert isinstance(cache, RecurrentCache)
    assert cache.get_seq_length() == 6 + 6 - 1  # the last token is not fed yet

    # A second generate call continues from the cache exactly as a fresh call on the whole text.
    extra = random_ids(model, batch=2, length=3, seed=9)
    longer = torch.cat([out.sequences, extra], 1)
    continued = model.generate(longer, past_key_values=cache, max_new_tokens=5, do_sample=False)
    fresh = model.generate(longer, max_new_tokens=5, do_sample=False)
    assert torch.equal(continued, fresh)


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
@torch.no_grad()
def test_left_padded_generation_equals_rows_alone(case):
    model = build(case, block_size=3)
    ids = random_ids(model, batch=2, length=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = model.config.pad_token_id
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    for row, p in enumerate([0, 3]):
        alone = model.generate(ids[row : row + 1, p:], max_new_tokens=7, do_sample=False)
        assert torch.equal(batch[row, 8:], alone[0, 8 - p :])


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
@torch.no_grad()
def test_beam_search_is_delegated_and_scores_are_consistent(case):
    """Beam search runs through Transformers with RecurrentCache.reorder_cache; the best
    beam's score must equal its log-probability recomputed without a cache."""
    model = build(case)
    ids = random_ids(model, batch=1, length=5)
    out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, length_penalty=0.0,
                         return_dict_in_generate=True, output_scores=True, early_stopping=True)
    best = out.sequences[0]
    logprobs = model(best[None]).logits[0, :-1].float().log_softmax(-1)
    recomputed = logprobs[torch.arange(4, best.shape[0] - 1), best[5:]].sum()
    torch.testing.assert_close(out.sequences_scores[0], recomputed, atol=1e-3, rtol=0)


@pytest.mark.parametrize("case", MAIN_CASES, ids=case_id)
@torch.no_grad()
def test_text_iterator_streamer_yields_the_generated_text(case, char_tokenizer):
    model = build(case, vocab_size=len(char_tokenizer), block_size=4)
    enc = char_tokenizer("To be, or not", return_tensors="pt")
    streamer = TextIteratorStreamer(char_tokenizer, skip_prompt=True)
    out = model.generate(**enc, max_new_tokens=9, do_sample=False, streamer=streamer)
    text = "".join(streamer)
    assert text == char_tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
