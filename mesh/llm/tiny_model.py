"""A tiny llama-architecture GGUF model with random weights, for tests and local smoke runs.

The model is gibberish by design, but it is a real GGUF file that llama.cpp loads and runs, so
tests exercise the same code path as a real model in about a second. A few weights are shaped
by hand so tests can rely on its behaviour:

- End-of-sequence is practically never sampled, so generation runs to ``max_tokens``; the one
  exception is a forced chain: after the token " farewell" comes " friend", then EOS.
- After " smile" the model spells U+1F642 as four byte tokens, so incremental UTF-8 decoding
  is exercised by real generation.

It works by reserving a few "control" dimensions of the residual stream that no layer writes to
(their rows in ``attn_output`` and ``ffn_down`` are zero), so at each position they hold exactly
the current token's embedding. A forced transition ``a -> b`` gets its own dimension: ``a``'s
embedding is large there, every other token's is slightly negative, and only ``b``'s output row
reads it. Dimension 0 is read by tokens that should stay rare (bytes, specials, " farewell").

Run ``python -m mesh.llm.tiny_model PATH`` to write one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

# Bump when the layout changes so cached files are rebuilt.
TINY_MODEL_VERSION = 2
DEFAULT_SEED = 1234

N_EMBD = 64
N_LAYERS = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
CONTEXT_LENGTH = 4096

UNK, BOS, EOS = 0, 1, 2
USER_TAG, ASSISTANT_TAG, END_TAG = "<|user|>", "<|assistant|>", "<|end|>"

# A plain chat template in the GGUF, so prompt building goes through the template path.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_WORDS = (
    "the of and to in is was for on that with as it by at from his an were are which this be "
    "or has had not first one their its new after but who they two her she he been other when "
    "there all during into school time may years more most only over city some world would "
    "where later up such used many can state about national out known university united then "
    "made hello model token stream mesh agent memory turn chat log seed random tiny gibberish "
    "farewell friend smile"
).split()
_PUNCT = list(".,;:!?'\"()-/")
# Non-ASCII pieces so generated text is not all ASCII (whole characters, never split).
_UNICODE = ["é", "ü", "ß", "ñ", "—", "…", "日", "本", "日本", "語", "ж", "я", "λ", "π", "€"]

# U+1F642 SLIGHTLY SMILING FACE, spelled with byte tokens after " smile".
_SMILE_BYTES = (0xF0, 0x9F, 0x99, 0x82)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types of an SPM-style vocabulary with byte fallback."""
    pieces: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL
    for byte in range(256):
        pieces.append(f"<0x{byte:02X}>")
        types.append(6)  # BYTE
    for tag in (USER_TAG, ASSISTANT_TAG, END_TAG):
        pieces.append(tag)
        # CONTROL, as chat models mark their turn markers: parsed as one token in template
        # text, but never in user text (tokenized without special parsing).
        types.append(3)
    normal: list[str] = ["▁"]
    normal += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    normal += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    normal += [str(d) for d in range(10)]
    normal += _PUNCT + _UNICODE
    normal += ["▁" + p for p in _PUNCT]
    # SPM merges adjacent pieces only into pieces that exist, so every prefix of a word must too.
    for word in _WORDS:
        for end in range(1, len(word) + 1):
            normal.append("▁" + word[:end])
    seen = set(pieces)
    for piece in normal:
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
            types.append(1)  # NORMAL
    # Longer pieces merge first.
    scores = [0.0 if t != 1 else float(len(p)) for p, t in zip(pieces, types, strict=True)]
    return pieces, scores, types


def _weights(
    pieces: list[str], types: list[int], seed: int
) -> dict[str, np.ndarray[tuple[int, ...], np.dtype[np.float32]]]:
    rng = np.random.default_rng(seed)
    n_vocab = len(pieces)
    index = {p: i for i, p in enumerate(pieces)}
    byte_token = {b: index[f"<0x{b:02X}>"] for b in range(256)}

    # (from token, to token); each gets its own control dimension, starting at 1.
    chains: list[tuple[int, int]] = [
        (index["▁farewell"], index["▁friend"]),
        (index["▁friend"], EOS),
        (index["▁smile"], byte_token[_SMILE_BYTES[0]]),
    ]
    for a, b in zip(_SMILE_BYTES, _SMILE_BYTES[1:], strict=False):
        chains.append((byte_token[a], byte_token[b]))
    n_control = 1 + len(chains)
    chained_targets = {b for _, b in chains}

    def normal(*shape: int, std: float) -> np.ndarray[tuple[int, ...], np.dtype[np.float32]]:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    embd = normal(n_vocab, N_EMBD, std=1.0)
    embd[:, :n_control] = -1.0
    output = normal(n_vocab, N_EMBD, std=0.4)
    output[:, :n_control] = 0.0
    rare = {i for i, t in enumerate(types) if t != 1} | {index["▁farewell"]}
    for token in rare - chained_targets:
        output[token, :] = 0.0
        output[token, 0] = 20.0  # every embedding is -1 there: a large negative logit
    for dim, (a, b) in enumerate(chains, start=1):
        embd[a, dim] = 30.0
        output[b, :] = 0.0
        output[b, dim] = 20.0

    tensors: dict[str, np.ndarray[tuple[int, ...], np.dtype[np.float32]]] = {
        "token_embd.weight": embd,
        "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
        "output.weight": output,
    }
    head_dim = N_EMBD // N_HEAD
    scale_in = 0.5 / np.sqrt(N_EMBD)
    for layer in range(N_LAYERS):
        attn_out = normal(N_EMBD, N_EMBD, std=scale_in)
        ffn_down = normal(N_EMBD, N_FF, std=0.5 / np.sqrt(N_FF))
        # Layers never write to the control dimensions.
        attn_out[:n_control, :] = 0.0
        ffn_down[:n_control, :] = 0.0
        prefix = f"blk.{layer}."
        tensors[prefix + "attn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        tensors[prefix + "attn_q.weight"] = normal(N_EMBD, N_EMBD, std=scale_in)
        tensors[prefix + "attn_k.weight"] = normal(N_HEAD_KV * head_dim, N_EMBD, std=scale_in)
        tensors[prefix + "attn_v.weight"] = normal(N_HEAD_KV * head_dim, N_EMBD, std=scale_in)
        tensors[prefix + "attn_output.weight"] = attn_out
        tensors[prefix + "ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        tensors[prefix + "ffn_gate.weight"] = normal(N_FF, N_EMBD, std=scale_in)
        tensors[prefix + "ffn_up.weight"] = normal(N_FF, N_EMBD, std=scale_in)
        tensors[prefix + "ffn_down.weight"] = ffn_down
    return tensors


def write_tiny_model(path: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny model to ``path`` (atomically) and return the path."""
    import gguf  # dev dependency; only needed to build the file

    pieces, scores, types = _vocab()
    tensors = _weights(pieces, types, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(f"mesh-tiny-random-v{TINY_MODEL_VERSION}")
        writer.add_context_length(CONTEXT_LENGTH)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYERS)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(N_EMBD // N_HEAD)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(len(pieces))
        writer.add_file_type(0)  # all F32
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(UNK)
        writer.add_bos_token_id(BOS)
        writer.add_eos_token_id(EOS)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_tiny_model(directory: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """The tiny model for ``seed`` under ``directory``, written on first use."""
    path = directory / f"mesh-tiny-v{TINY_MODEL_VERSION}-s{seed}.gguf"
    if not path.exists():
        write_tiny_model(path, seed=seed)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the mesh's tiny random-weight GGUF model.")
    parser.add_argument("path", type=Path, help="where to write the .gguf file")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    written = write_tiny_model(args.path, seed=args.seed)
    print(f"{written} ({written.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
