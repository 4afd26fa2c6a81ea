"""The held-out evaluation: its texts (kept apart from the corpus, sources recorded), the
KL it reports (checked against a full-vocabulary KL computed here), and the manifest's
record of it."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from gemma_export.contract import CORPUS, HELDOUT_DIR, HELDOUT_DOMAINS, heldout_text
from gemma_export.exporter.verify import WindowReference, heldout_metrics, window_kl
from gemma_export.exporter.precision import THRESHOLDS
from gemma_export.contract import Precision


def test_heldout_texts_are_recorded_and_apart_from_the_corpus():
    sources = (HELDOUT_DIR / "SOURCES.md").read_text(encoding="utf-8")
    corpus = CORPUS.read_text(encoding="utf-8")
    assert {p.stem for p in HELDOUT_DIR.glob("*.txt")} == set(HELDOUT_DOMAINS)
    for d in HELDOUT_DOMAINS:
        raw = (HELDOUT_DIR / f"{d}.txt").read_bytes()
        # the checksum SOURCES.md records for the file is the file's
        row = next(line for line in sources.splitlines() if line.startswith(f"| {d}.txt "))
        assert hashlib.sha256(raw).hexdigest() in row, d
        assert b"\r" not in raw and b"\t" not in raw and raw.endswith(b"\n")
        # no line of 40+ characters shared with the corpus the recipes are checked on
        for line in heldout_text(d).splitlines():
            if len(line) >= 40:
                assert line not in corpus, (d, line)


def _full_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p = p_logits.astype(np.float64) - np.log(np.exp(p_logits.astype(np.float64)).sum(-1, keepdims=True))
    q = q_logits.astype(np.float64) - np.log(np.exp(q_logits.astype(np.float64)).sum(-1, keepdims=True))
    return (np.exp(p) * (p - q)).sum(-1)


def test_window_kl_equals_full_kl_when_it_keeps_every_token_and_bounds_it_below_otherwise():
    rng = np.random.default_rng(0)
    t, v = 9, 300
    ref = (rng.standard_normal((t, v)) * 3).astype(np.float32)
    got = (ref + rng.standard_normal((t, v)) * 0.5).astype(np.float32)
    ids = rng.integers(0, v, t).tolist()
    full = _full_kl(ref[:-1], got[:-1])
    nll, top1, kl = window_kl(WindowReference.of(ref, ids, keep=v), got, ids)
    np.testing.assert_allclose(kl, full, rtol=1e-4, atol=1e-6)  # log-probs kept in fp32
    np.testing.assert_array_equal(top1, got[:-1].argmax(-1))
    q = got[:-1].astype(np.float64)
    lse = np.log(np.exp(q).sum(-1))
    np.testing.assert_allclose(nll, lse - q[np.arange(t - 1), ids[1:]], rtol=1e-5)
    _, _, part = window_kl(WindowReference.of(ref, ids, keep=20), got, ids)
    assert np.all(part <= full + 1e-9) and np.all(part > 0)
    _, _, same = window_kl(WindowReference.of(ref, ids, keep=20), ref, ids)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_heldout_rows_are_judged_by_the_parity_table():
    th = THRESHOLDS[Precision.INT8]
    rows = heldout_metrics({"korean": {"tokens": 10, "top1": 0.94, "perplexity_increase": 0.01, "mean_kl": 0.01}}, th)
    by = {re.sub(r" \(.*\)", "", m.name): m for m in rows}
    assert not by["held-out korean top-1 agreement"].passed  # 94% < 95%
    assert by["held-out korean perplexity increase"].passed
    assert by["held-out korean mean KL from fp32"].op == "info"


@pytest.mark.parametrize("name", ["tiny-gemma3"])
def test_verify_reports_every_domain_and_the_manifest_records_it(tiny_artifacts, name):
    import json

    out, res = tiny_artifacts[name]
    assert set(res["parity"]["heldout"]) == set(HELDOUT_DOMAINS)
    for d, r in res["parity"]["heldout"].items():
        assert r["tokens"] > 100 and 0.0 <= r["top1"] <= 1.0 and r["mean_kl"] >= 0.0, (d, r)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["heldout"] == res["parity"]["heldout"]
