"""The small tokenizer of the synthetic arithmetic task (built with `tokenizers`).

Vocabulary (106 tokens, ids fixed): the special tokens <|pad|> (0), <|endoftext|>
(1), <|im_start|> (2), <|im_end|> (3), <|unk|> (4); the whole words of the prompts and
chat template ("Compute", "user", "assistant", "system", "\\boxed"); then every
printable ASCII character and "\\n" as its own token, so digits, operators, braces,
spaces and any other ASCII text encode losslessly (non-ASCII maps to <|unk|>).
Decoding concatenates tokens (no added spaces).

The chat template is Qwen's without tools or thinking:
"<|im_start|>{role}\\n{content}<|im_end|>\\n" per message, then
"<|im_start|>assistant\\n" as the generation prompt. eos is <|im_end|>.

`build_arithmetic_tokenizer(dir)` writes tokenizer.json, tokenizer_config.json (with
the chat template) and chat_template.jinja; `transformers.AutoTokenizer
.from_pretrained(dir)` then loads it offline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import string
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, ENDOFTEXT, IM_START, IM_END, UNK = (
    "<|pad|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|unk|>",
)
SPECIAL_TOKENS: tuple[str, ...] = (PAD, ENDOFTEXT, IM_START, IM_END, UNK)
WORDS: tuple[str, ...] = ("Compute", "user", "assistant", "system", "\\boxed")
CHARS: tuple[str, ...] = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + WORDS + CHARS

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer_object() -> Tokenizer:
    """The `tokenizers.Tokenizer` (word-level model over words + single characters)."""
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Each pre-token is a known word or else a single character.
    words = "|".join(re.escape(w) for w in sorted(WORDS, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{words}|[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def write_once(path: Path, text: str) -> None:
    """Make `path` hold `text` without a reader ever seeing a partial file: nothing is
    written when it already does; else a private temp file in the same directory is
    written, fsynced and renamed over it (`os.replace` is atomic). Processes that
    start together and share a cache directory all end up reading the same bytes."""
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def build_arithmetic_tokenizer(out_dir: str | Path, model_max_length: int = 4096) -> Path:
    """Write the tokenizer files into `out_dir` (created) and return it; each file is
    written once and atomically (`write_once`), so concurrent builds into one cache
    directory are safe."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_once(out / "tokenizer.json", build_tokenizer_object().to_str(pretty=True))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": [IM_START, ENDOFTEXT],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    write_once(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_once(out / "chat_template.jinja", CHAT_TEMPLATE)
    return out
