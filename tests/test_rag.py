"""Retrieval-augmented answers: chunking, indexing (changed files only, bad files skipped), retrieval, citations, the
CLI, the API's sources, the demo's uploads and the evaluation's numbers."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

import evaluate_model
import gradio_demo
import openai_api
import rag
from medicalgpt.args import ModelArguments
from medicalgpt.errors import UsageError
from medicalgpt.rag.chunking import chunk_passages, count_tokens, split_sentences
from medicalgpt.rag.grounding import cited, format_sources, grounded_messages, sources
from medicalgpt.rag.index import RagArguments, RagIndex, build_index
from medicalgpt.rag.loaders import Passage
from medicalgpt.rag.retrieval import reciprocal_rank_fusion
from medicalgpt.serving import ServeArguments, load_chat_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "rag"
PICKED = ["hypertension.md", "type_2_diabetes.txt", "asthma.md", "gout.txt", "migraine.md", "depression.txt"]


def write_pdf(path: Path, pages: list[str], password: str | None = None) -> Path:
    """A PDF with one line of Helvetica text per page (pypdf writes no text itself: the content stream by hand)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject(
        "/Subtype"): NameObject("/Type1"), NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for text in pages:
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        content = DecodedStreamObject()
        content.set_data(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode())
        page[NameObject("/Contents")] = writer._add_object(content)
    if password:
        writer.encrypt(password)
    writer.write(path)
    return path


@pytest.fixture
def docs(tmp_path) -> Path:
    """Six sample protocols, a PDF whose second page holds a fact, and a .docx."""
    import docx

    folder = tmp_path / "docs"
    (folder / "labels").mkdir(parents=True)
    for name in PICKED:
        shutil.copy(SAMPLE / "docs" / name, folder / name)
    write_pdf(folder / "labels" / "warfarin.pdf", ["Warfarin label, revision 2026.",
                                                   "Warfarin dosing: check the INR every 4 weeks once stable."])
    document = docx.Document()
    document.add_paragraph("Ward handbook.")
    document.add_paragraph("Heparin infusions are checked with an aPTT every 6 hours.")
    document.save(folder / "handbook.docx")
    return folder


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return load_chat_model(ModelArguments(model_name_or_path=tiny_model_dir), ServeArguments())


def files_of(hits) -> list[str]:
    return [hit.file for hit in hits]


def test_chunks_follow_sentences_in_chinese_and_english_within_the_token_budget():
    text = ("高血压的典型症状包括头痛、头晕和心悸。确诊需要进行动态血压监测。一线用药为氨氯地平。"
            "Adults take 2.5 mg once daily. Review after 8 weeks! Is it safe? Yes.")
    assert split_sentences(text) == ["高血压的典型症状包括头痛、头晕和心悸。", "确诊需要进行动态血压监测。",
                                     "一线用药为氨氯地平。", "Adults take 2.5 mg once daily.", "Review after 8 weeks!",
                                     "Is it safe?", "Yes."]
    passages = [Passage(text, line=3), Passage("第二行的一句话。", line=4)]
    # 24 tokens at most, each chunk opening with up to 10 tokens of whole sentences from the one before.
    assert [(c.text, c.line) for c in chunk_passages(passages, size=24, overlap=10)] == [
        ("高血压的典型症状包括头痛、头晕和心悸。", 3),  # 19 tokens: the next sentence (13) would overflow
        ("确诊需要进行动态血压监测。一线用药为氨氯地平。", 3),
        ("一线用药为氨氯地平。Adults take 2.5 mg once daily. Review after 8 weeks!", 3),
        ("Review after 8 weeks! Is it safe? Yes.\n第二行的一句话。", 3)]  # a new line: a new passage
    assert [c.line for c in chunk_passages([Passage("一句。", line=1), Passage("另一句话。", line=2)], 5, 0)] == [1, 2]
    long = chunk_passages([Passage("词" * 50 + "。")], size=20, overlap=5)  # one sentence over the size is cut
    assert [count_tokens(c.text) for c in long] == [20, 20, 11]


def test_index_finds_the_right_document_with_its_page_or_line(docs, tmp_path):
    summary = build_index([str(docs)], str(tmp_path / "index"))
    assert summary["files"] == 8 and summary["skipped"] == []
    index = RagIndex(str(tmp_path / "index"))
    questions = [json.loads(line) for line in (SAMPLE / "questions.jsonl").read_text().splitlines()]
    for question in (q for q in questions if q["source"] in PICKED):
        hits = index.search(question["question"], k=1)
        assert files_of(hits) == [question["source"]], question["question"]
        assert question["answer"].split()[0].removesuffix("周") in hits[0].text
    pdf = index.search("How often is the INR checked for warfarin?", k=1)[0]
    assert (pdf.file, pdf.page, pdf.line) == ("labels/warfarin.pdf", 2, None) and "every 4 weeks" in pdf.text
    word = index.search("heparin aPTT", k=1)[0]  # a chunk is located where it starts: the first paragraph
    assert (word.file, word.line) == ("handbook.docx", 1) and "aPTT every 6 hours" in word.text
    assert index.search("zzzz qqqq", k=3) == []  # no term in common: nothing, rather than noise


def test_reindex_reads_only_changed_files_and_a_stale_index_is_refused(docs, tmp_path, monkeypatch):
    from medicalgpt.rag import index as rag_index

    index_dir = str(tmp_path / "index")
    build_index([str(docs)], index_dir)
    changed = docs / "asthma.md"
    changed.write_text(changed.read_text().replace("after 12 weeks", "after 3 weeks"))
    with pytest.raises(UsageError, match=r"stale: 1 document\(s\) changed .*asthma\.md.*python rag\.py index"):
        RagIndex(index_dir)
    segmented = []  # jieba, the slow part, sees only the changed file's text
    monkeypatch.setattr(rag_index, "words", lambda text, words=rag_index.words: segmented.append(text) or words(text))
    summary = build_index([str(docs)], index_dir)
    assert (summary["updated"], summary["reused"], summary["removed"]) == (1, 7, 0)
    assert len(segmented) == 1 and "after 3 weeks" in segmented[0]
    assert "after 3 weeks" in RagIndex(index_dir).search("asthma review weeks", k=1)[0].text
    (docs / "gout.txt").unlink()
    (docs / "new.md").write_text("Colchicine is stored in cabinet 7.\n")
    with pytest.raises(UsageError, match="2 document"):  # a removed file and a new one
        RagIndex(index_dir)
    summary = build_index([str(docs)], index_dir)
    assert (summary["updated"], summary["reused"], summary["removed"]) == (1, 7, 1)
    assert files_of(RagIndex(index_dir).search("colchicine cabinet", k=1)) == ["new.md"]
    with pytest.raises(UsageError, match=r"no index in .*nowhere: build it with `python rag.py index DOCS"):
        RagIndex(str(tmp_path / "nowhere"))


def test_bad_files_are_warned_in_one_line_each_and_the_rest_is_indexed(docs, tmp_path, capsys):
    bad = {
        "locked.pdf": lambda p: write_pdf(p, ["secret"], password="pw"),
        "broken.pdf": lambda p: p.write_bytes(b"%PDF-1.7\nthis is not a pdf"),
        "empty.md": lambda p: p.write_text(""),
        "binary.txt": lambda p: p.write_bytes(os.urandom(64) + b"\x00\x01"),
        "huge.txt": lambda p: p.touch() or os.truncate(p, 100 * 2**20),  # 100 MB, sparse: instant
        "broken.docx": lambda p: p.write_bytes(b"PK\x03\x04 not a zip"),
    }
    for name, make in bad.items():
        make(docs / name)
    summary = build_index([str(docs)], str(tmp_path / "index"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == len(bad) and summary["files"] == 8 and len(summary["skipped"]) == len(bad)
    for name, reason in [("locked.pdf", "encrypted PDF"), ("broken.pdf", "unreadable PDF"), ("empty.md", "empty"),
                         ("binary.txt", "binary"), ("huge.txt", "100 MB is over --max_file_mb 50"),
                         ("broken.docx", "unreadable .docx")]:
        assert any(str(docs / name) in w and reason in w and w.endswith("skipped") for w in warnings), name
    # Unchanged skipped files do not make the index stale; it still answers.
    assert files_of(RagIndex(str(tmp_path / "index")).search("hypertension review weeks", k=1)) == ["hypertension.md"]


def test_hybrid_retrieval_fuses_bm25_with_embeddings_and_reembeds_only_changed_files(docs, tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    from medicalgpt.rag import retrieval

    assert reciprocal_rank_fusion([[(1, 9.0), (2, 5.0)], [(2, 0.9), (3, 0.8)]], k=3) == [
        (2, 1 / 62 + 1 / 61), (1, 1 / 61), (3, 1 / 62)]
    encoded = []
    original = retrieval.Embedder.encode
    monkeypatch.setattr(retrieval.Embedder, "encode", lambda self, texts: encoded.append(len(texts)) or
                        original(self, texts))
    index_dir = str(tmp_path / "index")
    build_index([str(docs)], index_dir, embedding_model=tiny_model_dir)
    vectors = np.load(Path(index_dir) / "embeddings.npy")
    first_pass = sum(encoded)
    assert vectors.shape[0] == first_pass >= 8 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    (docs / "asthma.md").write_text("Asthma inhalers are kept in the respiratory clinic.\n")
    encoded.clear()
    build_index([str(docs)], index_dir, embedding_model=tiny_model_dir)
    assert encoded == [1]  # only the changed file's one chunk
    index = RagIndex(index_dir)
    dense = index.search("asthma", k=3, retrieval="dense")
    hybrid = index.search("asthma inhalers respiratory clinic", k=3)  # auto: hybrid, with embeddings
    # BM25's first is first; with fewer chunks than the fusion depth, every chunk has a dense rank to add.
    assert len(dense) == 3 and hybrid[0].file == "asthma.md" and 1 / 61 < hybrid[0].score <= 2 / 61
    build_index([str(docs)], str(tmp_path / "plain"))
    with pytest.raises(UsageError, match="needs an index built with --embedding_model"):
        RagIndex(str(tmp_path / "plain")).search("asthma", retrieval="dense")


def test_a_reranker_reorders_the_candidates(docs, tmp_path):
    build_index([str(docs)], str(tmp_path / "index"))
    index = RagIndex(str(tmp_path / "index"))

    class PrefersMigraine:
        def scores(self, query, texts):
            return [float("migraine" in text) for text in texts]

    assert files_of(index.search("hypertension review weeks", k=1)) == ["hypertension.md"]
    index.reranker = PrefersMigraine()
    assert files_of(index.search("hypertension review weeks", k=1)) == ["migraine.md"]


def test_an_external_retriever_is_fused_with_bm25(docs, tmp_path):
    build_index([str(docs)], str(tmp_path / "index"))
    index = RagIndex(str(tmp_path / "index"))
    gout = next(n for n, chunk in enumerate(index.chunks) if chunk["file"] == "gout.txt")

    class Store:  # a vector store holding the chunks under their line numbers in chunks.jsonl
        def search(self, query, k):
            return [(gout, 0.9)]

    assert "gout.txt" not in files_of(index.search("hypertension review weeks", k=2))
    index.external.append(Store())
    assert files_of(index.search("hypertension review weeks", k=2)) == ["hypertension.md", "gout.txt"]


def test_grounded_prompt_numbers_the_sources_that_citations_point_to(docs, tmp_path):
    build_index([str(docs)], str(tmp_path / "index"))
    hits = RagIndex(str(tmp_path / "index")).search("痛风患者多少周后复诊？", k=2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "痛风患者多少周后复诊？"}]
    grounded = grounded_messages(messages, hits)
    assert grounded[0] == messages[0] and grounded[1]["content"].startswith("参考资料：\n[1] (gout.txt, line 1)")
    assert grounded[1]["content"].endswith("问题：痛风患者多少周后复诊？") and f"[2] ({hits[1].location})" in \
        grounded[1]["content"]
    listed = sources(hits)
    assert [s["id"] for s in listed] == [1, 2] and listed[0]["file"] == "gout.txt"
    assert cited("每6周复诊[1]，见[2]与[1]；[7]不存在。", len(listed)) == [1, 2]
    assert format_sources(hits, "6周[2]").splitlines() == [f"[1] {hits[0].location}", f"[2] {hits[1].location} (cited)"]


def test_cli_indexes_queries_and_answers_with_sources(docs, tmp_path, tiny_model_dir, capsys):
    index_dir = str(tmp_path / "index")
    rag.main(["index", str(docs), "--index_dir", index_dir, "--chunk_size", "120"])
    assert "Indexed 8 documents" in capsys.readouterr().out
    rag.main(["query", "--index_dir", index_dir, "--rag_top_k", "2",
              "Under the Riverside Hospital protocol, after how many weeks are patients with migraine reviewed?"])
    out = capsys.readouterr().out
    assert out.startswith("[1] migraine.md, line 1 (score ") and "[2] " in out and "[3] " not in out
    rag.main(["ask", "--index_dir", index_dir, "--base_model", tiny_model_dir, "--max_new_tokens", "4",
              "--temperature", "0", "How often is the INR checked for warfarin?"])
    assert "\nSources:\n[1] labels/warfarin.pdf, page 2\n[2] " in capsys.readouterr().out
    with pytest.raises(UsageError, match="did you mean query"):
        rag.main(["qeury", "--index_dir", index_dir, "x"])
    with pytest.raises(SystemExit):
        rag.main(["query", "--index_dri", index_dir, "x"])
    assert "--index_dri -> --index_dir?" in capsys.readouterr().err


def test_api_grounds_answers_and_returns_sources_that_standard_clients_accept(docs, tmp_path, chat):
    build_index([str(docs)], str(tmp_path / "index"))
    index = RagIndex(str(tmp_path / "index"))
    app = openai_api.create_app(chat, max_new_tokens=4, search=lambda q: index.search(q, k=2))
    question = [{"role": "user", "content": "After how many weeks are patients with hypertension reviewed?"}]
    with TestClient(app) as http:
        client = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0)
        response = client.chat.completions.create(model="medicalgpt", messages=question, temperature=0)
        assert response.choices[0].message.role == "assistant"  # the official client parses it as usual
        listed = response.model_extra["sources"]
        assert [s["id"] for s in listed] == [1, 2] and listed[0]["file"] == "hypertension.md"
        assert listed[0]["line"] == 1 and "after 8 weeks" in listed[0]["text"]
        prompt = chat.encode(grounded_messages(question, index.search(question[0]["content"], k=2)))
        assert response.usage.prompt_tokens == len(prompt)  # the chunks were in the prompt
        chunks = list(client.chat.completions.create(model="medicalgpt", messages=question, temperature=0,
                                                     stream=True))
        assert chunks[0].model_extra["sources"] == listed and "sources" not in chunks[1].model_extra
    plain = TestClient(openai_api.create_app(chat, max_new_tokens=4)).post(
        "/v1/chat/completions", json={"model": "medicalgpt", "messages": question}).json()
    assert "sources" not in plain


def test_demo_answers_from_uploaded_documents_and_lists_the_sources(docs, chat):
    respond = gradio_demo.responder(chat, gradio_demo.Documents(RagArguments(rag_top_k=2)))
    (docs / "empty.md").write_text("")
    uploads = [str(docs / "gout.txt"), str(docs / "labels" / "warfarin.pdf"), str(docs / "empty.md")]
    reply = list(respond("How often is the INR checked for warfarin?", [], "", 0.0, 1.0, 4, uploads))[-1]
    answer, _, listed = reply.partition(gradio_demo.SOURCES_NOTE)
    assert listed.split("  \n") == ["[1] warfarin.pdf, page 2", "[2] warfarin.pdf, page 1",
                                    "⚠️ empty.md: empty file; skipped"]
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]
    assert gradio_demo.normalise_history(history)[1]["content"] == answer  # the list is not sent back to the model
    no_documents = list(gradio_demo.responder(chat, gradio_demo.Documents(RagArguments()))("hi", [], "", 0, 1, 4))
    assert gradio_demo.SOURCES_NOTE not in no_documents[-1]


def test_evaluation_reports_recall_and_accuracy_with_and_without_retrieval(tmp_path, tiny_model_dir, monkeypatch):
    build_index([str(SAMPLE / "docs")], str(tmp_path / "index"))

    def reads_the_prompt(model, tokenizer, prompts, **kwargs):  # an oracle that answers only from the context
        found = [re.search(r"复诊间隔为(\d+周)|after (\d+ weeks)", tokenizer.decode(p)) for p in prompts]
        return [next(g for g in m.groups() if g) if m else "不知道" for m in found]

    monkeypatch.setattr(evaluate_model, "generate", reads_the_prompt)
    row = evaluate_model.main(["--model_name_or_path", tiny_model_dir, "--rag_index", str(tmp_path / "index"),
                               "--rag_top_k", "1"])
    assert row["metrics"] == {"rag_recall@1": 1.0, "answer_accuracy_no_rag": 0.0, "answer_accuracy_rag": 1.0}
