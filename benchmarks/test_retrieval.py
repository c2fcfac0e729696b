"""The retrieval benchmark's scores: graded and 0/1 relevance, queries with nothing relevant."""

import numpy as np

from retrieval import jaccard, ranking_scores

# rows: queries; columns: candidates 0..11
GAINS = np.zeros((3, 12))
GAINS[0, [2, 7]] = 1  # two relevant candidates (0/1 relevance, fewer than 10)
GAINS[2, :] = np.linspace(1, 0.1, 12)  # graded: the ideal top 10 is candidates 0..9


def test_recall_counts_only_relevant_candidates_and_skips_queries_with_none():
    found = np.tile(np.arange(10), (3, 1))
    found[0] = [7, 0, 1, 3, 4, 5, 6, 8, 9, 10]  # one of its two relevant candidates
    found[2] = [11, 10, 2, 3, 4, 5, 6, 7, 8, 9]  # 8 of the ideal 10
    scores = ranking_scores(found, GAINS)
    assert scores["queries"] == 2  # query 1 has no relevant candidate
    assert np.isclose(scores["recall@10"], (0.5 + 0.8) / 2)
    assert 0 < scores["ndcg@10"] < 1


def test_ndcg_is_one_for_the_ideal_order():
    found = np.stack([np.r_[2, 7, 0, 1, 3, 4, 5, 6, 8, 9], np.arange(10), np.arange(10)])
    assert np.isclose(ranking_scores(found, GAINS)["ndcg@10"], 1.0)


def test_jaccard_of_sets():
    a = np.array([[1, 1, 0], [0, 0, 1]])
    assert np.allclose(jaccard(a, a), [[1, 0], [0, 1]])
    assert np.isclose(jaccard(a[:1], np.array([[1, 0, 0]]))[0, 0], 0.5)
