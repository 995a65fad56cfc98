"""The benchmark scripts run end to end on a tiny random model on the CPU: they are what users
run to reproduce docs/benchmarks.md's tables, so a broken one fails CI. Timings are not checked."""

import ast
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
    _run(
        "bench_decode",
        [
            "--model",
            "tiny",
            "--lengths",
            "1000",
            "--budget",
            "384",
            "--decode-dense-below",
            "0",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--trials",
            "2",
            "--floor",
            "--sparse",
            "--json",
            str(out),
        ],
        monkeypatch,
    )
    row = json.loads(out.read_text())["rows"][0]
    assert row["path"] == "dhsa(reference)"
    assert row["paths"]["dhsa_sparse"] == "dhsa(reference)"
    assert min(row["dense_tps"], row["dhsa_tps"], row["floor_tps"], row["dhsa_sparse_tps"]) > 0
    assert len(row["runs"]["dhsa_sparse"]["tps"]) == 2 and row["dhsa_sparse_paired"] > 0


def test_bench_prefill_and_plot(tmp_path, monkeypatch):
    prefill = tmp_path / "prefill.json"
    _run(
        "bench_prefill",
        [
            "--model",
            "tiny",
            "--lengths",
            "600",
            "--warmup",
            "64",
            "--methods",
            "dense",
            "dhsa",
            "floor",
            "floor_kv",
            "--dtype",
            "float32",
            "--json",
            str(prefill),
        ],
        monkeypatch,
    )
    row = json.loads(prefill.read_text())["rows"][0]
    assert row["dhsa"]["peak_gb"] >= row["dhsa"]["base_gb"] > 0
    assert row["dhsa"]["peak_gb_steps"]
    assert row["floor_kv"]["peak_gb"] >= row["floor_kv"]["base_gb"] > 0
    png = tmp_path / "plot.png"
    _run("plot_bench", [str(prefill), "--out", str(png)], monkeypatch)
    assert png.stat().st_size > 0


def test_pool_decode_pairs_trials_across_runs(tmp_path, monkeypatch):
    def run(dense, dhsa):
        return {
            "rows": [{"context": 4096, "runs": {"dense": {"tps": dense}, "dhsa": {"tps": dhsa}}}]
        }

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "pooled.json"
    a.write_text(json.dumps(run([100, 50], [120, 100])))  # ratios 1.2, 2.0
    b.write_text(json.dumps(run([80], [40])))  # ratio 0.5
    _run("pool_decode", [str(a), str(b), "--json", str(out)], monkeypatch)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["trials"] == 3 and row["median"] == 1.2
    assert (row["min"], row["max"]) == (0.5, 2.0) and row["run_medians"] == [1.6, 0.5]


def test_scripts_use_only_public_names_and_not_each_other():
    """Scripts import the package's public names, never a private one or another script."""
    names = {p.stem for p in SCRIPTS.glob("*.py")}
    for path in sorted(SCRIPTS.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in names, f"{path.name} imports a script"
                assert not any(a.name.startswith("_") for a in node.names), (path.name, node.module)
                assert not any(p.startswith("_") for p in node.module.split(".")), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in names for a in node.names), path.name
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                assert not private, f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}"


def test_bench_doc_cache_random_shape_offline(monkeypatch, capsys):
    """--shape needs no tokenizer, haystack or network (the GPU figures at 8k and 32k)."""
    _run("bench_doc_cache", ["--shape", "tiny", "--tokens", "96"], monkeypatch)
    out = capsys.readouterr().out
    assert "model=random tiny" in out and "tokens=" in out and "second_open_s=" in out


def test_bench_quantized_runs_every_method(tmp_path, monkeypatch):
    out = tmp_path / "quantized.json"
    argv = "--lengths 1024 --bits 4 --layers 1 --budget 384 --chunk 200 --steps 1"
    argv += " --prefill-steps 1 --warmup 0 --trials 1 --dtype float32 --json"
    _run("bench_quantized", [*argv.split(), str(out)], monkeypatch)
    row = json.loads(out.read_text())["rows"][0]
    assert row["cache_gb"]["quantized"] < row["cache_gb"]["bf16"]
    for phase in ("decode", "prefill"):
        assert set(row[phase]) == {"dense_q", "dense_q_kernel", "dhsa_q", "dhsa_bf16"}
        assert row[phase]["dhsa_q"]["speedup_vs_dense_q"] > 0


def test_bench_refine_runs(tmp_path, monkeypatch):
    out = tmp_path / "refine.json"
    _run(
        "bench_refine",
        ["--lengths", "700", "--budget", "384", "--settings", "2/8", "--trials", "1",
         "--json", str(out)],
        monkeypatch,
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["refine"], r["stride"]) for r in rows] == [(2, 8)]
    assert rows[0]["mlx_s"] > 0 and rows[0]["kernel_s"] is None  # no GPU backend here
