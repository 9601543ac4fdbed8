"""Host-side tokenization: chat templates, left padding into length buckets, the shared-prefix
split, candidate padding and decoding, on SmolLM2's real tokenizer and a tiny BPE tokenizer
with a Llama-3-style template (a template-written BOS, and a post-processor that would add a
second one if special tokens were not switched off)."""

from __future__ import annotations

import numpy as np
import pytest

from rllama_jax.tokenization import (
    LENGTH_BUCKETS,
    bucket_length,
    decode_responses,
    encode_candidates,
    encode_chat_batch,
    encode_chat_suffixes,
    left_pad,
    split_shared_prefix,
)

SYSTEM = """You are an expert blackjack player. Follow these rules:
        1. ALWAYS hit if your total is 11 or below
        2. With 12-16: hit if dealer shows 7+, stay if 6 or lower
        3. ALWAYS stay if your total is 17+ without an ace
        4. With a usable ace: hit if total is 17 or below"""

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def observation(total: int, dealer: int, ace: bool) -> str:
    return f"Current hand total: {total}\nDealer's card: {dealer}\nUsable ace: {'yes' if ace else 'no'}"


def conversations() -> list[list[dict]]:
    convs = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": observation(*o)}]
        for o in [(12, 10, False), (20, 3, True), (7, 11, False)]
    ]
    # A longer row (a second turn), so rows differ in length by more than a few tokens.
    convs.append(
        convs[0]
        + [
            {"role": "assistant", "content": "hit"},
            {"role": "user", "content": observation(19, 10, False)},
        ]
    )
    return convs


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from rllama_jax.models.loading import default_model_dir, load_tokenizer

    return load_tokenizer(default_model_dir())


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([SYSTEM, observation(17, 10, True), "hit stay\n\n go west"], trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.fixture(params=["smollm2", "tiny"])
def tokenizer(request, smollm2_tokenizer, tiny_tokenizer):
    return smollm2_tokenizer if request.param == "smollm2" else tiny_tokenizer


def template_ids(tokenizer, conv, add_generation_prompt=True) -> list[int]:
    """The reference: transformers' own tokenized chat template."""
    out = tokenizer.apply_chat_template(
        conv, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def real_rows(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    return [t[m.astype(bool)].tolist() for t, m in zip(tokens, mask, strict=True)]


def test_buckets_are_increasing_powers_of_two():
    assert list(LENGTH_BUCKETS) == sorted(LENGTH_BUCKETS)
    assert all(b & (b - 1) == 0 for b in LENGTH_BUCKETS)
    assert bucket_length(1) == 32 and bucket_length(32) == 32 and bucket_length(33) == 64
    assert bucket_length(64) == 64 and bucket_length(65) == 128
    assert bucket_length(4096) == 4096
    with pytest.raises(ValueError, match="exceeds"):
        bucket_length(4097)


def test_left_pad_right_aligns_rows():
    tokens, mask = left_pad([[5, 6, 7], [8]], 4, pad_id=9)
    np.testing.assert_array_equal(tokens, [[9, 5, 6, 7], [9, 9, 9, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert tokens.dtype == np.int32 and mask.dtype == np.int32
    with pytest.raises(ValueError):
        left_pad([[1, 2, 3]], 2)


def test_encode_chat_batch_matches_template_and_left_pads(tokenizer):
    convs = conversations()
    tokens, mask = encode_chat_batch(tokenizer, convs)
    refs = [template_ids(tokenizer, c) for c in convs]
    lengths = [len(r) for r in refs]
    assert len(set(lengths)) > 1
    assert tokens.shape == mask.shape == (len(convs), bucket_length(max(lengths)))
    assert tokens.dtype == np.int32
    assert real_rows(tokens, mask) == refs
    # Left padding: each row is zeros then ones, ending on a real token.
    for row, n in zip(mask, lengths, strict=True):
        assert row.tolist() == [0] * (len(row) - n) + [1] * n
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    assert np.all(tokens[mask == 0] == pad)


def test_encode_chat_batch_bucket_choice(smollm2_tokenizer):
    short = [[{"role": "user", "content": "hi"}]]
    tokens, _ = encode_chat_batch(smollm2_tokenizer, short)
    assert tokens.shape[1] == bucket_length(len(template_ids(smollm2_tokenizer, short[0])))
    assert tokens.shape[1] in (32, 64)
    # SmolLM2's template adds its default system prompt: ~30 tokens; ~70 more words go past 64.
    long = [[{"role": "user", "content": " ".join(["word"] * 70)}]]
    n = len(template_ids(smollm2_tokenizer, long[0]))
    assert 64 < n <= 128
    tokens, mask = encode_chat_batch(smollm2_tokenizer, long + short, pad_id=7)
    assert tokens.shape == (2, 128) and mask[0].sum() == n
    assert np.all(tokens[mask == 0] == 7)
    tokens, _ = encode_chat_batch(smollm2_tokenizer, long, buckets=(2 * n, n - 1, n))
    assert tokens.shape[1] == n
    tokens, _ = encode_chat_batch(smollm2_tokenizer, long, buckets=(n - 1, 2 * n))
    assert tokens.shape[1] == 2 * n
    with pytest.raises(ValueError, match="exceeds"):
        encode_chat_batch(smollm2_tokenizer, long, buckets=(32,))


def test_add_generation_prompt_flag(smollm2_tokenizer):
    conv = conversations()[0]
    with_prompt, m1 = encode_chat_batch(smollm2_tokenizer, [conv])
    without, m2 = encode_chat_batch(smollm2_tokenizer, [conv], add_generation_prompt=False)
    assert real_rows(without, m2)[0] == template_ids(smollm2_tokenizer, conv, False)
    assert m1.sum() > m2.sum()


def test_round_trip_decode(tokenizer):
    convs = conversations()
    tokens, mask = encode_chat_batch(tokenizer, convs)
    texts = decode_responses(tokenizer, tokens, mask, skip_special_tokens=False)
    for text, conv in zip(texts, convs, strict=True):
        assert text == tokenizer.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=True
        )
    plain = decode_responses(tokenizer, tokens, mask)
    assert all(SYSTEM in t for t in plain)
    assert all("<|" not in t for t in plain)


def test_decode_responses_uses_mask_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    replies = ["stay", "I would hit here."]
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in replies]
    n = max(len(i) for i in ids) + 2
    tokens = np.full((2, n), 999, np.int32)  # junk after each reply must not be decoded
    mask = np.zeros((2, n), bool)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
        tokens[i, len(x)] = tok.eos_token_id
        mask[i, : len(x) + 1] = True
    assert decode_responses(tok, tokens, mask) == replies


def test_shared_prefix_plus_suffix_is_full_encoding(tokenizer):
    convs = conversations()
    prefix = split_shared_prefix(tokenizer, SYSTEM)
    assert prefix.dtype == np.int32 and len(prefix) > 10
    tokens, mask = encode_chat_suffixes(tokenizer, convs, prefix)
    suffixes = real_rows(tokens, mask)
    for conv, suffix in zip(convs, suffixes, strict=True):
        assert prefix.tolist() + suffix == template_ids(tokenizer, conv)
    assert tokens.shape[1] == bucket_length(max(len(s) for s in suffixes))
    # The prefix is the system message's own rendering (first token: the template's BOS /
    # <|im_start|>, not a doubled one).
    ref = template_ids(tokenizer, [{"role": "system", "content": SYSTEM}], False)
    assert prefix.tolist() == ref


def test_shared_prefix_mismatch_raises(tokenizer):
    prefix = split_shared_prefix(tokenizer, SYSTEM)
    other = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]]
    with pytest.raises(ValueError, match="shared prefix"):
        encode_chat_suffixes(tokenizer, other, prefix)


def test_encode_candidates_pads_rows_and_tokens(tokenizer):
    cands = [["hit", "stay"], ["go west", "look", "inventory please"], ["stay"]]
    tokens, mask, action_mask = encode_candidates(tokenizer, cands)
    ids = [[tokenizer(s, add_special_tokens=False)["input_ids"] for s in row] for row in cands]
    c = max(len(x) for row in ids for x in row)
    assert c >= 2
    assert tokens.shape == mask.shape == (3, 3, c)
    np.testing.assert_array_equal(action_mask, [[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    for i, row in enumerate(ids):
        for j in range(3):
            if j < len(row):
                n = len(row[j])
                assert tokens[i, j, :n].tolist() == row[j]
                assert mask[i, j].tolist() == [1] * n + [0] * (c - n)
            else:
                assert mask[i, j].sum() == 0
    # Fixed shapes for a run, and errors instead of silent truncation.
    tokens, mask, action_mask = encode_candidates(tokenizer, cands, max_actions=5, max_tokens=c + 3)
    assert tokens.shape == (3, 5, c + 3) and action_mask.shape == (3, 5)
    assert action_mask.sum() == 6 and mask.sum() == sum(len(x) for row in ids for x in row)
    with pytest.raises(ValueError, match="max_actions"):
        encode_candidates(tokenizer, cands, max_actions=2)
    with pytest.raises(ValueError, match="max_tokens"):
        encode_candidates(tokenizer, cands, max_tokens=c - 1)
    with pytest.raises(ValueError, match="no token"):
        encode_candidates(tokenizer, [["hit", ""]])
