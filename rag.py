"""Answers from your own documents, with citations: index a folder, look up passages, ask the chat model.

    python rag.py index data/rag/docs --index_dir outputs-rag-index
    python rag.py query --index_dir outputs-rag-index "What is the review interval for gout?"
    python rag.py ask --index_dir outputs-rag-index --base_model outputs-merged "痛风患者多久复诊？"

index: .txt/.md/.pdf/.docx/.jsonl under the folders given, cut into sentence-aware chunks (--chunk_size and
--chunk_overlap in tokens), kept on disk with a BM25 index (and embeddings with --embedding_model). Run it again
after the documents change: only new or changed files are read again. A file that cannot be read is skipped with
a warning naming it. query: the best chunks with their file, page or line and score. ask: the chat model answers
from them and cites them as [1], [2]; the numbered sources follow the answer.
"""

import difflib
import sys
from dataclasses import asdict, dataclass, field

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from transformers import HfArgumentParser

from medicalgpt.answering import GenerationArguments, check_generation_args
from medicalgpt.args import parse_args
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.generation import generate
from medicalgpt.rag.grounding import format_sources, grounded_messages
from medicalgpt.rag.index import RagArguments, RagIndex, build_index
from medicalgpt.serving import AdapterArguments, BaseModelArguments, load_chat_model


@dataclass
class IndexArguments:
    index_dir: str = field(metadata={"help": "Where the index is kept (created, or updated in place)."})
    chunk_size: int = field(default=200, metadata={"help": "Most tokens per chunk (a Han character, a word or a "
                                                           "punctuation mark is a token)."})
    chunk_overlap: int = field(default=40, metadata={"help": "Tokens of whole sentences repeated from the chunk "
                                                              "before, so that no fact is cut off from its context."})
    embedding_model: str | None = field(default=None, metadata={"help": (
        "Also embed the chunks for dense retrieval: a sentence-transformers or Hugging Face model path or hub name "
        "(e.g. BAAI/bge-small-zh-v1.5). Default: BM25 only.")})
    max_file_mb: float = field(default=50, metadata={"help": "Skip (with a warning) files larger than this."})


@dataclass
class QueryArguments(RagArguments):
    rag_index: str = field(default=None, metadata={"aliases": ["--index_dir"], "help": "The index to search."})


GROUPS = {"index": (IndexArguments,), "query": (QueryArguments,),
          "ask": (BaseModelArguments, AdapterArguments, GenerationArguments, QueryArguments)}


def index(argv: list[str]) -> None:
    args, documents = parse_args(GROUPS["index"], argv, positional="documents")
    summary = build_index(documents, args.index_dir, args.chunk_size, args.chunk_overlap, args.embedding_model,
                          args.max_file_mb)
    print(f"Indexed {summary['files']} documents into {args.index_dir}: {summary['chunks']} chunks; "
          f"{summary['updated']} read, {summary['reused']} unchanged, {summary['removed']} removed, "
          f"{len(summary['skipped'])} skipped; {summary['seconds']} s")


def query(argv: list[str]) -> None:
    args, words = parse_args(GROUPS["query"], argv, positional="question")
    hits = RagIndex(args.rag_index, args.reranker_model).search(" ".join(words), args.rag_top_k, args.retrieval)
    if not hits:
        print("No passage matches the question.")
    for n, hit in enumerate(hits, start=1):
        print(f"[{n}] {hit.location} (score {hit.score:.3f})\n    {hit.text}")


def ask(argv: list[str]) -> None:
    model_args, adapter_args, gen_args, args, words = parse_args(GROUPS["ask"], argv, positional="question")
    check_generation_args(gen_args)
    question = " ".join(words)
    hits = RagIndex(args.rag_index, args.reranker_model).search(question, args.rag_top_k, args.retrieval)
    chat = load_chat_model(model_args, adapter_args)
    prompt = chat.encode(grounded_messages([{"role": "user", "content": question}], hits))
    answer = generate(chat.model, chat.tokenizer, [prompt], **asdict(gen_args))[0]
    print(answer)
    print(f"\nSources:\n{format_sources(hits, answer)}" if hits else "\n(No passage matched the question: no sources.)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):  # every command's flags
        print(__doc__)
        for command, groups in GROUPS.items():
            parser = HfArgumentParser(groups, prog=f"python rag.py {command}", conflict_handler="resolve")
            print(parser.format_help())
        raise SystemExit(0)
    commands = {"index": index, "query": query, "ask": ask}
    if not argv or argv[0] not in commands:
        given = argv[0] if argv else ""
        hint = difflib.get_close_matches(given, commands, n=1)
        raise UsageError(f"expected a command, one of {', '.join(commands)}"
                         + (f"; got {given!r}" if given else "") + (f" (did you mean {hint[0]}?)" if hint else "")
                         + "; `python rag.py COMMAND --help` lists its flags")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    run_cli(main)
