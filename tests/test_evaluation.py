"""The accuracy harness's pieces: bootstrap intervals, task construction and scoring, and the
attention-mass diagnostic against a brute-force computation on a tiny random model."""

import re

import numpy as np
import pytest
from conftest import small_config, tiny_gemma3

from mlx_dhsa.evaluation.mass import capture, layer_mass, plan_layer
from mlx_dhsa.evaluation.stats import bootstrap, paired_difference
from mlx_dhsa.evaluation.tasks import TASKS, build_samples, score, split_tokens
from mlx_dhsa.patching import dhsa_layers
from mlx_dhsa.selection import indices_to_mask


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    assert bootstrap([0.5] * 7) == bootstrap([0.5] * 7)  # seeded
    flat = bootstrap([0.5] * 7)
    assert flat.lo == flat.mean == flat.hi == 0.5 and flat.n == 7
    small = bootstrap([1, 0] * 10)
    big = bootstrap([1, 0] * 200)
    assert small.lo < 0.5 < small.hi and big.hi - big.lo < (small.hi - small.lo) / 2
    # A binomial mean with n=400: the interval is about +-1.96 * sqrt(.25 / 400) = +-0.049.
    assert abs((big.hi - big.lo) / 2 - 0.049) < 0.008
    d = paired_difference([1, 1, 1, 0], [0, 1, 1, 0])
    assert d.mean == 0.25 and d.n == 4
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap([])
    with pytest.raises(ValueError, match="differ in count"):
        paired_difference([1], [1, 2])


class WordTokenizer:
    """One token per word or punctuation mark (with its leading space): enough for tasks."""

    bos_token_id = 0

    def __init__(self):
        self.vocab, self.words = {}, ["<bos>"]

    def encode(self, text, add_special_tokens=True):
        ids = []
        for w in re.findall(r"\s*[A-Za-z0-9']+|\s*[^A-Za-z0-9'\s]|\s+", text):
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ([0] if add_special_tokens else []) + ids

    def decode(self, ids):
        return "".join(self.words[i] for i in ids if i != 0)


ESSAY = " ".join(
    f"Sentence number {i} talks about startups and founders and the way they work together. "
    for i in range(400)
)


def test_samples_are_seeded_sized_and_answerable():
    tok = WordTokenizer()
    ids, held = split_tokens(tok.encode(ESSAY, add_special_tokens=False))
    assert len(ids) + len(held) == len(tok.encode(ESSAY, add_special_tokens=False))
    a = build_samples(tok, ids, tasks=TASKS, contexts=[600], n=5, seed=3)
    b = build_samples(tok, ids, tasks=TASKS, contexts=[600], n=5, seed=3)
    c = build_samples(tok, ids, tasks=TASKS, contexts=[600], n=5, seed=4)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert len(a) == 5 * len(TASKS)
    for s in a:
        assert 540 <= len(s.prompt) <= 600, (s.task, len(s.prompt))
        text = tok.decode(s.prompt)
        assert text.rstrip().endswith("Answer:")
        if s.task == "docqa":
            assert all(w in text for w in s.answers[0].split())
        else:
            assert all(f" is {v}." in text for v in s.answers)  # every needle kept
        if s.task == "multikey":
            assert len(re.findall(r"special magic number for \w+ is", text)) == 4
        if s.task == "multivalue":
            assert len(s.answers) == 3
    with pytest.raises(ValueError, match="unknown task"):
        build_samples(tok, ids, tasks=["bogus"], contexts=[600], n=1)
    with pytest.raises(ValueError, match="--contexts"):
        build_samples(tok, ids, tasks=["niah"], contexts=[10**6], n=1)


def test_score_is_whole_answers():
    assert score("The number is 1234567.", ["1234567"]) == 1.0
    assert score("12345678", ["1234567"]) == 0.0  # a longer number is wrong
    assert score("1234567 and 7654321", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert score("It ends: the Way They\nwork.", ["the way they work"]) == 1.0
    assert score("", ["x"]) == 0.0


def _brute_share(q, k, plan, scale, budget=None):
    """Mean over queries of sum_h sum_{kept k} softmax: from the L x S mask directly."""
    H, L = q.shape[1], q.shape[2]
    S = k.shape[2]
    rep = H // k.shape[1]
    qn, kn = np.array(q, dtype=np.float64)[0], np.array(k, dtype=np.float64)[0]
    logits = np.einsum("hld,hsd->hls", qn * scale, np.repeat(kn, rep, axis=0))
    offset = S - L
    causal = np.arange(S)[None] <= offset + np.arange(L)[:, None]
    logits = np.where(causal, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    per_q = p.sum(0)  # (L, S)
    if plan is None:  # key oracle: top budget keys of each block's summed mass
        return per_q
    mask = np.array(indices_to_mask(plan, L, S))[0]
    return (per_q * mask).sum(-1) / H


def test_mass_diagnostic_matches_brute_force_on_a_tiny_model():
    model = tiny_gemma3(n_layers=4)
    tokens = list(np.random.default_rng(0).integers(1, 1000, size=100))
    layers = capture(model, tokens)
    assert [x.layer for x in layers] == list(range(len(dhsa_layers_of(model))))
    assert not dhsa_layers(model)  # capture leaves the model unpatched
    config = small_config(budget=40)
    configs = {"dhsa@40": config, "block_sparse@40": config.replace(method="block_sparse"),
               "key_oracle@40": None}  # fmt: skip
    positions = [99, 70]
    for layer in layers:
        rows = {
            (r.method, r.phase): r.shares
            for r in layer_mass(layer, configs, decode_positions=positions)
        }
        q, k = layer.queries, layer.keys
        L, bs = q.shape[2], config.block_size
        blocks = [b for b in range(-(-L // bs)) if min((b + 1) * bs, L) > 40]
        for label in ("dhsa@40", "block_sparse@40"):
            plan = plan_layer(configs[label], layer, q, k, 0)
            per_q = _brute_share(q, k, plan, layer.scale)
            want = [per_q[b * bs : (b + 1) * bs].mean() for b in blocks]
            np.testing.assert_allclose(rows[label, "prefill"], want, rtol=1e-4)
            dec = []
            for p in positions:
                qp, kp = q[:, :, p : p + 1], k[:, :, : p + 1]
                dec.append(_brute_share(qp, kp, plan_layer(configs[label], layer, qp, kp, p),
                                        layer.scale)[0])  # fmt: skip
            np.testing.assert_allclose(rows[label, "decode"], dec, rtol=1e-4)
        per_q = _brute_share(q, k, None, layer.scale)  # (L, S) summed over heads
        H = q.shape[1]
        want = []
        for b in blocks:
            m = per_q[b * bs : (b + 1) * bs].sum(0)
            want.append(np.sort(m)[-40:].sum() / (H * min(bs, L - b * bs)))
        np.testing.assert_allclose(rows["key_oracle@40", "prefill"], want, rtol=1e-4)
        # The ceiling holds: no plan keeps more than the key oracle.
        for label in ("dhsa@40", "block_sparse@40"):
            assert all(a <= b + 1e-6 for a, b in zip(rows[label, "prefill"], want))


def dhsa_layers_of(model):
    from mlx_dhsa.patching import patch, unpatch

    patch(model, small_config())
    layers = dhsa_layers(model)
    unpatch(model)
    return layers


def test_report_renders_tables_and_plot_from_rows(tmp_path):
    from mlx_dhsa.evaluation.report import render

    rows = [dict(kind="meta", environment={"device": "cpu"}),
            dict(kind="model", model="m", dtype="float32")]  # fmt: skip
    for method, base in (("dhsa@512", 0.8), ("key_oracle@512", 0.9)):
        for ctx in (1024, 2048):
            rows.append(dict(kind="mass", model="m", method=method, budget=512, layer=0,
                             phase="prefill", context=ctx, prompt=0, setting="sparse",
                             shares=[base, base + 0.02]))  # fmt: skip
    for method, setting, scores in (
        ("dense", "-", [1, 1, 0, 1]),
        ("dhsa@512", "sparse", [1, 0, 0, 1]),
    ):
        for i, s in enumerate(scores):
            rows.append(dict(kind="task", model="m", method=method, setting=setting, task="niah",
                             context=1024, index=i, score=s))  # fmt: skip
    seg = [[2.0, 2.1, 2.2, 2.3]]
    rows.append(dict(kind="ppl", model="m", method="dense", context=512, segment_nll=seg, ppl=8.0))
    rows.append(dict(kind="ppl", model="m", method="dhsa@512", context=512,
                     segment_nll=[[x + 0.01 for x in seg[0]]], ppl=8.1))  # fmt: skip
    text = render(tmp_path, rows)
    assert "| m | sparse | prefill | dhsa@512 | 0.810" in text
    assert "-0.250" in text  # paired difference to dense on the same samples
    assert "+1.0%" in text  # exp(0.01) - 1
    assert (tmp_path / "mass.png").stat().st_size > 1000
    assert (tmp_path / "tasks.png").stat().st_size > 1000
    assert (tmp_path / "results.md").read_text() == text


def test_driver_rejects_bad_flags():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "eval_accuracy.py"
    spec = importlib.util.spec_from_file_location("eval_accuracy", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for argv, words in ((["--contexts", "2k"], "--contexts takes"),
                        (["--methods", "bogus"], "--methods: unknown"),
                        (["--settings", "fast"], "--settings: unknown")):  # fmt: skip
        with pytest.raises(SystemExit, match=words):
            script.parse_args([*argv, "--out", "x"])
    args = script.parse_args(["--quick", "--out", "x"])
    assert args.contexts == [2048] and args.budgets == [512] and args.settings == ["sparse"]
