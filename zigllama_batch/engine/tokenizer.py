"""Tokenizer built from a GGUF file's own vocabulary, on the ``tokenizers`` library.

Inside: :class:`Tokenizer` (encode, decode, chat template, special ids) and
:class:`IncrementalDetokenizer` (turns a token stream into text without ever emitting half of a
multi-byte character).

Two vocabulary kinds are read from ``tokenizer.ggml.*`` metadata:

- ``gpt2``: byte-level BPE (SmolLM, Llama 3, ...). The pre-tokenizer follows
  ``tokenizer.ggml.pre`` with the same split rules llama.cpp uses; unknown kinds fall back to
  GPT-2's rule with a warning.
- ``llama``: SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama, Mistral). Merges
  come from the file or, when absent, from the token scores, as transformers derives them.

Control tokens (``<|im_start|>``, ``<s>``...) are matched as single tokens in any text, chat
template output included. Chat templates render in jinja2's immutable sandbox; a model without
a template gets Gemma's turn format when its vocabulary has Gemma's turn tokens (the base Gemma
files carry none), else ChatML.

Left out: the other GGUF vocabulary kinds (``bert``, ``t5``, ``rwkv``), normalizers beyond
SentencePiece's space handling.
"""

from __future__ import annotations

import codecs
import datetime
import enum
import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, cast

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import InvalidRequest, ModelLoadError

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
"""Gemma 3's chat format (its instruction-tuned models' template, without the checks that
turns alternate): a system message is folded into the first user turn."""

# Pre-tokenizer split rules by `tokenizer.ggml.pre`, as in llama.cpp's llama-vocab.cpp.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_PATTERN,),
    "gpt2": (_GPT2_PATTERN,),
    "llama-bpe": (_LLAMA3_PATTERN,),
    "llama3": (_LLAMA3_PATTERN,),
    "qwen2": (_QWEN2_PATTERN,),
    "deepseek-r1-qwen": (_QWEN2_PATTERN,),
    "smollm": (r"\p{N}", _GPT2_PATTERN),
    "starcoder": (r"\p{N}", _GPT2_PATTERN),
    "refact": (r"\p{N}", _GPT2_PATTERN),
}

_END_OF_GENERATION = frozenset(
    {
        "<|endoftext|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<end_of_turn>",
        "<EOT>",
        "</s>",
    }
)


class _TokenType(enum.IntEnum):
    """``tokenizer.ggml.token_type`` values (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class IncrementalDetokenizer:
    """Turns token ids into text one token at a time.

    Bytes of a character split across tokens are held until the character is complete, so a
    chunk never ends in half a character. Control tokens produce no text.
    """

    __slots__ = ("_decoder", "_token_bytes")

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        return self._decoder.decode(self._token_bytes[token_id])

    def flush(self) -> str:
        """End the stream; bytes of an unfinished character come out as U+FFFD."""
        return self._decoder.decode(b"", final=True)


class Tokenizer:
    """Encodes text and chat messages to token ids and back, as the model's GGUF file says."""

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        """Build the tokenizer from GGUF metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

        Raises:
            ModelLoadError: the vocabulary is missing or of an unsupported kind.
        """
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(
                "the model file has no tokenizer vocabulary (tokenizer.ggml.tokens)"
            )
        self._tokens: list[str] = list(tokens)
        n = len(self._tokens)
        types = metadata.get("tokenizer.ggml.token_type") or [_TokenType.NORMAL] * n
        self._types = [_TokenType(t) if 0 <= t <= 6 else _TokenType.NORMAL for t in types]
        merges = metadata.get("tokenizer.ggml.merges")
        vocab = {tok: i for i, tok in enumerate(self._tokens)}
        if kind == "gpt2":
            self._hf = self._byte_level_bpe(vocab, merges, metadata.get("tokenizer.ggml.pre"))
            default_add_bos = False
        elif kind == "llama":
            scores = metadata.get("tokenizer.ggml.scores")
            merge_types = self._types
            if str(metadata.get("general.architecture", "")).startswith("gemma"):
                # Gemma files store tokens of two or more spaces as spaces (typed user-defined),
                # where the text the model reads has "▁"s; and their merge order is the order
                # of the vocabulary, which their scores do not follow (as transformers' GGUF
                # reader says).
                spaces = {i for i, t in enumerate(self._tokens) if len(t) > 1 and not t.strip(" ")}
                vocab = {"▁" * len(t) if i in spaces else t: i for i, t in enumerate(self._tokens)}
                merge_types = [
                    _TokenType.NORMAL if i in spaces else t for i, t in enumerate(self._types)
                ]
                scores = [-float(i) for i in range(n)]
            prefix = metadata.get("tokenizer.ggml.add_space_prefix")
            self._hf = self._sentencepiece_bpe(
                vocab,
                merges,
                scores,
                merge_types,
                space_prefix=True if prefix is None else bool(prefix),
            )
            default_add_bos = True
        else:
            raise ModelLoadError(f"tokenizer kind {kind!r} is not supported (only 'gpt2', 'llama')")
        self.kind: str = kind
        self._add_special_tokens(vocab)

        def special(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return int(value) if value is not None and 0 <= int(value) < n else None

        self.bos_id: int | None = special("bos")
        """Beginning-of-sequence token, or None."""
        self.eos_id: int | None = special("eos")
        """End-of-sequence token, or None."""
        self.unk_id: int | None = special("unknown")
        """The token unknown text maps to, as the metadata names it, or None."""
        self.pad_id: int | None = special("padding")
        """Padding token, as the metadata names it, or None (nothing here pads)."""
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        self.add_bos: bool = bool(default_add_bos if add_bos is None else add_bos)
        """Whether plain-text prompts start with the BOS token."""
        stops = {special(k) for k in ("eos", "eot", "eom")}
        # Like llama.cpp, also end on the well-known end-of-text/turn control tokens the metadata
        # does not name (SmolLM's <|endoftext|> ends a document, <|im_end|> a chat turn).
        stops |= {
            i
            for i, (t, ty) in enumerate(zip(self._tokens, self._types, strict=True))
            if ty == _TokenType.CONTROL and t in _END_OF_GENERATION
        }
        self.stop_ids: frozenset[int] = frozenset(i for i in stops if i is not None)
        """Tokens that end a generation (end of sequence, end of turn)."""
        default_template = (
            GEMMA_TEMPLATE
            if {"<start_of_turn>", "<end_of_turn>"} <= set(self._tokens)
            else CHATML_TEMPLATE
        )
        self.chat_template: str = metadata.get("tokenizer.chat_template") or default_template
        """The Jinja chat template (the model's own; else Gemma's for a Gemma vocabulary, or
        ChatML)."""

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self._tokens)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token strings become their single token.

        Args:
            text: the text to encode.
            add_bos: prepend the BOS token; None follows the model's metadata.
        """
        ids: list[int] = self._hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def hf_json(self) -> str:
        """The Hugging Face ``tokenizers`` definition this tokenizer runs on, as JSON (for
        libraries that build their own view of the vocabulary, such as llguidance)."""
        return str(self._hf.to_str())

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (control tokens left out unless ``skip_special_tokens`` is False)."""
        self._check_ids(ids)
        text: str = self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    @cached_property
    def max_token_bytes(self) -> int:
        """Most UTF-8 bytes one token stands for: a text of n bytes has at least
        n / max_token_bytes tokens."""
        return max(
            1, max(len(b) for b in self._token_bytes), max(len(t.encode()) for t in self._tokens)
        )

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` adds to generated text (none for control tokens)."""
        return self._token_bytes[token_id]

    @cached_property
    def special_tokens(self) -> Mapping[int, str]:
        """The control tokens (and the unknown token) by id: what two tokenizers must agree
        on for one model's tokens to mean the same to another (a draft model's)."""
        return {
            i: t
            for i, (t, ty) in enumerate(zip(self._tokens, self._types, strict=True))
            if ty == _TokenType.CONTROL or ty == _TokenType.UNKNOWN
        }

    def token_to_str(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as stored in the file (e.g. ``'Ġworld'``)."""
        return self._tokens[token_id]

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one generated stream."""
        return IncrementalDetokenizer(self._token_bytes)

    def encode_prompt(
        self,
        prompt: str | Sequence[Mapping[str, Any]] | Sequence[int],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of a prompt: text as :meth:`encode` does, chat messages rendered with the
        chat template and its generation prompt (with ``tools``, OpenAI's tool definitions, when
        given), or token ids checked against the vocabulary. An empty prompt is the BOS token
        alone.

        Raises:
            InvalidRequest: the prompt is none of these, or holds an id outside the vocabulary.
        """
        if isinstance(prompt, str):
            _check_unicode(prompt, "prompt")
            ids = self.encode(prompt)
        elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(
                    f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})"
                )
        else:
            # The template writes any BOS itself, as Hugging Face's apply_chat_template does.
            messages = cast(Sequence[Mapping[str, Any]], prompt)
            text = self.apply_chat_template(messages, tools=tools)
            _check_unicode(text, "messages")
            ids = self.encode(text, add_bos=False)
        if not ids:  # an empty prompt continues from the start-of-sequence token
            if self.bos_id is None:
                raise InvalidRequest("the prompt is empty and the model has no BOS token")
            ids = [self.bos_id]
        return ids

    @cached_property
    def message_token_floor(self) -> Mapping[str, int]:
        """Per role, the fewest tokens the chat template adds for one more message of that role
        (0 for a role it renders as nothing, or refuses alone): a lower bound that lets a
        conversation too long for the context be refused before it is rendered."""
        floor = {}
        for role in CHAT_ROLES:
            message = {"role": role, "content": ""}
            try:
                one, two = (
                    len(self.encode(self.apply_chat_template(m, add_generation_prompt=False)))
                    for m in ([message], [message, message])
                )
            except InvalidRequest:  # the template refuses this shape of conversation
                continue
            floor[role] = max(0, two - one)
        return floor

    @property
    def calls_tools_in_tags(self) -> bool:
        """Whether the chat template renders tools and has the model call them inside
        ``<tool_call>...</tool_call>`` (the Hermes format of Qwen2.5, Qwen3, SmolLM3...)."""
        return "tools" in self.chat_template and "<tool_call>" in self.chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render chat messages with the model's template.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``; content may also be a list of
                OpenAI-style parts ``{"type": "text", "text": "..."}``.
            add_generation_prompt: end with the header of an assistant turn.
            tools: OpenAI's tool definitions, as Hugging Face passes them to a template (one
                that does not render tools ignores them).

        Raises:
            InvalidRequest: the messages are malformed or the template rejects them.
        """
        clean = text_messages(messages)
        try:
            extra = {} if tools is None else {"tools": list(tools)}
            return self._template.render(
                messages=clean,
                add_generation_prompt=add_generation_prompt,
                **extra,
                bos_token=self._tokens[self.bos_id] if self.bos_id is not None else "",
                eos_token=self._tokens[self.eos_id] if self.eos_id is not None else "",
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"the chat template rejected the messages: {exc}") from exc

    # -- construction --------------------------------------------------------------------------

    @staticmethod
    def _byte_level_bpe(
        vocab: dict[str, int], merges: list[str] | None, pre: str | None
    ) -> HFTokenizer:
        if not merges:
            raise ModelLoadError("a 'gpt2' tokenizer needs tokenizer.ggml.merges")
        pairs = [_split_merge(m) for m in merges]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        splits = _PRE_TOKENIZER_SPLITS.get(pre or "default")
        if splits is None:
            logger.warning("pre-tokenizer %r is not known; using GPT-2's split rule", pre)
            splits = _PRE_TOKENIZER_SPLITS["default"]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        return tok

    def _sentencepiece_bpe(
        self,
        vocab: dict[str, int],
        merges: list[str] | None,
        scores: list[float] | None,
        merge_types: Sequence[_TokenType],
        *,
        space_prefix: bool,
    ) -> HFTokenizer:
        if merges:
            pairs = [_split_merge(m) for m in merges]
        elif scores:
            pairs = _merges_from_scores(vocab, scores, merge_types)
        else:
            raise ModelLoadError("a 'llama' tokenizer needs tokenizer.ggml.scores or merges")
        unk = next(
            (
                t
                for t, ty in zip(self._tokens, self._types, strict=True)
                if ty == _TokenType.UNKNOWN
            ),
            None,
        )
        tok = HFTokenizer(
            models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
        )
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if space_prefix else "never", split=False
        )
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        return tok

    def _add_special_tokens(self, vocab: Mapping[str, int]) -> None:
        """Control tokens as special, user-defined ones as plain added tokens; ``vocab``: the
        vocabulary the model was built on."""
        control = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(self._tokens, self._types, strict=True)
            if ty == _TokenType.CONTROL or ty == _TokenType.UNKNOWN
        ]
        # A user-defined token whose spelling the model's vocabulary changed (Gemma's runs of
        # spaces) is left to the vocabulary: adding it again would give it a second id.
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(self._tokens, self._types, strict=True)
            if ty == _TokenType.USER_DEFINED and t in vocab
        ]
        self._hf.add_special_tokens(control)
        self._hf.add_tokens(user)

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        """The bytes each token stands for in generated text (control tokens: none)."""
        out: list[bytes] = []
        if self.kind == "gpt2":
            byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
            for tok, ty in zip(self._tokens, self._types, strict=True):
                if ty in (_TokenType.CONTROL, _TokenType.UNKNOWN, _TokenType.UNUSED):
                    out.append(b"")
                elif ty == _TokenType.USER_DEFINED or any(ch not in byte_of for ch in tok):
                    out.append(tok.encode())
                else:
                    out.append(bytes(byte_of[ch] for ch in tok))
        else:
            for tok, ty in zip(self._tokens, self._types, strict=True):
                if ty in (_TokenType.CONTROL, _TokenType.UNKNOWN, _TokenType.UNUSED):
                    out.append(b"")
                elif ty == _TokenType.BYTE:
                    out.append(bytes([int(tok[3:-1], 16)]))  # "<0x0A>"
                else:
                    out.append(tok.replace("▁", " ").encode())
        return out

    @cached_property
    def _template(self) -> jinja2.Template:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def strftime_now(fmt: str) -> str:
            return datetime.datetime.now().strftime(fmt)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(f"the model's chat template does not parse: {exc}") from exc

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not 0 <= i < len(self._tokens):
                raise InvalidRequest(
                    f"token id {i} is outside the vocabulary (0..{len(self._tokens) - 1})"
                )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, add_bos={self.add_bos})"
        )


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
"""The message roles of OpenAI's chat API."""


def _check_unicode(text: str, field: str) -> None:
    """Refuse text UTF-8 cannot encode: a lone surrogate (JSON's ``"\\ud800"``)."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        raise InvalidRequest(
            f"{field}: holds a lone surrogate (U+{ord(char):04X}), which is not valid Unicode "
            "text; send each surrogate pair whole"
        ) from None


def text_messages(messages: object) -> list[dict[str, str]]:
    """Chat messages checked and with their content as one string (OpenAI's text parts
    joined).

    Raises:
        InvalidRequest: a message is malformed or holds a part other than text.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {'role': ..., 'content': ...}")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"messages[{i}].role must be a non-empty string")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text":
                    raise InvalidRequest(f"messages[{i}].content: only text parts are supported")
                text = part.get("text")
                if not isinstance(text, str):
                    raise InvalidRequest(f"messages[{i}].content: a text part's text is a string")
                texts.append(text)
            content = "".join(texts)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string")
        clean.append(
            {
                **{k: v for k, v in message.items() if isinstance(k, str)},
                "role": role,
                "content": content,
            }
        )
    return clean


def _split_merge(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise ModelLoadError(f"malformed BPE merge {merge!r}")
    return left, right


def _merges_from_scores(
    vocab: dict[str, int], scores: Sequence[float], types: Sequence[_TokenType]
) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece scores: every split of a token into two tokens,
    the merged token's score deciding the order (as transformers' ``generate_merges``)."""
    candidates: list[tuple[float, int, int, str, str]] = []
    for piece, idx in vocab.items():
        if types[idx] != _TokenType.NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                candidates.append((-scores[idx], vocab[left], vocab[right], left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
