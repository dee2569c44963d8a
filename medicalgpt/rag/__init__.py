"""Retrieval-augmented answers over a user's documents, with citations (rag.py, the API's --rag_index, the chat
demo's uploads, evaluate_model.py --rag_index): loaders -> sentence-aware chunks -> an on-disk BM25 (+ embedding)
index -> retrieval -> a grounded prompt whose numbered sources the answer cites."""
