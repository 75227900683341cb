"""The arithmetic task's tokenizer, loaded through transformers.AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from archer_mcore.data.arithmetic_tokenizer import CHARS, VOCAB


def test_files_and_vocabulary(tokenizer_dir: Path, tokenizer: Any) -> None:
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tokenizer_dir.iterdir()}
    assert "chat_template" in json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    # 5 specials + 5 words + 95 printable ASCII characters + "\n" = 106 < 128
    assert len(tokenizer) == len(VOCAB) == 106
    assert len(CHARS) == 96
    ids = tokenizer.convert_tokens_to_ids(
        ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    assert ids == [0, 1, 2, 3]
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 3


def test_chat_template_is_qwen_like(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Compute 3 + 4 * 2 - 5."},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCompute 3 + 4 * 2 - 5.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_gen = tokenizer.apply_chat_template(
        messages[1:], add_generation_prompt=False, tokenize=False
    )
    assert no_gen == "<|im_start|>user\nCompute 3 + 4 * 2 - 5.<|im_end|>\n"


def test_encoding_is_char_level_with_words_and_round_trips(tokenizer: Any) -> None:
    text = "<|im_start|>user\nCompute 12 + 3.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    # hand-tokenised: specials and known words whole, everything else one character each
    assert tokens == [
        "<|im_start|>", "user", "\n", "Compute", " ", "1", "2", " ", "+", " ", "3", ".",
        "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n",
    ]  # fmt: skip
    assert tokenizer.decode(ids) == text
    answer = "4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6. \\boxed{6}<|im_end|>"
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(a_ids)[-5:] == ["\\boxed", "{", "6", "}", "<|im_end|>"]
    assert tokenizer.decode(a_ids, skip_special_tokens=True) == answer.removesuffix("<|im_end|>")
    assert max(a_ids) < 106 and tokenizer.unk_token_id not in a_ids
    assert tokenizer.convert_ids_to_tokens(
        tokenizer("é", add_special_tokens=False)["input_ids"]
    ) == ["<|unk|>"]
