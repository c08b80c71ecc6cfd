"""merge_select: which pieces a merge appends (buildable, capped, stable), on toy vocabularies."""

from __future__ import annotations

import pytest

from megatron_ct.expansion.vocab.select import (
    MergeResult,
    choose_new_pieces,
    frequent_strings,
    select_buildable,
)

BASE = {"a", "b", "c", "▁", "▁a", "ab"}


def test_keeps_candidate_order_and_skips_known_and_unbuildable_pieces():
    # "xyz": no split of it is buildable ("xy"/"yz" are not candidates, "x"/"z" are absent).
    candidates = ["abc", "ab", "bc", "xyz", "y", "abc", "▁ab"]
    assert select_buildable(candidates, BASE) == ["abc", "bc", "y", "▁ab"]


def test_cap_pulls_in_the_pieces_a_piece_needs_and_counts_them():
    # "的人" needs both characters, which the base lacks; they come with it under the cap.
    candidates = ["的人", "我们", "的", "人", "我", "们"]
    assert select_buildable(candidates, BASE, max_new=3) == ["的人", "的", "人"]
    # A piece whose needs do not fit is skipped, smaller later ones still fit.
    assert select_buildable(candidates, BASE, max_new=2) == ["的", "人"]
    assert select_buildable(candidates, BASE, max_new=0) == []


def test_every_selected_piece_splits_into_two_vocabulary_pieces():
    candidates = ["abcab", "cab", "ca", "zz", "z", "▁abc"]
    chosen = select_buildable(candidates, BASE)
    vocab = BASE | set(chosen)
    for piece in chosen:
        assert len(piece) == 1 or any(piece[:k] in vocab and piece[k:] in vocab for k in range(1, len(piece)))
    # "▁abc" is dropped: "abc", "bc" and "▁ab" are in neither the base nor the candidates.
    assert chosen == ["abcab", "cab", "ca", "zz", "z"]


def test_stability_filter_drops_pieces_that_change_protected_strings():
    # Toy segmenter: greedy longest match over the vocabulary, ids = positions in a list.
    base_list = sorted(BASE)

    def segmenter_for(extra):
        vocab = base_list + list(extra)

        def segment(strings):
            out = []
            for s in strings:
                ids, i = [], 0
                while i < len(s):
                    j = max(k for k in range(i + 1, len(s) + 1) if s[i:k] in vocab or k == i + 1)
                    ids.append(vocab.index(s[i:j]) if s[i:j] in vocab else -1)
                    i = j
                out.append(ids)
            return out

        return segment

    chosen = choose_new_pieces(
        ["bc", "ca", "c▁"],
        BASE,
        protect=["▁abc", "cab"],
        segment_base=segmenter_for([]),
        segmenter_for=segmenter_for,
    )
    # "bc" changes "▁abc" ("▁a|b|c" -> "▁a|bc"), "ca" changes "cab"; "c▁" occurs in neither.
    assert chosen == ["c▁"]


def test_protect_without_segmenters_is_an_error():
    with pytest.raises(ValueError, match="segment_base and segmenter_for"):
        choose_new_pieces(["bc"], BASE, protect=["abc"])


def test_frequent_strings_counts_words_and_ngrams_of_long_words():
    lines = ["the cat the dog", "我们喜欢这本书 the"]
    top = frequent_strings(lines, top_k=3)
    assert top[0] == "▁the"
    assert set(frequent_strings(lines, top_k=100)) >= {"▁cat", "▁我们喜欢这本书", "我们", "这本书", "喜欢这本"}
    assert "喜欢这本书" not in frequent_strings(lines, top_k=100)  # longer than max_ngram


def test_merge_result_ids():
    result = MergeResult(new_pieces=["我们", "的人"], first_new_id=100)
    assert result.vocab_size == 102
    assert result.new_ids() == {"我们": 100, "的人": 101}
