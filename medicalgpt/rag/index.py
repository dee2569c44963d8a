"""The on-disk index of a folder of documents: chunks, a BM25 index and optional embeddings.

Updating re-reads only the files whose size or modification time changed (and re-embeds only their chunks); a
file that cannot be read is skipped with a one-line warning naming it. Loading refuses an index whose documents
changed since it was built, naming them and the command that updates it.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medicalgpt.errors import UsageError
from medicalgpt.rag.chunking import chunk_passages
from medicalgpt.rag.loaders import SkippedFile, find_documents, load_document
from medicalgpt.rag.retrieval import (
    BM25Retriever,
    DenseRetriever,
    Embedder,
    Reranker,
    Retriever,
    reciprocal_rank_fusion,
    words,
)

FORMAT = 1  # of the files below; an index of another format is rebuilt, never misread
MANIFEST, CHUNKS, TERMS, EMBEDDINGS, BM25_DIR = "manifest.json", "chunks.jsonl", "terms.jsonl", "embeddings.npy", "bm25"
RETRIEVAL_MODES = ["auto", "bm25", "dense", "hybrid"]


@dataclass
class RagArguments:
    """Retrieval flags shared by rag.py, the API server, the chat demo and evaluation."""

    rag_index: str | None = field(default=None, metadata={
        "help": "An index built by `python rag.py index DOCS --index_dir DIR`: answers use its top chunks as "
                "context and cite them."})
    rag_top_k: int = field(default=3, metadata={"help": "Chunks retrieved per question."})
    retrieval: str = field(default="auto", metadata={"choices": RETRIEVAL_MODES, "help": (
        "bm25; dense (needs an index built with --embedding_model); hybrid: both, fused by reciprocal rank; "
        "auto: hybrid when the index has embeddings, else bm25.")})
    reranker_model: str | None = field(default=None, metadata={
        "help": "A cross-encoder (e.g. BAAI/bge-reranker-base) that re-scores the top candidates."})


@dataclass
class Hit:
    """A retrieved chunk: its document (as named in the index), page or line, text and score."""

    file: str
    text: str
    score: float
    page: int | None = None
    line: int | None = None

    @property
    def location(self) -> str:
        return f"{self.file}, page {self.page}" if self.page else f"{self.file}, line {self.line}"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _display_names(sources: list[Path]) -> dict[Path, str]:
    """Each document's name in citations: its path under the folder given, or its file name."""
    names = {}
    for source in sources:
        for path in find_documents([source]):
            names[path.resolve()] = str(path.relative_to(source)) if source.is_dir() else path.name
    return names


def _read_manifest(index_dir: Path) -> dict | None:
    path = index_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return manifest if manifest.get("format") == FORMAT else None


def build_index(sources: list[str], index_dir: str, chunk_size: int = 200, chunk_overlap: int = 40,
                embedding_model: str | None = None, max_file_mb: float = 50) -> dict:
    """Create or update the index of the documents under `sources` (folders and files); returns a summary."""
    start = time.perf_counter()
    roots = [Path(s) for s in sources]
    if missing := [str(r) for r in roots if not r.exists()]:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    index_dir = Path(index_dir)
    old = _read_manifest(index_dir) or {"files": {}}
    settings = {"chunk_size": chunk_size, "chunk_overlap": chunk_overlap, "embedding_model": embedding_model}
    same_chunks = all(old.get(k) == settings[k] for k in ("chunk_size", "chunk_overlap"))
    same_vectors = same_chunks and old.get("embedding_model") == embedding_model
    old_chunks = _read_jsonl(index_dir / CHUNKS) if same_chunks else []
    old_terms = _read_jsonl(index_dir / TERMS) if same_chunks else []
    old_vectors = np.load(index_dir / EMBEDDINGS) if same_vectors and embedding_model else None

    files, chunks, terms, vectors, reused, skipped, new_texts = {}, [], [], [], 0, {}, []
    for path, name in _display_names(roots).items():
        stamp, key = _stamp(path), str(path)
        previous = old["files"].get(key)
        rows = None  # the file's rows in the old index, when it is unchanged
        if same_chunks and previous and previous["name"] == name and {k: previous[k] for k in stamp} == stamp:
            rows = slice(*previous["chunks"])
            file_chunks, file_terms = old_chunks[rows], old_terms[rows]
            reused += 1
        else:
            try:
                passages = load_document(path, int(max_file_mb * 2**20))
            except (SkippedFile, OSError) as error:
                reason = f"cannot read it ({error.strerror})" if isinstance(error, OSError) else str(error)
                warn(f"{path}: {reason}; skipped")
                skipped[key] = {**stamp, "reason": reason}
                continue
            file_chunks = [{"file": name, **asdict(c)} for c in chunk_passages(passages, chunk_size, chunk_overlap)]
            file_terms = [words(c["text"]) for c in file_chunks]  # the slow part of indexing (jieba)
        if embedding_model:
            vectors.append(old_vectors[rows] if rows is not None and old_vectors is not None else None)
            if vectors[-1] is None:  # embedded below, once the model is loaded
                new_texts.append((len(vectors) - 1, [c["text"] for c in file_chunks]))
        files[key] = {"name": name, **stamp, "chunks": [len(chunks), len(chunks) + len(file_chunks)]}
        chunks += file_chunks
        terms += file_terms
    if not chunks:
        raise UsageError(f"nothing to index in {', '.join(sources)}: no readable .txt/.md/.pdf/.docx/.jsonl "
                         "documents")
    if new_texts:
        embedder = Embedder(embedding_model)
        for position, texts in new_texts:
            vectors[position] = embedder.encode(texts)

    index_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=index_dir.parent, prefix=f".{index_dir.name}-"))
    for filename, records in ((CHUNKS, chunks), (TERMS, terms)):
        (staging / filename).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    BM25Retriever.build(terms).save(staging / BM25_DIR)
    if embedding_model:
        np.save(staging / EMBEDDINGS, np.concatenate(vectors).astype(np.float32))
    manifest = {"format": FORMAT, **settings, "sources": [str(r.resolve()) for r in roots], "files": files,
                "skipped": skipped}
    (staging / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1), "utf-8")
    if index_dir.exists():
        shutil.rmtree(index_dir)
    os.replace(staging, index_dir)  # a reader never sees a half-written index
    return {"files": len(files), "reused": reused, "updated": len(files) - reused,
            "skipped": [f"{Path(path).name}: {entry['reason']}; skipped" for path, entry in skipped.items()],
            "removed": len(set(old["files"]) - set(files)), "chunks": len(chunks),
            "seconds": round(time.perf_counter() - start, 2)}


def _read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def stale_documents(manifest: dict) -> list[str]:
    """Documents added, changed or removed since the index was built (its skipped files included)."""
    recorded = {**manifest["files"], **manifest["skipped"]}
    changed = [path for path, entry in recorded.items()
               if not Path(path).is_file() or {k: entry[k] for k in ("size", "mtime_ns")} != _stamp(Path(path))]
    current = {str(p.resolve()) for p in find_documents([Path(s) for s in manifest["sources"]])}
    return changed + sorted(current - set(recorded))


class RagIndex:
    """A loaded index: search(query) -> the best chunks as Hits. `external` retrievers (a vector store you run,
    holding these chunks under their line numbers in chunks.jsonl) are fused with the built-in rankings."""

    def __init__(self, index_dir: str, reranker_model: str | None = None):
        update = f"python rag.py index DOCS --index_dir {index_dir or 'DIR'}"
        if not index_dir:
            raise UsageError(f"no index given: pass --index_dir (or --rag_index), built with `{update}`")
        directory = Path(index_dir)
        self.manifest = _read_manifest(directory)
        if self.manifest is None:
            raise UsageError(f"no index in {index_dir}: build it with `{update}`")
        if stale := stale_documents(self.manifest):
            shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
            sources = " ".join(self.manifest["sources"])
            raise UsageError(f"the index in {index_dir} is stale: {len(stale)} document(s) changed since it was "
                             f"built ({shown}); update it with `python rag.py index {sources} --index_dir "
                             f"{index_dir}`")
        self.chunks = _read_jsonl(directory / CHUNKS)
        self.bm25 = BM25Retriever.load(directory / BM25_DIR)
        self.vectors = np.load(directory / EMBEDDINGS) if self.manifest["embedding_model"] else None
        self.dense: DenseRetriever | None = None  # the embedding model loads on the first dense search
        self.reranker = Reranker(reranker_model) if reranker_model else None
        self.external: list[Retriever] = []

    def _dense(self) -> DenseRetriever:
        if self.vectors is None:
            raise UsageError("--retrieval dense/hybrid needs an index built with --embedding_model")
        if self.dense is None:
            self.dense = DenseRetriever(Embedder(self.manifest["embedding_model"]), self.vectors)
        return self.dense

    def search(self, query: str, k: int = 3, retrieval: str = "auto") -> list[Hit]:
        if retrieval == "auto":
            retrieval = "hybrid" if self.vectors is not None else "bm25"
        depth = max(4 * k, 20) if self.reranker or retrieval == "hybrid" else k  # candidates to fuse or rerank
        rankings = ([self.bm25.search(query, depth)] if retrieval in ("bm25", "hybrid") else []) + \
            ([self._dense().search(query, depth)] if retrieval in ("dense", "hybrid") else [])
        rankings += [retriever.search(query, depth) for retriever in self.external]
        ranked = rankings[0] if len(rankings) == 1 else reciprocal_rank_fusion(rankings, depth)
        if self.reranker and ranked:
            scores = self.reranker.scores(query, [self.chunks[i]["text"] for i, _ in ranked])
            ranked = sorted(zip((i for i, _ in ranked), scores, strict=True), key=lambda item: -item[1])
        return [Hit(score=score, **self.chunks[i]) for i, score in ranked[:k]]
