"""Ranking chunks for a query: BM25 (bm25s) on jieba words, dense embeddings from any Hugging Face or
sentence-transformers model, reciprocal-rank fusion of several rankings, and an optional cross-encoder reranker.

Anything with `search(query, k) -> list[(chunk id, score)]` is a Retriever: a vector store you already run (Qdrant,
Milvus, pgvector, Elasticsearch) plugs in beside the built-in ones through that one method (docs/rag.md).
"""

import json
import logging
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from medicalgpt.rag.chunking import HAN

WORD = re.compile(rf"[{HAN}]+|[^\W_]+", re.UNICODE)
RRF_K = 60  # the constant of reciprocal-rank fusion (Cormack et al., 2009): 1 / (60 + rank)


class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ids of the k best chunks for the query, best first, with scores (higher is better)."""


_jieba = None


def words(text: str) -> list[str]:
    """BM25 terms: lower-cased words and numbers; Chinese segmented by jieba's search mode (a word and its parts,
    so 高血压 matches 血压), plus each Han character's bigrams for terms jieba does not know."""
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    terms: list[str] = []
    for run in WORD.findall(text.lower()):
        if re.match(rf"[{HAN}]", run):
            terms += [w for w in _jieba.lcut_for_search(run) if w.strip()]
            terms += [run[i: i + 2] for i in range(len(run) - 1)]
        else:
            terms.append(run)
    return terms


class BM25Retriever:
    """bm25s over the chunks' terms; saved to and loaded from a directory."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def build(cls, terms: list[list[str]]) -> "BM25Retriever":
        """From each chunk's words(): kept with the index, so that an update segments only new text."""
        import bm25s

        model = bm25s.BM25()
        model.index(terms, show_progress=False)
        return cls(model)

    @classmethod
    def load(cls, directory: Path) -> "BM25Retriever":
        import bm25s

        return cls(bm25s.BM25.load(str(directory)))

    def save(self, directory: Path) -> None:
        self.model.save(str(directory), show_progress=False)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        count = int(self.model.scores["num_docs"])
        terms = [w for w in words(query) if w in self.model.vocab_dict]
        if not terms or not count:
            return []
        ids, scores = self.model.retrieve([terms], k=min(k, count), show_progress=False)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]


class Embedder:
    """Sentence embeddings from a model directory or hub name: the pooling a sentence-transformers model declares
    (1_Pooling/config.json: CLS, mean or last token), else the mean over tokens; L2-normalised."""

    def __init__(self, name_or_path: str, batch_size: int = 32, max_length: int = 512):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self.tokenizer.pad_token is None:  # decoder-based embedding models (Qwen3-Embedding) may have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(name_or_path).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.pooling = "mean"
        pooling_config = Path(name_or_path) / "1_Pooling" / "config.json"
        if pooling_config.is_file():
            config = json.loads(pooling_config.read_text(encoding="utf-8"))
            self.pooling = "cls" if config.get("pooling_mode_cls_token") else \
                "last" if config.get("pooling_mode_lasttoken") else "mean"

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        vectors = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start: start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"][..., None].float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "last":  # right padding: the last real token of each row
                pooled = hidden[torch.arange(len(hidden)), batch["attention_mask"].sum(1) - 1]
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1)
            vectors.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


class DenseRetriever:
    """Cosine similarity of the query's embedding with every chunk's (exact search: fine to ~10^6 chunks)."""

    def __init__(self, embedder: Embedder, vectors: np.ndarray):
        self.embedder, self.vectors = embedder, vectors

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        scores = self.vectors @ self.embedder.encode([query])[0]
        best = np.argsort(-scores)[:k]
        return [(int(i), float(scores[i])) for i in best]


def reciprocal_rank_fusion(rankings: list[list[tuple[int, float]]], k: int) -> list[tuple[int, float]]:
    """One ranking from several: each id scores sum(1 / (RRF_K + rank)) over the rankings it is in."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (chunk_id, _) in enumerate(ranking, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: -item[1])[:k]


class Reranker:
    """A cross-encoder (a sequence classifier over query + passage, e.g. BAAI/bge-reranker-base) that rescores
    candidates; its first logit is the relevance."""

    def __init__(self, name_or_path: str, batch_size: int = 16, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    def scores(self, query: str, texts: list[str]) -> list[float]:
        import torch

        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start: start + self.batch_size]
            inputs = self.tokenizer([query] * len(batch), batch, padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                out += self.model(**inputs).logits[:, 0].float().tolist()
        return out
