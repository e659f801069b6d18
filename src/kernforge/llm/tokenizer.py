"""Text <-> token ids for :mod:`kernforge.llm`: a model folder's ``tokenizer.json`` through the
``tokenizers`` library (:func:`load_tokenizer`; transformers is not needed), a byte-level
:class:`ByteTokenizer` for random-weight models, and :class:`StreamDecoder`, which turns ids
arriving one step at a time into text without splitting multi-byte characters.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import ArgumentError, ConfigError

TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What the runtime needs from a tokenizer."""

    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the model's BOS when it wants one and asked to)."""
        ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids, for models with random weights (no tokenizer files).

    Byte ``b`` is id ``b % vocab_size``, so text round-trips exactly when
    ``vocab_size >= 256`` (smaller vocabularies fold bytes together and do not round-trip).
    When decoding, ids ``>= 256`` (not bytes) become the visible placeholder ``<|id|>`` (so a
    random model's output shows what it produced); invalid UTF-8 becomes U+FFFD.
    """

    def __init__(
        self,
        vocab_size: int,
        eos_token_ids: tuple[int, ...] = (),
        bos_token_id: int | None = None,
    ):
        if vocab_size <= 0:
            raise ArgumentError(f"ByteTokenizer: vocab_size={vocab_size}; expected a positive int")
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids (BOS first if the tokenizer has one)."""
        ids = [b % self.vocab_size for b in text.encode("utf-8")]
        if add_special_tokens and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Bytes back to text; BOS/EOS dropped when ``skip_special_tokens``, other non-byte
        ids shown as ``<|id|>``."""
        special = {self.bos_token_id, *self.eos_token_ids} if skip_special_tokens else set()
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if i in special:
                continue
            if 0 <= i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(f"<|{i}|>")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face fast tokenizer) with the BOS/EOS settings of the
    folder's ``tokenizer_config.json`` / ``generation_config.json``."""

    def __init__(
        self,
        tokenizer: Any,
        eos_token_ids: tuple[int, ...] = (),
        bos_token_id: int | None = None,
        add_bos_token: bool | None = None,
    ):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id
        #: None: the tokenizer.json post-processor decides (as transformers' fast tokenizers
        #: do); True/False: tokenizer_config.json's ``add_bos_token`` overrides it.
        self.add_bos_token = add_bos_token

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the model expects (BOS)."""
        special = add_special_tokens and self.add_bos_token is not False
        ids = list(self.tokenizer.encode(text, add_special_tokens=special).ids)
        bos = self.bos_token_id
        wants_bos = add_special_tokens and self.add_bos_token and bos is not None
        if wants_bos and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (special tokens such as EOS left out when asked)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.warn(f"llm: ignoring {str(path)!r}: not valid JSON ({e})", stacklevel=3)
        return {}
    return data if isinstance(data, dict) else {}


def _token_id(tokenizer: Any, token: Any) -> int | None:
    """The id of a token written as a string or as an AddedToken dict ({"content": ...})."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    return tokenizer.token_to_id(token)


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def load_tokenizer(folder: str | os.PathLike) -> HFTokenizer | None:
    """The tokenizer of a Hugging Face model folder (its ``tokenizer.json``), or None when the
    folder has none. BOS/EOS come from ``generation_config.json`` (the ids ``generate`` stops
    on), ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``add_bos_token``) and, when
    neither names an EOS, ``config.json``."""
    root = Path(folder).expanduser()
    path = root / TOKENIZER_FILE
    if not path.is_file():
        if (root / "tokenizer.model").is_file():
            # A SentencePiece-only folder: reading it needs sentencepiece + transformers.
            warnings.warn(
                f"llm: {str(root)!r} has tokenizer.model but no tokenizer.json; kernforge reads "
                "tokenizer.json only (write one with transformers: AutoTokenizer."
                "from_pretrained(folder).save_pretrained(folder)); prompts must be token ids",
                stacklevel=2,
            )
        return None
    from tokenizers import Tokenizer as _Tokenizer

    try:
        tok = _Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ConfigError(f"llm: cannot read {str(path)!r} as a tokenizer: {e}") from None
    tok_cfg = _read_json(root / "tokenizer_config.json")
    gen_cfg = _read_json(root / "generation_config.json")
    model_cfg = _read_json(root / "config.json")

    eos = _ids(gen_cfg.get("eos_token_id"))
    tok_eos = _token_id(tok, tok_cfg.get("eos_token"))
    if tok_eos is not None:
        eos.append(tok_eos)
    if not eos:
        eos = _ids(model_cfg.get("eos_token_id"))
    bos = _token_id(tok, tok_cfg.get("bos_token"))
    if bos is None:
        bos = next(iter(_ids(gen_cfg.get("bos_token_id")) or _ids(model_cfg.get("bos_token_id"))),
                   None)  # fmt: skip
    add_bos = tok_cfg.get("add_bos_token")
    return HFTokenizer(
        tok,
        eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=bos,
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
    )


class StreamDecoder:
    """Text of a growing id sequence, one piece per :meth:`push`, for streaming output.

    Decodes a short window of recent ids rather than everything so far, and holds text back
    while it ends in an incomplete UTF-8 sequence (U+FFFD), so a character split over several
    byte-level tokens comes out whole. The pieces joined equal ``decode(all ids)`` for
    tokenizers whose decode of a suffix is the suffix of the decode (BPE, bytes).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window (already emitted context)
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: int | list[int]) -> str:
        """Add new ids; returns the text they complete (maybe "")."""
        self.ids.extend([ids] if isinstance(ids, int) else [int(i) for i in ids])
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character shows as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(before) :]
