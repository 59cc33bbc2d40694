"""Near and exact dedup through the real pipeline against exact all-pairs Jaccard, the LSH
curve and datasketch's MinHashLSH (its default permutation scheme, 25 bands x 10 rows)."""

import json
import math
import random
from itertools import combinations

import numpy as np
import pytest

from starcoder.curation.config import load_curate_config
from starcoder.curation.dedup import candidate_probability, code_tokens, read_keys, read_pairs
from starcoder.curation.pipeline import curate

BANDS, ROWS = 25, 10
WORDS = [f"w{i}" for i in range(5000)]


def shingles(text):
    t = code_tokens(text)
    return {" ".join(t[i:i + 5]) for i in range(len(t) - 4)}


def mutate(tokens, k, rng):
    out = list(tokens)
    for i in rng.sample(range(len(out)), k):
        out[i] = rng.choice(WORDS)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Base documents with variants at many edit rates; clusters of 4 copies in the 0.7-0.8 band;
    exact copies with ranked metadata."""
    rng = random.Random(0)
    tmp = tmp_path_factory.mktemp("dedup")
    docs = []
    for b in range(460):
        base = [rng.choice(WORDS) for _ in range(150)]
        docs.append({"id": f"b{b}", "content": " ".join(base)})
        if b < 400:  # a pair at a random edit rate
            docs.append({"id": f"v{b}", "content": " ".join(mutate(base, rng.randint(1, 9), rng))})
        else:  # a cluster: 3 more copies, each ~3 edits from the base
            for c in range(3):
                docs.append({"id": f"c{b}_{c}", "content": " ".join(mutate(base, 3, rng))})
    exact = [{"id": f"x{i}_{stars}", "content": "exact copy " + " ".join(WORDS[i * 20:i * 20 + 30]),
              "max_stars_count": stars, "max_stars_repo_licenses": lic}
             for i in range(10) for stars, lic in ((5, ["MIT"]), (50, ["GPL-3.0"]), (1, ["Apache-2.0"]))]
    docs += exact
    rng.shuffle(docs)
    (tmp / "in").mkdir()
    with open(tmp / "in" / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    cfg = load_curate_config({"filters": {"enabled": False}, "pii": {"enabled": False},
                              "decontamination": {"enabled": False},
                              "run": {"tasks": 2, "workers": 1}})
    report = curate([str(tmp / "in")], str(tmp / "out"), cfg)
    work = tmp / "out.work"
    keys = read_keys(work / "keys")
    found = {frozenset((keys[a][0], keys[b][0])) for a, b in read_pairs(work / "buckets")}
    import pyarrow.parquet as pq
    kept = {r["id"] for p in sorted((tmp / "out" / "data").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()}
    return docs, found, kept, report


def all_pairs(docs):
    sets = {d["id"]: shingles(d["content"]) for d in docs}
    out = {}
    for a, b in combinations(sets, 2):
        inter = len(sets[a] & sets[b])
        if inter:
            out[frozenset((a, b))] = inter / len(sets[a] | sets[b])
    return sets, out


def datasketch_pairs(sets):
    from datasketch import MinHash, MinHashLSH
    lsh = MinHashLSH(num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    sketches = {}
    for key, s in sets.items():
        m = MinHash(num_perm=BANDS * ROWS, seed=1)
        m.update_batch([g.encode() for g in s])
        sketches[key] = m
        lsh.insert(key, m)
    return {frozenset((k, o)) for k, m in sketches.items() for o in lsh.query(m) if o != k}


def test_near_dedup_pair_recall_follows_the_lsh_curve(corpus):
    docs, found, _, _ = corpus
    sets, truth = all_pairs([d for d in docs if not d["id"].startswith("x")])
    oracle = datasketch_pairs(sets)
    # Independent trials only: one base-variant pair per base (cluster pairs are correlated).
    truth = {p: j for p, j in truth.items() if {x[0] for x in p} == {"b", "v"}
             and len({x[1:] for x in p}) == 1}
    assert candidate_probability(0.7, BANDS, ROWS) == pytest.approx(0.51, abs=0.01)
    assert candidate_probability(0.8, BANDS, ROWS) == pytest.approx(0.94, abs=0.01)
    checked = 0
    for lo in np.arange(0.5, 1.0, 0.05):
        pairs = [p for p, j in truth.items() if lo <= j < lo + 0.05]
        if len(pairs) < 10:
            continue
        j = np.mean([truth[p] for p in pairs])
        expected = candidate_probability(j, BANDS, ROWS)
        n = len(pairs)
        sigma = math.sqrt((expected * (1 - expected) + 1 / n) / n)  # floored where p ~ 0 or 1
        ours = np.mean([p in found for p in pairs])
        theirs = np.mean([p in oracle for p in pairs])
        assert abs(ours - expected) <= 3 * sigma, (lo, n, ours, expected)
        # datatrove with code shingles vs datasketch: two proportions, equal within 3 sigma.
        assert abs(ours - theirs) <= 3 * math.sqrt(2) * sigma, (lo, ours, theirs)
        if lo >= 0.85:
            assert ours >= 0.95, (lo, ours)
        checked += 1
    assert checked >= 4


def test_clusters_reduce_to_one_document_and_removed_count_is_ideal(corpus):
    docs, _, kept, report = corpus
    clusters = {}
    for d in docs:
        if d["id"].startswith("c") or (d["id"].startswith("b") and int(d["id"][1:]) >= 400):
            clusters.setdefault(d["id"].split("_")[0].lstrip("bc"), []).append(d)
    assert len(clusters) == 60
    reduced = sum(sum(d["id"] in kept for d in members) == 1 for members in clusters.values())
    assert reduced / len(clusters) >= 0.85
    # Ideal: one survivor per connected component of pairs at J >= 0.7.
    sets, truth = all_pairs([d for d in docs if not d["id"].startswith("x")])
    parent = {k: k for k in sets}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for p, j in truth.items():
        if j >= 0.7:
            a, b = sorted(p)
            parent[find(a)] = find(b)
    ideal = len(sets) - len({find(k) for k in sets})
    removed = report["stages"]["near_dedup"]["reasons"].get("duplicate", 0)
    assert abs(removed - ideal) <= 0.05 * ideal, (removed, ideal)


def test_exact_dedup_keeps_one_copy_by_rank(corpus):
    _, _, kept, report = corpus
    # Permissive beats more stars: x*_5 (MIT, 5 stars) beats GPL with 50; Apache with 1 star loses.
    exact_kept = sorted(k for k in kept if k.startswith("x"))
    assert exact_kept == sorted(f"x{i}_5" for i in range(10))
    assert report["stages"]["exact_dedup"]["reasons"]["duplicate"] == 20


def test_signatures_equal_datatroves_own_computation():
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.hashing import create_hash_func

    from starcoder.curation.config import NearDedupConfig
    from starcoder.curation.dedup import CodeMinhashSignature, minhash_config, _CodeTokenizer
    ours = CodeMinhashSignature("/tmp/unused", NearDedupConfig())
    theirs = MinhashDedupSignature("/tmp/unused", config=minhash_config(NearDedupConfig()),
                                   language=_CodeTokenizer())
    text = " ".join(random.Random(2).choices(WORDS, k=3000))
    hashed = ours.get_shingles(text)
    hash32 = create_hash_func(minhash_config(NearDedupConfig()).hash_config)
    assert sorted(hashed[:, 0].tolist()) == sorted(hash32(g) for g in shingles(text))
    assert len(hashed) > 1000  # several blocks of 256
    assert ours.get_signature(hashed) == theirs.get_signature(hashed)


