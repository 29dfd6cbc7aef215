"""open_clip's CLIP BPE tokenizer, written here (no open_clip at run time).

It is open_clip's ``SimpleTokenizer`` (``clean="lower"``, the default, or ``"whitespace"``):

1. ``basic_clean``: ``ftfy.fix_text``, ``html.unescape`` twice, ``strip``;
2. ``whitespace_clean``: ``" ".join(text.split())``; then lower-casing (``clean="lower"``);
3. the CLIP pre-tokenisation pattern and byte-level BPE over ``bpe_simple_vocab_16e6.txt.gz``
   (OpenAI CLIP's merges, MIT licence; the same file open_clip ships, packaged here beside this
   module, and the same vocabulary as transformers' CLIP ``vocab.json`` / ``merges.txt``);
4. ``[<start_of_text>] + tokens + [<end_of_text>]`` in a ``context_length`` (77) row padded with 0;
   an over-long text is truncated and its last token set to ``<end_of_text>``.

open_clip uses this vocabulary for every checkpoint whose ``text_cfg`` names no
``hf_tokenizer_name``, whatever tokenizer files a hub repository carries, so a checkpoint needs no
tokenizer files of its own.

**ftfy.** open_clip runs ``ftfy.fix_text`` first. When ftfy is installed (``pip install ftfy``,
part of phiclip's ``open-clip`` and ``dev`` extras) it is used and the tokens are open_clip's
exactly. Without it, :func:`fix_text_fallback` applies the fixes of ``fix_text`` that are a fixed
mapping (NFC, curly quotes, Latin ligatures, full-width characters, line breaks, control and
terminal-escape characters, HTML entities): tokens then differ from open_clip's only on text that
ftfy would repair as mojibake (UTF-8 decoded as Latin-1/Windows-1252, e.g. ``"cafÃ©"``).
``describe()`` says which is in use. transformers' ``CLIPTokenizer`` on the same vocabulary
differs more (no HTML unescaping, no quote or width fixes, and it keeps the text's case rules of
its own normaliser), so it is not used.
"""

from __future__ import annotations

import gzip
import html
import json
import re as _re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import regex

#: The packaged vocabulary (OpenAI CLIP's BPE merges; MIT licence).
BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
DEFAULT_CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
SOT, EOT = "<start_of_text>", "<end_of_text>"
#: transformers' names of the same two tokens (ids 49406, 49407).
HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
CLEAN_MODES = ("lower", "whitespace")


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache
def read_merges(path: str | Path = BPE_PATH) -> tuple[tuple[str, str], ...]:
    """The 48894 BPE merges of the packaged vocabulary file."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])  # type: ignore[misc]


def vocabulary(merges: tuple[tuple[str, str], ...] | None = None) -> list[str]:
    """The 49408 token strings in id order (open_clip's names for the two special tokens)."""
    merges = read_merges() if merges is None else merges
    base = list(bytes_to_unicode().values())
    return base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [SOT, EOT]


# --- ftfy ---------------------------------------------------------------------------------------
_SINGLE_QUOTES = "\u02bc\u2018\u2019\u201a\u201b"
_DOUBLE_QUOTES = "\u201c\u201d\u201e\u201f"
_LIGATURES = {"\u0132": "IJ", "\u0133": "ij", "\u0149": "ʼn", "\u01c4": "DŽ", "\u01c5": "Dž", "\u01c6": "dž",
              "\u01c7": "LJ", "\u01c8": "Lj", "\u01c9": "lj", "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj",
              "\u01f1": "DZ", "\u01f2": "Dz", "\u01f3": "dz", "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl",
              "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "ſt", "\ufb06": "st"}
_TERMINAL_ESCAPES = _re.compile(r"\033\[((?:\d|;)*)([a-zA-Z])")
_CONTROL_CHARS = {c: None for c in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, 0x206A, 0x206B, 0x206C,
                                    0x206D, 0x206E, 0x206F, 0xFEFF, 0xFFF9, 0xFFFA, 0xFFFB,
                                    *range(0x1D173, 0x1D17B), *range(0xE0000, 0xE0080)]}


def _fix_width(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if 0xFF01 <= code <= 0xFF5E or code == 0x3000 or 0xFF61 <= code <= 0xFFEF:
            out.append(unicodedata.normalize("NFKC", ch))
        else:
            out.append(ch)
    return "".join(out)


def fix_text_fallback(text: str) -> str:
    """The fixed-mapping part of ``ftfy.fix_text`` (used when ftfy is not installed): terminal
    escapes and control characters removed, HTML entities unescaped (when the text has no ``<``),
    Latin ligatures and full-width characters replaced, curly quotes straightened, line breaks
    made ``\\n``, NFC. Mojibake is not repaired."""
    text = _TERMINAL_ESCAPES.sub("", text)
    if "<" not in text:
        text = html.unescape(text)
    text = "".join(_LIGATURES.get(ch, ch) for ch in text)
    text = _fix_width(text)
    text = text.translate({ord(c): "'" for c in _SINGLE_QUOTES}).translate({ord(c): '"' for c in _DOUBLE_QUOTES})
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    text = text.replace("\u0085", "\n")
    text = text.translate(_CONTROL_CHARS)
    return unicodedata.normalize("NFC", text)


def _fix_text_function() -> tuple[Any, str]:
    try:
        import ftfy
    except ImportError:
        return fix_text_fallback, "phiclip fallback (ftfy not installed: mojibake is not repaired)"
    return ftfy.fix_text, f"ftfy {ftfy.__version__}"


class OpenCLIPTokenizer:
    """open_clip's ``SimpleTokenizer`` (see the module docstring), callable like a transformers
    tokenizer by the CLIP encoder: ``tokenizer(texts, return_tensors="pt")`` gives ``input_ids``
    (n, context_length) exactly as ``open_clip.tokenize`` makes them and an ``attention_mask`` of
    ones (open_clip's text tower masks only causally; the pooled end token sees no padding)."""

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, clean: str = "lower") -> None:
        if clean not in CLEAN_MODES:
            raise ValueError(f"open_clip tokenizer clean={clean!r} is not supported ({', '.join(CLEAN_MODES)})")
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"open_clip tokenizer context_length {context_length!r} must be an integer >= 2")
        merges = read_merges()
        self.context_length = context_length
        self.model_max_length = context_length
        self.clean = clean
        self.encoder = {token: i for i, token in enumerate(vocabulary(merges))}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        self.cache: dict[str, str] = {SOT: SOT, EOT: EOT}
        self.pattern = regex.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)
        self.fix_text, self.fixer = _fix_text_function()

    def __len__(self) -> int:
        return len(self.encoder)

    # --- open_clip's steps ------------------------------------------------------------------
    def clean_text(self, text: str) -> str:
        text = html.unescape(html.unescape(self.fix_text(text))).strip()
        text = " ".join(text.split()).strip()
        return text.lower() if self.clean == "lower" else text

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = set(zip(word, word[1:]))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:]))
        joined = " ".join(word)
        if len(self.cache) < 100_000:
            self.cache[token] = joined
        return joined

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start and end tokens."""
        ids: list[int] = []
        for token in self.pattern.findall(self.clean_text(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def tokenize(self, texts: str | list[str], context_length: int | None = None) -> Any:
        """``open_clip.tokenize``: (n, context_length) int64 tensor, padded with 0."""
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = self.eot_token_id
            out[i, : len(tokens)] = torch.tensor(tokens)
        return out

    def __call__(self, texts: str | list[str], *, return_tensors: str = "pt", **_ignored: Any) -> dict[str, Any]:
        """Like a transformers tokenizer call (``padding``, ``truncation`` and ``max_length`` are
        open_clip's own: always ``context_length``)."""
        import torch

        if return_tensors != "pt":
            raise ValueError("OpenCLIPTokenizer returns torch tensors only (return_tensors='pt')")
        ids = self.tokenize(texts)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def describe(self) -> dict[str, Any]:
        return {"implementation": "phiclip open_clip SimpleTokenizer", "vocabulary": BPE_PATH.name,
                "context_length": self.context_length, "clean": self.clean, "fix_text": self.fixer}

    # --- transformers files -------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> list[str]:
        """Write transformers CLIP tokenizer files for the same vocabulary (``CLIPTokenizer``
        loads them). transformers' tokenizer does not clean text as open_clip does (see the
        module docstring); ids are the same for already-clean text."""
        return save_hf_tokenizer(out_dir, self.context_length)


def hf_vocabulary() -> tuple[dict[str, int], list[str]]:
    """transformers' ``vocab.json`` (token -> id) and ``merges.txt`` lines for this vocabulary."""
    merges = read_merges()
    vocab = vocabulary(merges)
    vocab[-2:] = [HF_SOT, HF_EOT]
    return {t: i for i, t in enumerate(vocab)}, ["#version: 0.2", *(" ".join(m) for m in merges)]


def save_hf_tokenizer(out_dir: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> list[str]:
    """Write a transformers ``CLIPTokenizer`` for this vocabulary into ``out_dir``; returns the files."""
    import tempfile

    from transformers import CLIPTokenizer

    vocab, merge_lines = hf_vocabulary()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=context_length,
                                  pad_token=HF_EOT)
        return [str(p) for p in tokenizer.save_pretrained(str(out_dir))]


__all__ = [
    "BPE_PATH",
    "DEFAULT_CONTEXT_LENGTH",
    "VOCAB_SIZE",
    "OpenCLIPTokenizer",
    "fix_text_fallback",
    "hf_vocabulary",
    "save_hf_tokenizer",
]
