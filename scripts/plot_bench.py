"""Plot the JSON of bench_prefill.py (and optionally bench_decode.py) as one PNG.

    python scripts/plot_bench.py benchmarks/h200/prefill/sweep_combined.json \
        --decode benchmarks/h200/decode/decode.json --out docs/h200.png
"""

import argparse
import json
import sys

from mlx_dhsa.extras import MissingExtraError, require

try:
    matplotlib = require("matplotlib", "plot_bench.py")
except MissingExtraError as e:
    sys.exit(str(e))
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prefill")
    p.add_argument("--decode", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = json.load(open(args.prefill))["rows"]
    methods = [m for m in rows[0] if isinstance(rows[0][m], dict)]
    n = 3 if args.decode else 2
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4))
    tokens = [r["tokens"] for r in rows]
    for m in methods:
        axes[0].plot(tokens, [r[m]["seconds"] for r in rows], marker="o", label=m)
        axes[1].plot(tokens, [r[m]["peak_gb"] for r in rows], marker="o", label=m)
    axes[0].set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill seconds",
                title="Prefill latency")  # fmt: skip
    axes[1].set(xscale="log", xlabel="prompt tokens", ylabel="peak memory (GB)",
                title="Prefill peak memory")  # fmt: skip
    if args.decode:
        drows = json.load(open(args.decode))["rows"]
        ctx = [r["context"] for r in drows]
        for m in [m for m in ("dense", "dhsa", "dhsa_sparse", "floor") if f"{m}_tps" in drows[0]]:
            axes[2].plot(ctx, [r[f"{m}_tps"] for r in drows], marker="o", label=m)
        axes[2].set(xscale="log", xlabel="context tokens", ylabel="tokens / s", title="Decode")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    env = json.load(open(args.prefill)).get("env", {})
    model = env.get("model", "gemma-2-2b (random weights)")
    fig.suptitle(f"{model}, {env.get('dtype', 'bfloat16')} - {env.get('device_name', '')}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
