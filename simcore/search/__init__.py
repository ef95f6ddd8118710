"""Exact cosine top-k search: the streaming kernel's driver, the flat index, and the FAISS wrapper."""
