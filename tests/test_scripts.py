"""The benchmark scripts run end to end on a tiny random model on the CPU: they are what users
run to reproduce the README's tables, so a broken one fails CI. Timings are not checked."""

import importlib
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(name: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setattr(sys, "argv", [name, *argv])
    importlib.import_module(name).main()


def test_bench_decode_runs_dense_dhsa_and_floor(tmp_path, monkeypatch):
    out = tmp_path / "decode.json"
    # budget 384 < 1000 / 2 keys and decode_dense_below 0: the sparse decode path runs.
    _run("bench_decode", ["--model", "tiny", "--lengths", "1000", "--budget", "384",
                          "--decode-dense-below", "0", "--steps", "2", "--warmup", "1",
                          "--trials", "2", "--floor", "--sparse", "--json", str(out)],
         monkeypatch)
    row = json.loads(out.read_text())["rows"][0]
    assert row["path"] == "dhsa(reference)"
    assert row["paths"]["dhsa_sparse"] == "dhsa(reference)"
    assert min(row["dense_tps"], row["dhsa_tps"], row["floor_tps"], row["dhsa_sparse_tps"]) > 0
    assert len(row["runs"]["dhsa_sparse"]["tps"]) == 2 and row["dhsa_sparse_paired"] > 0


def test_bench_prefill_and_plot(tmp_path, monkeypatch):
    prefill = tmp_path / "prefill.json"
    _run("bench_prefill", ["--model", "tiny", "--lengths", "600", "--warmup", "64",
                           "--methods", "dense", "dhsa", "floor", "floor_kv", "--dtype", "float32",
                           "--json", str(prefill)],
         monkeypatch)
    row = json.loads(prefill.read_text())["rows"][0]
    assert row["dhsa"]["peak_gb"] >= row["dhsa"]["base_gb"] > 0
    assert row["dhsa"]["peak_gb_steps"]
    assert row["floor_kv"]["peak_gb"] >= row["floor_kv"]["base_gb"] > 0
    png = tmp_path / "plot.png"
    _run("plot_bench", [str(prefill), "--out", str(png)], monkeypatch)
    assert png.stat().st_size > 0


def test_profile_decode_ablation(tmp_path, monkeypatch):
    out = tmp_path / "ablation.json"
    _run("profile_decode", ["--model", "tiny", "--context", "300", "--steps", "2", "--warmup",
                            "1", "--trials", "1", "--variants", "dense", "dhsa",
                            "dhsa, 128 decode groups", "--json", str(out)], monkeypatch)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "dhsa", "dhsa, 128 decode groups"]


def test_profile_timeline_says_what_it_needs(monkeypatch):
    import mlx.core as mx
    import pytest

    if mx.cuda.is_available():
        pytest.skip("a CUDA machine runs the real trace")
    with pytest.raises(SystemExit, match="CUDA backend"):
        _run("profile_timeline", ["--model", "tiny"], monkeypatch)


def test_profile_decode_latency_says_what_it_needs(monkeypatch):
    import mlx.core as mx
    import pytest

    if mx.cuda.is_available():
        pytest.skip("a CUDA machine runs the real trace")
    with pytest.raises(SystemExit, match="CUDA backend"):
        _run("profile_decode_latency", ["--calls", "2"], monkeypatch)


def test_profile_decode_reuses_each_layers_first_plan(monkeypatch):
    """The "plan reused" variant plans once per layer (told apart by its chunk state)."""
    from types import SimpleNamespace

    from mlx_dhsa import kernels

    monkeypatch.syspath_prepend(str(SCRIPTS))
    profile_decode = importlib.import_module("profile_decode")
    calls = []
    monkeypatch.setattr(kernels, "run_plan",
                        lambda launch, q, t, c, *, state, **kw: calls.append(state) or len(calls))
    run_plan = profile_decode._reused_plans()
    layer_a, layer_b = SimpleNamespace(), SimpleNamespace()  # each layer's kernel state
    plans = [run_plan(None, None, None, None, state=s, q_offset=0)
             for s in (layer_a, layer_b, layer_a, layer_b)]
    assert plans == [1, 2, 1, 2] and calls == [layer_a, layer_b]


def test_bench_decode_attention(tmp_path, monkeypatch):
    out = tmp_path / "decode_attention.json"
    _run("bench_decode_attention", ["--lengths", "300", "--budget", "64", "--calls", "2",
                                    "--trials", "1", "--builds", "2", "--heads", "4",
                                    "--kv-heads", "2", "--head-dim", "64", "--dtype", "float32",
                                    "--json", str(out)], monkeypatch)
    row = json.loads(out.read_text())["rows"][0]
    assert row["keys"] == 300
    for m in ("mlx_lm", "dense", "sparse"):
        assert row[m]["build_us"] > 0 and row[m]["eval_us"] > 0


def test_bench_decode_attention_times_mlx_lm_math(monkeypatch):
    """The ``mlx_lm`` method computes what the reference does (the soft-capped decode step)."""
    import mlx.core as mx

    from mlx_dhsa import reference

    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("bench_decode_attention")
    q, k, v = (mx.random.normal(s) for s in ((1, 4, 1, 64), (1, 2, 50, 64), (1, 2, 50, 64)))
    ref = reference.dense_attention(q, k, v, scale=bench.SCALE, softcap=bench.SOFTCAP)
    assert mx.allclose(bench.mlx_lm_decode(q, k, v), ref, atol=1e-5).item()


def test_pool_decode_pairs_trials_across_runs(tmp_path, monkeypatch):
    def run(dense, dhsa):
        return {"rows": [{"context": 4096, "runs": {"dense": {"tps": dense},
                                                     "dhsa": {"tps": dhsa}}}]}

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "pooled.json"
    a.write_text(json.dumps(run([100, 50], [120, 100])))  # ratios 1.2, 2.0
    b.write_text(json.dumps(run([80], [40])))  # ratio 0.5
    _run("pool_decode", [str(a), str(b), "--json", str(out)], monkeypatch)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["trials"] == 3 and row["median"] == 1.2
    assert (row["min"], row["max"]) == (0.5, 2.0) and row["run_medians"] == [1.6, 0.5]
