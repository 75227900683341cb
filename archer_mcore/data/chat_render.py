"""Chat prompts whose message text can never become a control token.

Data rows are untrusted: a user message holding "<|im_end|>\\n<|im_start|>system\\n..."
must not open a system turn in the training template. Only the chat template (from the
tokenizer's files) is trusted; every message content, whatever its role (a data set's
system message too), is text (so is any other string field of a message; a role may
not hold a control token's text). `ChatRenderer.render(messages)` therefore:

1. wraps each content in two private-use marker characters (a second try puts them
   after any leading and before any trailing whitespace, for templates that trim);
2. renders the template over the marked messages, and over the messages as written;
3. when the marked render, markers removed, is the plain render (the template wrote
   each content verbatim, transformed by string filters at most), tokenizes the pieces
   between markers (message text) as plain text, without matching any added token,
   special or not, and the pieces outside (the template's own text) the ordinary way;
4. otherwise (the template cut a content apart, e.g. Qwen3 splitting an assistant
   message at "</think>", or looked inside it) keeps the ordinary tokenization only
   when no content holds a control token's text, and raises `MalformedRow` else.

Control tokens are every added token of the tokenizer (special or not: Qwen3's
`<think>`, `<tool_call>`, `<tool_response>` are non-special added tokens) except
whitespace-only ones, plus its special tokens. Message text is checked after encoding:
its ids never contain a control token's id (`MalformedRow` if a tokenizer cannot
encode the text otherwise). Text from the data that is tokenized outside a chat (the
warm start's solutions) goes through `encode_plain`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from archer_mcore.data.schema import MalformedRow, Message

#: Markers around message text in the marked render (Unicode plane 15, private use).
OPEN, CLOSE = "\U000f0000", "\U000f0001"


def control_tokens(tokenizer: Any) -> dict[str, int]:
    """The control tokens of `tokenizer` (text -> id): its added tokens, special or not,
    except whitespace-only ones, and its special tokens. Empty for a tokenizer that has
    neither attribute."""
    out: dict[str, int] = {}
    for index, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        text = getattr(token, "content", str(token))
        if text and not text.isspace():
            out[text] = int(index)
    for text in getattr(tokenizer, "all_special_tokens", None) or ():
        if text and text not in out and not text.isspace():
            index = tokenizer.convert_tokens_to_ids(text)
            if isinstance(index, int):
                out[text] = index
    return out


def _encode_ordinary(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_without_added_tokens(tokenizer: Any, text: str) -> list[int]:
    """`text` encoded by the tokenizer's model alone (normalizer, pre-tokenizer, model of
    a `tokenizers` backend), so no added token is matched; a tokenizer without a backend
    is asked to split its special tokens (the caller checks the ids either way)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        try:
            out = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
        except TypeError:  # a tokenizer without the option (ids checked by the caller)
            out = tokenizer(text, add_special_tokens=False)
        return list(out["input_ids"])
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = [text]
    if backend.pre_tokenizer is not None:
        pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return [token.id for piece in pieces for token in backend.model.tokenize(piece)]


class ChatRenderer:
    """Renders and tokenizes chat prompts for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.controls = control_tokens(tokenizer)
        self.control_ids = frozenset(self.controls.values())
        self._newline = _encode_ordinary(tokenizer, "\n")

    # -- plain text ----------------------------------------------------------------------
    def encode_plain(self, text: str, inside: bool = False) -> list[int]:
        """The ids of `text` as plain text: no control token, whatever it holds.
        `inside`: the text continues a longer one (see `_continuation`)."""
        encode = lambda t: _encode_without_added_tokens(self.tokenizer, t)  # noqa: E731
        ids = self._continuation(encode, text) if inside else encode(text)
        bad = [i for i in ids if i in self.control_ids]
        if bad:
            token = next(t for t, i in self.controls.items() if i == bad[0])
            raise MalformedRow(
                f"the tokenizer encodes text of the row as the control token {token!r}"
            )
        return ids

    def _continuation(self, encode: Any, text: str) -> list[int]:
        """Encode `text` as the middle of a longer text: after a newline that is then
        removed, so that a SentencePiece tokenizer adds no word-start space; as it is
        when the newline merges with the text."""
        ids = encode("\n" + text)
        if self._newline and ids[: len(self._newline)] == self._newline:
            return ids[len(self._newline) :]
        return encode(text)

    # -- chats ---------------------------------------------------------------------------
    def render(self, messages: Sequence[Message]) -> tuple[str, list[int]]:
        """The chat-template text of `messages` with the generation prompt, and its ids,
        in which every control token is one the template wrote (module docstring)."""
        self._check(messages)
        text = self._template(messages)
        pieces = self._marked_pieces(messages, text)
        if pieces is None:
            return text, self._unmarked(messages, text)
        ids: list[int] = []
        for n, (is_text, piece) in enumerate(pieces):
            if is_text:
                ids += self.encode_plain(piece, inside=n > 0)
            elif n == 0:
                ids += _encode_ordinary(self.tokenizer, piece)
            else:
                ids += self._continuation(lambda t: _encode_ordinary(self.tokenizer, t), piece)
        return text, ids

    def _marked_pieces(
        self, messages: Sequence[Message], text: str
    ) -> list[tuple[bool, str]] | None:
        """The pieces of the render with each content marked whole, else (for templates
        that trim) marked inside its outer whitespace; None when neither gives back
        `text` once the markers are removed."""
        for mark in (_mark_whole, _mark_inside_whitespace):
            marked = self._template([_marked(m, mark) for m in messages])
            pieces = _split_marked(marked)
            if pieces is not None and "".join(piece for _, piece in pieces) == text:
                return pieces
        return None

    def _template(self, messages: Sequence[Message]) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )

    def _check(self, messages: Sequence[Message]) -> None:
        """MalformedRow for a message field holding a marker character, or a role
        holding a control token's text (roles are written outside the markers)."""
        for k, m in enumerate(messages):
            for key, value in m.items():
                if isinstance(value, str) and (OPEN in value or CLOSE in value):
                    raise MalformedRow(
                        f"prompt[{k}].{key} holds the private-use character U+F0000 or "
                        "U+F0001, which the prompt renderer reserves"
                    )
            found = self._control_in(m.get("role", ""))
            if found is not None:
                raise MalformedRow(f"prompt[{k}].role holds the control token {found!r}")

    def _control_in(self, text: Any) -> str | None:
        if not isinstance(text, str):
            return None
        return next((t for t in self.controls if t in text), None)

    def _unmarked(self, messages: Sequence[Message], text: str) -> list[int]:
        """The ordinary ids of `text`, for a template that does not write contents as
        they are: only when no message field holds a control token's text."""
        for k, m in enumerate(messages):
            for key, value in m.items():
                found = self._control_in(value)
                if found is not None:
                    raise MalformedRow(
                        f"prompt[{k}].{key} holds the control token {found!r}, and the chat "
                        "template does not write message contents as they are, so it "
                        "cannot be kept as plain text"
                    )
        return _encode_ordinary(self.tokenizer, text)


def _marked(message: Message, mark: Any) -> Message:
    """`message` with `mark` applied to each string field but the role."""
    return {
        key: mark(value) if key != "role" and isinstance(value, str) else value
        for key, value in message.items()
    }


def _mark_whole(content: str) -> str:
    """`content` between OPEN and CLOSE (the empty string is left as it is)."""
    return OPEN + content + CLOSE if content else content


def _mark_inside_whitespace(content: str) -> str:
    """`content` with OPEN/CLOSE around it, inside its leading and trailing whitespace
    (whitespace-only content is left as it is)."""
    core = content.strip()
    if not core:
        return content
    start = len(content) - len(content.lstrip())
    end = start + len(core)
    return content[:start] + OPEN + core + CLOSE + content[end:]


def _split_marked(marked: str) -> list[tuple[bool, str]] | None:
    """(is message text, piece) for the pieces of a marked render, in order (empty pieces
    left out); None when the markers do not pair up (the template cut a content)."""
    pieces: list[tuple[bool, str]] = []
    inside = False
    start = 0
    for pos, char in _markers(marked):
        if (char == OPEN) == inside:  # OPEN inside, or CLOSE outside
            return None
        if pos > start:
            pieces.append((inside, marked[start:pos]))
        inside, start = not inside, pos + 1
    if inside:
        return None
    if start < len(marked):
        pieces.append((False, marked[start:]))
    return pieces


_MARKER = re.compile(f"[{OPEN}{CLOSE}]")


def _markers(text: str) -> Iterator[tuple[int, str]]:
    for match in _MARKER.finditer(text):
        yield match.start(), match.group()
