"""Feature splitting: constructed dictionaries with a planted split are recovered."""

import numpy as np
import pytest

from saejax.analysis.splitting import decoder_cosine, match_features, splitting_table


def _dictionaries(seed=0, d=64, f_small=12):
    """Small feature j splits into j % 4 children (0 = vanished, 1 = carried, 2-3 = split)
    that are the parent plus a small orthogonal perturbation; plus unrelated noise features."""
    rng = np.random.default_rng(seed)
    small = np.linalg.qr(rng.normal(size=(d, d)))[0][:f_small]  # orthonormal rows
    large, parent = [], []
    for j in range(f_small):
        for _ in range(j % 4):
            v = small[j] + 0.3 * rng.normal(size=d) / np.sqrt(d)
            large.append(v / np.linalg.norm(v))
            parent.append(j)
    # Noise features: orthogonal to every small feature (beyond its span).
    noise = np.linalg.qr(np.concatenate([small, rng.normal(size=(d - f_small, d))]).T)[0].T
    for v in noise[f_small:f_small + 5]:
        large.append(v)
        parent.append(-1)
    perm = rng.permutation(len(large))
    return small, np.asarray(large)[perm], np.asarray(parent)[perm]


@pytest.mark.parametrize("chunk", [7, 8192])  # chunked merge == one block
def test_planted_split_is_recovered(chunk):
    small, large, want_parent = _dictionaries()
    m = match_features(small * 3.0, large, min_cosine=0.5, chunk=chunk)  # scale-invariant
    assert m["parent"] == want_parent.tolist()
    for j in range(12):
        kids = sorted(c for c, _ in m["children"][j])
        assert kids == sorted(np.flatnonzero(want_parent == j).tolist())
        if m["children"][j]:
            cos = [c for _, c in m["children"][j]]
            assert cos == sorted(cos, reverse=True) and min(cos) > 0.9
            assert m["nearest"][j][0][0] == m["children"][j][0][0]
    assert m["summary"] == {"split": 6, "carried": 3, "unmatched": 3, "orphans": 5}


def test_tables_and_cosine():
    small, large, _ = _dictionaries()
    m = match_features(small, large)
    md = splitting_table(m, small_name="A/0", large_name="A/1", max_children=2)
    lines = md.strip().splitlines()
    assert lines[0] == "| A/0 feature | children | A/1 features (cosine) |"
    assert lines[2].split("|")[2].strip() == "3"  # the biggest split first
    html_table = splitting_table(m, fmt="html", labels={"small": {3: "<b>x</b>"}})
    assert "&lt;b&gt;x&lt;/b&gt;" in html_table and "<b>x" not in html_table
    cos = np.asarray(decoder_cosine(small, large))
    assert cos.shape == (12, len(large)) and np.all(np.abs(cos) <= 1 + 1e-5)
    with pytest.raises(ValueError, match="different widths"):
        match_features(small, large[:, :10])
