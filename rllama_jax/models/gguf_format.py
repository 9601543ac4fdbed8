"""Reading Llama weights and hyper-parameters from GGUF files (llama.cpp's format).

Quantized tensors are dequantized to float32 with the ``gguf`` package. llama.cpp's converter
permutes the rows of the query and key projections (it interleaves the two RoPE halves); the
permutation is undone here so the weights match the half-split RoPE of Hugging Face models.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from rllama_jax.models.config import LlamaConfig
from rllama_jax.models.errors import CorruptCheckpointError, UnsupportedArchitectureError
from rllama_jax.models.hf_format import params_from_hf
from rllama_jax.models.llama import Params

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    """Maps a GGUF tensor name (``blk.3.attn_q.weight``) to its Hugging Face name; unknown
    names are returned unchanged so the strict converter reports them as unexpected."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return gguf_name


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation of a ``[n_heads * hd, in]`` matrix.

    llama.cpp stores, per head, rows in the order (pair index, half) -> interleaved; the
    Hugging Face order is (half, pair index).
    """
    out_dim = w.shape[0]
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_reader(path: str) -> Any:
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct/numpy errors on bad bytes
        raise CorruptCheckpointError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_gguf(reader: Any, path: str = "GGUF") -> LlamaConfig:
    """Builds a ``LlamaConfig`` from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF files with per-frequency RoPE factors (rope_freqs.weight, llama3 "
            "scaling) are not supported; load the model's Hugging Face checkpoint instead"
        )
    p = "llama."
    try:
        hidden = int(_field(reader, p + "embedding_length"))
        num_heads = int(_field(reader, p + "attention.head_count"))
        num_kv = int(_field(reader, p + "attention.head_count_kv", num_heads))
        tokens = _field(reader, "tokenizer.ggml.tokens")
        vocab = _field(reader, p + "vocab_size") or (len(tokens) if tokens is not None else None)
        head_dim = _field(reader, p + "attention.key_length") or _field(
            reader, p + "rope.dimension_count", hidden // num_heads
        )
        config = LlamaConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(_field(reader, p + "feed_forward_length")),
            num_layers=int(_field(reader, p + "block_count")),
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(head_dim),
            rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
            max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        )
    except (TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: incomplete llama metadata ({e})") from e
    scaling = _field(reader, p + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UnsupportedArchitectureError(f"{path}: rope scaling {scaling!r} not supported")
        config = config.replace(
            rope_type="linear", rope_factor=float(_field(reader, p + "rope.scaling.factor"))
        )
    return config


def read_gguf(path: str, dtype=np.float32) -> tuple[LlamaConfig, Params]:
    """Dequantizes a Llama GGUF file into (config, numpy parameter tree)."""
    import gguf

    reader = open_reader(path)
    config = config_from_gguf(reader, path)
    by_name = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name in by_name:
            raise CorruptCheckpointError(f"{path}: tensor {t.name!r} appears twice")
        by_name[name] = t

    def get(name: str) -> np.ndarray:
        t = by_name[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CorruptCheckpointError(f"{path}: cannot dequantize {t.name!r} ({e})") from e
        arr = np.asarray(arr, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
        if name.endswith("self_attn.q_proj.weight"):
            arr = unpermute_rows(arr, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            arr = unpermute_rows(arr, config.num_kv_heads)
        return arr

    params = params_from_hf(get, list(by_name), config, dtype=dtype, source=path)
    return config, params


_CONTROL_TOKEN = 3  # llama.cpp token types: 3 = control (special), 4 = user-defined (added)
_USER_DEFINED_TOKEN = 4
# Pre-tokenizer names that transformers' GGUF loader splits with the plain GPT-2 regex, the
# only splitting built here (so ids match that loader). llama.cpp's "smollm" cuts digits off
# first; SmolLM2 has no multi-digit tokens, so that differs only where two or more whitespace
# characters precede a digit ("  1": "Ġ" "Ġ" "1" here, "ĠĠ" "1" in llama.cpp).
_GPT2_SPLIT_PRE_TOKENIZERS = (None, "default", "gpt2", "smollm")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes, as byte-level BPE vocabularies use it."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    spelling = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def tokenizer_from_gguf(path: str) -> Any:
    """The Hugging Face tokenizer (with chat template) stored in a GGUF file's metadata.

    Built from the vocabulary, merges and special-token ids with the ``tokenizers`` library
    rather than through transformers' GGUF loader, which imports torch (only a test extra
    here). It gives the same ids, decodes and chat prompts as that loader. Only byte-level BPE
    vocabularies (``tokenizer.ggml.model`` "gpt2") with GPT-2 text splitting are supported.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = open_reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedArchitectureError(
            f"{path}: GGUF tokenizer type {kind!r} is not supported (only byte-level BPE 'gpt2')"
        )
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in _GPT2_SPLIT_PRE_TOKENIZERS:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported (only GPT-2 text splitting: "
            f"{', '.join(repr(p) for p in _GPT2_SPLIT_PRE_TOKENIZERS[1:])})"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CorruptCheckpointError(f"{path}: GGUF tokenizer metadata lacks tokens or merges")
    token_types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise CorruptCheckpointError(
            f"{path}: {len(token_types)} token types for {len(tokens)} tokens"
        )

    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    def respell(token: str) -> str:
        # A token written with characters outside the byte alphabet (raw text) is matched
        # through its UTF-8 bytes, so it is looked up in the byte alphabet's spelling.
        if set(token) <= alphabet:
            return token
        return "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {respell(token): i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CorruptCheckpointError(f"{path}: GGUF vocabulary holds duplicate tokens")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise CorruptCheckpointError(f"{path}: GGUF merge {merge!r} is not a pair")
        pairs.append((left, right))

    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            fuse_unk=False,
            continuing_subword_prefix="",
            end_of_word_suffix="",
        )
    )
    # tokenizer.ggml.add_space_prefix is not applied: llama.cpp only uses it for sentencepiece.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>...) are matched whole and are special; user-defined ones
    # (<think>...) are matched whole but are ordinary text. Added tokens are matched on the raw
    # text, so one spelled outside the byte alphabet (a llama.cpp mislabel, or raw text such as
    # "日本") could only be matched under a new id past the model's vocabulary: it is left to BPE.
    whole = [
        (token, kind == _CONTROL_TOKEN)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind in (_CONTROL_TOKEN, _USER_DEFINED_TOKEN) and set(token) <= alphabet
    ]
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token, special in whole if special]
    )
    backend.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, special in whole
            if not special
        ]
    )

    def token_of(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}")
        if index is None:
            return None
        if not 0 <= int(index) < len(tokens):
            raise CorruptCheckpointError(f"{path}: tokenizer.ggml.{key} {index} out of range")
        return respell(tokens[int(index)])

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_of("bos_token_id"),
        eos_token=token_of("eos_token_id"),
        unk_token=token_of("unknown_token_id"),
        pad_token=token_of("padding_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
        name_or_path=os.path.dirname(os.path.abspath(path)),
    )
