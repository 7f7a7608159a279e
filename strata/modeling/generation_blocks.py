"""Block generation: K decoding steps per block in a tight loop inside the model.

`BlockGenerationMixin` keeps `generate()` exactly as Transformers defines it (argument
handling, generation config, logits processors and warpers, stopping criteria, stop
strings, cache preparation) and replaces only the decoding loop of greedy search and
sampling (`_sample`). Each step applies the processors to the last logits, picks a
token, checks the stopping criteria and runs one cached forward of the model; after
every K tokens (``config.block_size``), or at the end, the block goes to the streamer
at once. Modes this loop does not cover (beam search, assisted decoding, per-step
attentions or hidden states, synced GPUs, generation without cache) fall back to the
Transformers implementation, which works with `RecurrentCache` too.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput


class BlockGenerationMixin(GenerationMixin):
    def decode_step(self, tokens: torch.LongTensor, cache, attention_mask) -> torch.Tensor:
        """Logits (B, V) of the next token after feeding ``tokens`` (B, 1) through the cache."""
        out = self(input_ids=tokens, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
        return out.logits[:, -1]

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        cfg = generation_config
        if synced_gpus or not model_kwargs.get("use_cache", True) or cfg.output_attentions or cfg.output_hidden_states:
            return GenerationMixin._sample(self, input_ids, logits_processor, stopping_criteria, cfg,
                                           synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        block_size = self.config.block_size
        want_scores = cfg.return_dict_in_generate and cfg.output_scores
        want_logits = cfg.return_dict_in_generate and cfg.output_logits
        scores, raw_logits = (() if want_scores else None), (() if want_logits else None)
        pad = cfg._pad_token_tensor
        has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        if has_eos and pad is None:
            raise ValueError("generation with an EOS token needs `pad_token_id` to fill finished rows")

        # Prefill: the tokens that the cache has not seen yet.
        cache = model_kwargs.get("past_key_values")
        mask = model_kwargs.get("attention_mask")
        seen = cache.get_seq_length() if cache is not None else 0
        if seen >= input_ids.shape[1]:
            raise ValueError(
                f"the cache has already seen {seen} tokens but `input_ids` holds only {input_ids.shape[1]}: "
                "pass the whole sequence, ending with at least one token the cache has not seen"
            )
        out = self(input_ids=input_ids[:, seen:], attention_mask=mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        del out

        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        block_start = input_ids.shape[1]
        done = False
        while not done:
            for _ in range(block_size):
                logits = logits.float()
                step_scores = logits_processor(input_ids, logits)
                if want_scores:
                    scores += (step_scores,)
                if want_logits:
                    raw_logits += (logits,)
                if cfg.do_sample:
                    next_tokens = torch.multinomial(step_scores.softmax(-1), num_samples=1).squeeze(1)
                else:
                    next_tokens = step_scores.argmax(-1)
                if has_eos:
                    next_tokens = torch.where(unfinished, next_tokens, pad)
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
                unfinished = unfinished & ~stopping_criteria(input_ids, scores)
                if not bool(unfinished.any()):
                    done = True
                    break
                logits = self.decode_step(input_ids[:, -1:], cache, mask)
            if streamer is not None:
                streamer.put(input_ids[:, block_start:].cpu())
            block_start = input_ids.shape[1]

        if streamer is not None:
            streamer.end()
        if cfg.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits,
                                             past_key_values=cache)
        return input_ids
