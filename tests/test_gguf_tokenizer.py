"""The tokenizer built from GGUF metadata without torch, against transformers' own GGUF
tokenizer loader (which needs torch) on the default model's file and on tiny synthetic files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
from transformers import AutoTokenizer

import rllama_jax
from rllama_jax.models import loading
from rllama_jax.models.errors import UnsupportedArchitectureError
from rllama_jax.models.gguf_format import _byte_alphabet, tokenizer_from_gguf

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
BLACKJACK = """You are an expert blackjack player. Follow these rules:
        1. ALWAYS hit if your total is 11 or below
        2. With 12-16: hit if dealer shows 7+, stay if 6 or lower
Current hand total: 21
Dealer's card: 10
Usable ace: no
Answer with "hit" or "stay"."""
TMAZE = (
    "You are in a T-maze. At the start you saw a LEFT cue.\n\nYou reach the junction.\t"
    "Actions: 0 = left, 1 = right.  Reply with the action's number:  1"
)
CHATS = [
    [{"role": "user", "content": "Name three colours."}],
    [
        {"role": "system", "content": BLACKJACK},
        {"role": "user", "content": "Current hand total: 17\nDealer's card: 7"},
    ],
    [
        {"role": "user", "content": TMAZE},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Café  déjà vu 🎲🃏 — 1234567 <|endoftext|> ok?"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  \n\n  21 "}],
]


def sample_strings() -> list[str]:
    """A few hundred strings: fixed cases (numbers, whitespace runs, special tokens, prompts)
    and random ASCII / unicode mixes seeded for reproducibility."""
    fixed = [
        "", " ", "  ", "\n", "\n\n", "\t", " \t \n", "21", " 21", "  21", "1234567", " 1234567",
        "3.14159", "-42", "1,000,000", "x  21", "a\n\n1", "\t\t3", "total:  17", "0", "007",
        "Hello world", " Hello world", "hello   world   ", "don't you'll we've I'm",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n",
        "text<|im_end|>more", " <|endoftext|> ", "<|im_start|><|im_end|><|endoftext|>",
        "<|im_start", "im_end|>", "<repo_name>x<file_sep>", "<|IM_END|>",
        "café naïve résumé façade Ångström Ærø straße", "ÀÉÎÕÜ àéîõü ñ Ñ ç",
        "emoji 😀🎉👍🏽 👨‍👩‍👧 🇫🇷 ❤️", "日本語のテキスト", "中文 繁體", "한국어", "Ελληνικά Кириллица",
        "العربية עברית", "हिन्दी", "e\u0301 combining", "zero\u200bwidth", "\u00a0nbsp\u3000ideographic",
        "\x00\x01\x07 controls \x7f", "tab\tsep\tvalues\n", "\r\nwindows\r\n", "🃏 stay", "👉 hit",
        BLACKJACK, TMAZE, "def f(x):\n    return x ** 2  # square\n", "    indented\n        more",
        "URL https://example.com/a?b=1&c=2#frag", "{\"json\": [1, 2, 3], \"k\": null}",
    ]  # fmt: skip
    rng = random.Random(0)
    ascii_chars = [chr(c) for c in range(32, 127)] + ["\n", "\t", " ", " ", " "]
    unicode_chars = (
        ascii_chars
        + list("éèêëàâäôöûüçñßøåæœ€£¥©®°±µ¶·×÷")
        + ["😀", "🎲", "🃏", "👍", "🏽", "\u200d", "❤", "\ufe0f", "日", "本", "語", "한", "Ж", "λ"]
        + ["\u0301", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\r"]
        + ["0", "1", "2", "9", "½", "²", "٣"]
    )
    out = list(fixed)
    for _ in range(120):
        out.append("".join(rng.choice(ascii_chars) for _ in range(rng.randint(1, 60))))
    for _ in range(120):
        out.append("".join(rng.choice(unicode_chars) for _ in range(rng.randint(1, 60))))
    for _ in range(60):  # words, numbers, whitespace runs and special tokens mixed
        parts = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            if kind < 0.3:
                parts.append(
                    rng.choice(["hit", "stay", "Dealer", "total", "ace", "left", "T-maze"])
                )
            elif kind < 0.55:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
            elif kind < 0.8:
                parts.append("".join(rng.choice(" \n\t") for _ in range(rng.randint(1, 5))))
            else:
                parts.append(rng.choice(SPECIALS))
        out.append("".join(parts))
    return out


STRINGS = sample_strings()


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return loading.smollm2_gguf_path()


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' GGUF tokenizer loader (the one this module replaces; it imports torch)."""
    return AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


@pytest.fixture(scope="module")
def ours(gguf_path):
    return tokenizer_from_gguf(gguf_path)


def test_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert _byte_alphabet() == bytes_to_unicode()


def test_backend_and_special_tokens_match_reference(ours, reference):
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(
        reference.backend_tokenizer.to_str()
    )
    assert len(ours) == len(reference) == 49152
    assert ours.vocab_size == reference.vocab_size
    assert ours.get_vocab() == reference.get_vocab()
    assert ours.special_tokens_map == reference.special_tokens_map
    assert ours.all_special_tokens == reference.all_special_tokens
    assert ours.all_special_ids == reference.all_special_ids
    assert str(ours.added_tokens_decoder) == str(reference.added_tokens_decoder)
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(ours, f"{name}_token") == getattr(reference, f"{name}_token")
        assert getattr(ours, f"{name}_token_id") == getattr(reference, f"{name}_token_id")
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (
        1,
        2,
        0,
        2,
    )
    assert ours.chat_template == reference.chat_template
    assert ours.padding_side == reference.padding_side
    assert ours.add_bos_token == reference.add_bos_token is False


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_and_decodes_match_reference(ours, reference, add_special_tokens):
    assert len(STRINGS) >= 300
    got = ours(STRINGS, add_special_tokens=add_special_tokens)["input_ids"]
    want = reference(STRINGS, add_special_tokens=add_special_tokens)["input_ids"]
    for text, g, w in zip(STRINGS, got, want, strict=True):
        assert g == w, text
    # Special tokens are matched whole wherever they appear in the text.
    assert ours("a<|im_end|>b")["input_ids"][1] == ours.eos_token_id
    for ids in want:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            )
    # Byte-level BPE loses nothing: decoding gives the text back.
    assert [ours.decode(ids) for ids in got] == STRINGS


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_reference(ours, reference, messages, add_generation_prompt):
    kwargs = dict(add_generation_prompt=add_generation_prompt)
    text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text == reference.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = ours.apply_chat_template(messages, **kwargs)["input_ids"]
    assert ids == reference.apply_chat_template(messages, **kwargs)["input_ids"]
    assert ids == ours(text, add_special_tokens=False)["input_ids"]
    assert ids.count(ours.eos_token_id) == len(messages) + (messages[0]["role"] != "system")


def test_save_and_reload_gives_the_same_tokenizer(ours, tmp_path):
    """The converted model directory is read back with ``AutoTokenizer.from_pretrained``."""
    ours.save_pretrained(tmp_path)
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["tokenizer_class"] in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert (saved["bos_token"], saved["eos_token"], saved["pad_token"], saved["unk_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert json.loads(back.backend_tokenizer.to_str()) == json.loads(
        ours.backend_tokenizer.to_str()
    )
    assert len(back) == len(ours)
    assert back.special_tokens_map == ours.special_tokens_map
    assert (back.eos_token_id, back.pad_token_id) == (2, 2)
    assert back.chat_template == ours.chat_template
    for flag in (True, False):
        assert (
            back(STRINGS, add_special_tokens=flag)["input_ids"]
            == ours(STRINGS, add_special_tokens=flag)["input_ids"]
        )
    for messages in CHATS:
        assert back.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(
            messages, tokenize=False
        )
        assert (
            back.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
            == (ours.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        )


NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["torch"] = None  # from here on, any "import torch" raises ImportError
    import json

    from rllama_jax.models import load_pretrained
    from rllama_jax.models.gguf_format import tokenizer_from_gguf
    from rllama_jax.models.loading import smollm2_gguf_path

    messages = json.loads(sys.argv[1])
    config, params, tok = load_pretrained("smollm2-135m-instruct")
    direct = tokenizer_from_gguf(smollm2_gguf_path())
    print(json.dumps({
        "loaded": tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"],
        "direct": direct.apply_chat_template(messages, add_generation_prompt=True)["input_ids"],
        "text": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        "len": len(tok),
        "eos_pad": [tok.eos_token_id, tok.pad_token_id],
        "vocab_size": config.vocab_size,
        "embed_rows": int(params["embed"].shape[0]),
        "torch_loaded": sys.modules.get("torch") is not None,
    }))
    """
)


def test_default_model_loads_without_torch(reference, tmp_path):
    """The core install has no torch: converting and loading the default model (tokenizer
    included, through the cached directory) must not import it."""
    messages = CHATS[1]
    # The child imports the same rllama_jax as this process, from outside the checkout.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(rllama_jax.__file__)))
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = dict(
        os.environ,
        RLLAMA_JAX_CACHE=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=path,
    )
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, json.dumps(messages)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    want = reference.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert out["loaded"] == out["direct"] == want
    assert out["text"] == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert out["len"] == len(reference) == out["vocab_size"] == out["embed_rows"]
    assert out["eos_pad"] == [2, 2]
    assert out["torch_loaded"] is False
    assert os.path.exists(tmp_path / "cache" / loading.DEFAULT_MODEL / "tokenizer.json")


def write_tiny_gguf(path, tokenizer_model="gpt2", pre="smollm") -> None:
    """A GGUF holding only a tokenizer (and one tensor): every byte, three merges, control and
    user-defined tokens, some of them spelled outside the byte alphabet."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(8)
    writer.add_head_count(2)
    extra = ["Ġt", "he", "Ġthe", "<think>", "</think>", "[CTRL 日]", "日本", "a b", "<tool>"]
    tokens = ["<|endoftext|>", "<|im_end|>", *_byte_alphabet().values(), *extra]
    types = [3, 3] + [1] * 256 + [1, 1, 1, 4, 4, 3, 4, 1, 3]
    writer.add_tokenizer_model(tokenizer_model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", ["smollm", "gpt2", None])
def test_tiny_gguf_matches_reference(tmp_path, pre):
    """Branches the default model does not reach: user-defined tokens, tokens and control
    tokens written outside the byte alphabet (raw text), a missing pre-tokenizer name."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, pre=pre)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    tok = tokenizer_from_gguf(str(path))
    assert json.loads(tok.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    assert len(tok) == len(ref) == 267
    assert tok.special_tokens_map == ref.special_tokens_map
    texts = [
        "the <think>x</think> the<|im_end|>",
        "日本 [CTRL 日] a b <tool> hello",
        "<|endoftext|>  the  日本語 🎲 21",
    ]
    for flag in (True, False):
        assert (
            tok(texts, add_special_tokens=flag)["input_ids"]
            == ref(texts, add_special_tokens=flag)["input_ids"]
        )
    ids = tok(texts[0])["input_ids"]
    assert 261 in ids and 262 in ids  # <think> and </think> stay whole
    assert tok.decode(ids, skip_special_tokens=True) == "the <think>x</think> the"
    chat = [{"role": "user", "content": "the <think>"}]
    assert tok.apply_chat_template(chat)["input_ids"] == ref.apply_chat_template(chat)["input_ids"]


@pytest.mark.parametrize(
    ("tokenizer_model", "pre", "match"),
    [("llama", "default", "tokenizer type 'llama'"), ("gpt2", "llama-bpe", "'llama-bpe'")],
)
def test_unsupported_tokenizers_raise(tmp_path, tokenizer_model, pre, match):
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, tokenizer_model=tokenizer_model, pre=pre)
    with pytest.raises(UnsupportedArchitectureError, match=match):
        tokenizer_from_gguf(str(path))
