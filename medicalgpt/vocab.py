"""Vocabulary extension of BPE tokenizers, and the embedding rows of the tokens it adds.

Both tokenizer families a medical team extends are BPE models in a tokenizer.json: SentencePiece-converted ones
(Llama-2, Mistral, Baichuan: "▁" marks a space, unknown characters fall back to bytes) and byte-level ones
(Qwen, Llama-3: every byte is a symbol). A domain token is added as a vocabulary entry plus merges appended after
all of the base's. BPE applies merges in rank order, so on any text the base's merges all apply first, exactly as
before, and the new merges only join what is left: text in which no new merge applies encodes as it did, and no
text encodes to more tokens than before.
"""

import json
import math
import re

import torch
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from medicalgpt.errors import UsageError

BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {char: byte for byte, char in BYTE_ENCODER.items()}
BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_spec(tokenizer) -> dict:
    """The tokenizer.json of a fast tokenizer, as a dict."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError(f"{type(tokenizer).__name__} has no tokenizer.json: vocabulary tools need a fast tokenizer")
    return json.loads(backend.to_str())


def token_style(spec: dict) -> str:
    """byte_level (Qwen, Llama-3, GPT-2) or sentencepiece (▁ for spaces: Llama-2, Mistral, converted .model files)."""
    parts = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")], ensure_ascii=False)
    if '"ByteLevel"' in parts:
        return "byte_level"
    if '"Metaspace"' in parts or "▁" in parts:
        return "sentencepiece"
    raise UsageError("unsupported tokenizer: neither byte-level nor SentencePiece-style (▁) pieces")


def token_bytes(token: str, style: str) -> bytes | None:
    """The text a vocabulary token stands for, as UTF-8 bytes (None for byte-fallback pieces like <0xE5>)."""
    if style == "byte_level":
        return bytes(BYTE_DECODER[c] for c in token) if all(c in BYTE_DECODER for c in token) else None
    return None if BYTE_FALLBACK.fullmatch(token) else token.replace("▁", " ").encode("utf-8")


def utf8(raw: bytes | None) -> str | None:
    """raw as text, or None when it is not whole UTF-8 characters."""
    try:
        return raw.decode("utf-8") if raw is not None else None
    except UnicodeDecodeError:
        return None


def model_token(text: str, style: str) -> str:
    """text written as a token of a style's vocabulary."""
    return "".join(BYTE_ENCODER[b] for b in text.encode("utf-8")) if style == "byte_level" else text.replace(" ", "▁")


def domain_vocabulary(tokenizer) -> list[str]:
    """A domain tokenizer's vocabulary as text, in its own order (BPE: merge order; SentencePiece: by score).

    Special tokens and pieces that are not whole characters (byte-level fragments, byte fallbacks) are left out.
    """
    spec = tokenizer_spec(tokenizer)
    style, vocab = token_style(spec), spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get) if isinstance(vocab, dict) else [piece for piece, _ in vocab]
    special = {added["content"] for added in spec.get("added_tokens", [])}
    texts = (utf8(token_bytes(token, style)) for token in tokens if token not in special)
    return [text for text in texts if text and text.strip()]


def apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE: join the adjacent pair of lowest rank, leftmost first, until no pair has a rank."""
    while True:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:])) if pair in ranks]
        if not ranked:
            return pieces
        i = min(ranked)[1]
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]


class BpeExtension:
    """A BPE tokenizer.json growing by vocabulary entries and merges ranked after all of the base's."""

    def __init__(self, spec: dict):
        if spec["model"]["type"] != "BPE":
            raise UsageError(f"only BPE tokenizers can be extended; this one is {spec['model']['type']}")
        self.spec, self.style = json.loads(json.dumps(spec)), token_style(spec)
        self.vocab, self.merges = self.spec["model"]["vocab"], self.spec["model"]["merges"]
        self.base_vocab = set(self.vocab)
        ids = [*self.vocab.values(), *(added["id"] for added in spec.get("added_tokens", []))]
        self.next_id = max(ids) + 1
        self.ranks: dict[tuple[str, str], int] = {}
        self.added: list[str] = []
        self.skipped: dict[str, int] = dict.fromkeys(
            ("in_base", "split_by_pre_tokenizer", "unknown_characters", "base_token_on_the_way", "over_limit"), 0)
        self.rebuild()

    def rebuild(self) -> None:
        """The tokenizer as extended so far, for segmenting the next tokens."""
        self.tokenizer = Tokenizer.from_str(json.dumps(self.spec))

    def add_entry(self, token: str) -> None:
        self.vocab[token] = self.next_id
        self.next_id += 1
        self.added.append(token)

    def add_merge(self, left: str, right: str) -> None:
        self.ranks[left, right] = len(self.ranks)
        self.merges.append([left, right] if not self.merges or isinstance(self.merges[0], list) else f"{left} {right}")

    def reachable(self, text: str) -> bool:
        """Whether the pre-tokenizer keeps text in one piece (merges never cross pieces)."""
        pre_tokenizer = self.tokenizer.pre_tokenizer
        return pre_tokenizer is None or len(pre_tokenizer.pre_tokenize_str(text)) == 1

    def candidates(self, texts: list[str]) -> list[str]:
        """The tokens of texts the base lacks and could reach by merges, in order, without duplicates."""
        tokens = []
        for text in dict.fromkeys(texts):
            token = model_token(text, self.style)
            reason = "in_base" if token in self.vocab else None if self.reachable(text) else "split_by_pre_tokenizer"
            if reason:
                self.skipped[reason] += 1
            else:
                tokens.append(token)
        return tokens

    def chain(self, token: str) -> list[tuple[str, str]] | None:
        """Merges (left to right) that build token from its current segmentation; None when impossible."""
        pieces = apply_merges([t.value for t in self.tokenizer.model.tokenize(token)], self.ranks)
        unknown = self.spec["model"].get("unk_token")
        if any(BYTE_FALLBACK.fullmatch(piece) or piece == unknown for piece in pieces):
            self.skipped["unknown_characters"] += 1
            return None
        pairs = []
        while len(pieces) > 1:
            pairs.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
        # A merge producing a base token would change how base text encodes.
        if any(left + right in self.base_vocab for left, right in pairs):
            self.skipped["base_token_on_the_way"] += 1
            return None
        return pairs

    def commit(self, token: str, pairs: list[tuple[str, str]], limit: float) -> None:
        """Add token with its merges (and the intermediate tokens they make), unless that passes the limit."""
        new = list(dict.fromkeys(left + right for left, right in pairs if left + right not in self.vocab))
        new = new if pairs else [token]
        if len(self.added) + len(new) > limit:
            self.skipped["over_limit"] += 1
            return
        for entry in new:
            self.add_entry(entry)
        for pair in pairs:
            if pair not in self.ranks:
                self.add_merge(*pair)

    def extend(self, texts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """Add texts as tokens (with the intermediate tokens their merges need); returns every token added."""
        limit = math.inf if max_new_tokens is None else max_new_tokens
        tokens = self.candidates(texts)
        # Characters first: a SentencePiece vocabulary takes a new character as a plain entry, and later
        # segmentations start from it.
        for token in (t for t in tokens if len(t) == 1):
            self.commit(token, [], limit)
        self.rebuild()
        for token in (t for t in tokens if len(t) > 1):
            pairs = self.chain(token)
            if pairs is not None:
                self.commit(token, pairs, limit)
        return self.added


def new_token_ids(tokenizer, base_tokenizer) -> list[int]:
    """The ids tokenizer has beyond base_tokenizer, which must keep every base token at its id (an extension)."""
    vocab, base = tokenizer.get_vocab(), base_tokenizer.get_vocab()
    moved = [token for token, token_id in base.items() if vocab.get(token) != token_id]
    if moved:
        raise UsageError(f"the tokenizer is not an extension of the model's own: {len(moved)} of its tokens are "
                         f"missing or have other ids (e.g. {moved[0]!r}); --resize_embeddings only adds rows")
    return sorted(set(vocab.values()) - set(base.values()))


def subword_ids(token_id: int, tokenizer, base_tokenizer) -> list[int]:
    """The base token ids a new token replaces: its piece segmented by the base BPE (an added token: its text)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False):
        return [piece.id for piece in base_tokenizer.backend_tokenizer.model.tokenize(token)]
    return base_tokenizer.encode(tokenizer.decode([token_id]), add_special_tokens=False)


@torch.no_grad()
def resize_embeddings(model, tokenizer, base_tokenizer) -> int:
    """Give the model a row for every token tokenizer adds to base_tokenizer; returns how many tokens are new.

    A new row (input embedding, and output head when it is not tied) is the mean of the rows of the subword
    tokens the new token replaces, so the model starts out reading and predicting it like that subword sequence.
    """
    new_ids = new_token_ids(tokenizer, base_tokenizer)
    if not new_ids:
        return 0
    if max(new_ids) >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
    sources = {i: subword_ids(i, tokenizer, base_tokenizer) for i in new_ids}
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    for weight in weights:
        for token_id, ids in sources.items():
            weight[token_id] = weight[ids].mean(0)
    return len(new_ids)
