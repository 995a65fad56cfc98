import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import small_config, tiny_gemma2, tiny_gemma3, tiny_llama
from mlx_lm.models.cache import make_prompt_cache

from mlx_dhsa import DHSAConfig, patch
from mlx_dhsa.boundaries.convert import STATE_DICT_KEYS, convert_predictor, expected_shapes
from mlx_dhsa.boundaries.labels import boundary_labels, default_layer, layer_queries_keys
from mlx_dhsa.boundaries.predictor import (
    BoundaryPredictor,
    PredictorArgs,
    args_path,
    load_predictor,
    packaged_predictor,
    save_predictor,
)
from mlx_dhsa.boundaries.train import Trainer, best_f1, focal_bce, gap_metrics
from mlx_dhsa.chunking import chunk_boundaries, segment_chunks


def _state_dict(args: PredictorArgs, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in the released PyTorch key layout."""
    rng = np.random.default_rng(seed)
    return {
        k: (0.3 * rng.standard_normal(shape)).astype(np.float32)
        for k, shape in expected_shapes(args).items()
    }


def _random_predictor(args: PredictorArgs, seed: int = 0) -> BoundaryPredictor:
    model = BoundaryPredictor(args)
    model.load_weights([(k, mx.array(v)) for k, v in _state_dict(args, seed).items()])
    return model


def _numpy_logits(sd: dict, args: PredictorArgs, keys: np.ndarray) -> np.ndarray:
    """The same math, one gap at a time, in float64 NumPy."""
    B, H_kv, S, D = keys.shape
    C, w, nh = args.channels, args.window, args.heads
    hd = C // nh
    x = keys.transpose(0, 2, 1, 3).reshape(B, S, C).astype(np.float64)
    out = np.full((B, S), -np.inf)
    for b in range(B):
        for p in range(w, S - w + 1):
            win = x[b, p - w : p + w]  # (2w, C)
            q, k, v = np.split(
                win @ sd["enc.mha.in_proj_weight"].T + sd["enc.mha.in_proj_bias"], 3, -1
            )
            heads = []
            for h in range(nh):
                sl = slice(h * hd, (h + 1) * hd)
                s = q[:, sl] @ k[:, sl].T / np.sqrt(hd)
                a = np.exp(s - s.max(-1, keepdims=True))
                heads.append((a / a.sum(-1, keepdims=True)) @ v[:, sl])
            o = (
                np.concatenate(heads, -1) @ sd["enc.mha.out_proj.weight"].T
                + sd["enc.mha.out_proj.bias"]
            )
            o = o + win if args.residual else o
            mu, var = o.mean(-1, keepdims=True), o.var(-1, keepdims=True)
            o = (o - mu) / np.sqrt(var + 1e-5) * sd["enc.norm.weight"] + sd["enc.norm.bias"]
            l, r = o[:w].mean(0), o[w:].mean(0)
            cos = l @ r / (np.linalg.norm(l) * np.linalg.norm(r))
            z = np.concatenate([l, r, np.abs(l - r), l * r, [cos]])
            z = np.maximum(z @ sd["mlp.0.weight"].T + sd["mlp.0.bias"], 0)
            out[b, p] = (z @ sd["mlp.2.weight"].T + sd["mlp.2.bias"])[0]
    return out


@pytest.mark.parametrize("residual", [False, True])
def test_predictor_matches_numpy(residual):
    args = PredictorArgs(channels=32, heads=4, window=4, hidden=16, residual=residual)
    sd = _state_dict(args)
    model = _random_predictor(args)
    keys = np.random.default_rng(1).standard_normal((2, 2, 21, 16)).astype(np.float32)
    got = np.array(model.gap_logits(mx.array(keys)))
    want = _numpy_logits(sd, args, keys)
    assert np.array_equal(np.isinf(got), np.isinf(want))  # -inf exactly where gap_scores has it
    np.testing.assert_allclose(
        got[np.isfinite(want)], want[np.isfinite(want)], atol=1e-4, rtol=1e-4
    )


def test_gap_blocks_and_explicit_windows_agree(monkeypatch):
    args = PredictorArgs(channels=16, heads=2, window=4, hidden=8)
    model = _random_predictor(args)
    keys = mx.random.normal((1, 1, 40, 16))
    whole = model.gap_logits(keys)
    monkeypatch.setattr("mlx_dhsa.boundaries.predictor.GAP_BLOCK", 5)
    assert mx.allclose(model.gap_logits(keys), whole, atol=1e-5).item()
    x = keys[0, 0]
    windows = mx.stack([x[p - 4 : p + 4] for p in range(4, 37)])
    assert mx.allclose(model(windows), whole[0, 4:37], atol=1e-5).item()
    assert model.gap_logits(keys[:, :, :7]).shape == (1, 7)  # too short: all -inf
    with pytest.raises(ValueError, match="trained for another model"):
        model.gap_logits(mx.zeros((1, 2, 40, 16)))


def test_matches_torch_multihead_attention():
    torch = pytest.importorskip("torch")
    C, w = 32, 4

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(C, 4, batch_first=True)
            self.norm = torch.nn.LayerNorm(C)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Enc()
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(4 * C + 1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
            )

        def forward(self, x):  # (N, 2w, C)
            h = self.enc.norm(self.enc.mha(x, x, x, need_weights=False)[0])
            l, r = h[:, :w].mean(1), h[:, w:].mean(1)
            cos = torch.nn.functional.cosine_similarity(l, r, dim=-1)[:, None]
            return self.mlp(torch.cat([l, r, (l - r).abs(), l * r, cos], -1))[:, 0]

    net = Net()
    assert tuple(net.state_dict()) == STATE_DICT_KEYS
    model = BoundaryPredictor(PredictorArgs(channels=C, heads=4, hidden=16))
    model.load_weights([(k, mx.array(v.numpy())) for k, v in net.state_dict().items()])
    x = torch.randn(6, 2 * w, C)
    np.testing.assert_allclose(
        np.array(model(mx.array(x.numpy()))), net(x).detach().numpy(), atol=1e-4
    )


def _check_converted(out, sd, args):
    meta = json.loads(args_path(out).read_text())
    assert meta == {"channels": args.channels, "heads": args.heads, "window": args.window,
                    "hidden": args.hidden, "residual": args.residual,
                    "threshold": args.threshold}  # fmt: skip
    loaded = dict(mx.load(str(out)))
    assert sorted(loaded) == sorted(STATE_DICT_KEYS)
    for k in STATE_DICT_KEYS:
        np.testing.assert_array_equal(np.array(loaded[k]), sd[k])
    model = load_predictor(out)
    assert load_predictor(out) is model  # loaded once per file
    assert model.args == args


def test_convert_safetensors_round_trip(tmp_path):
    args = PredictorArgs(channels=32, heads=4, hidden=16)
    sd = _state_dict(args)
    src = tmp_path / "released.safetensors"
    mx.save_safetensors(str(src), {k: mx.array(v) for k, v in sd.items()})
    out = convert_predictor(src, tmp_path / "mlx" / "predictor", heads=4)
    assert out.name == "predictor.safetensors"
    _check_converted(out, sd, args)


def test_convert_pt_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    args = PredictorArgs(channels=32, heads=4, hidden=16)
    sd = _state_dict(args)
    src = tmp_path / "boundary_predictor.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
    _check_converted(convert_predictor(src, tmp_path / "p.safetensors", heads=4), sd, args)


def test_convert_pt_refuses_non_state_dicts(tmp_path):
    torch = pytest.importorskip("torch")
    nested, code = tmp_path / "nested.pt", tmp_path / "code.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, nested)
    torch.save(torch.nn.Linear(2, 2), code)  # a pickled module: weights_only refuses it
    for path in (nested, code):
        with pytest.raises(ValueError, match="state_dict"):
            convert_predictor(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_pt_without_torch_says_how(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch":
            raise ImportError("no torch")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ImportError, match=r"mlx-dhsa\[predictor\]"):
        convert_predictor(tmp_path / "x.pt", tmp_path / "out")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("mlp.2.bias"), r"missing keys \['mlp.2.bias'\]"),
        (lambda sd: sd.update(extra=np.zeros(1, np.float32)), r"unexpected keys \['extra'\]"),
        (lambda sd: sd.update({"enc.mha.in_proj_weight": np.zeros((96, 31), np.float32)}),
         r"enc.mha.in_proj_weight has shape \(96, 31\), expected \(96, 32\)"),
        (lambda sd: sd.update({"mlp.0.weight": np.zeros((16, 128), np.float32)}),
         r"mlp.0.weight has shape \(16, 128\), expected \(16, 129\)"),
    ],
)  # fmt: skip
def test_convert_names_the_mismatch(tmp_path, edit, match):
    sd = _state_dict(PredictorArgs(channels=32, heads=4, hidden=16))
    edit(sd)
    src = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(src), {k: mx.array(v) for k, v in sd.items()})
    with pytest.raises(ValueError, match=match):
        convert_predictor(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def _brute_masses(q, k, scale, softcap, w):
    q, k = np.array(q, np.float64)[0], np.array(k, np.float64)[0]
    H, S, _ = q.shape
    kk = np.repeat(k, H // k.shape[0], axis=0)  # GQA: query head h reads KV head h // repeats
    s = scale * q @ kk.transpose(0, 2, 1)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    s = np.where(np.tril(np.ones((S, S), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = (a / a.sum(-1, keepdims=True)).mean(0)  # full L x S, head-averaged
    left, right = np.zeros(S), np.zeros(S)
    for p in range(w, S - w + 1):
        left[p] = a[p + w - 1 :, p - w : p].sum()
        right[p] = a[p + w - 1 :, p : p + w].sum()
    return left, right


@pytest.mark.parametrize("make", [tiny_gemma2, tiny_gemma3, tiny_llama])
def test_labels_match_brute_force_attention(make):
    model = make(n_layers=2)
    tokens = mx.random.randint(0, 1024, (1, 45))
    layer = default_layer(model)
    attn = model.layers[layer].self_attn
    rope = attn.rope
    got = boundary_labels(model, tokens, query_block=16, ratio=1.2)
    assert attn.rope is rope  # restored
    cache = make_prompt_cache(model)
    model(tokens, cache=cache)
    assert mx.array_equal(got.keys, cache[layer].state[0][..., :45, :]).item()  # model's keys
    q, k = layer_queries_keys(model, tokens, layer)
    left, right = _brute_masses(q, k, attn.scale, getattr(attn, "attn_logit_softcapping", None), 4)
    np.testing.assert_allclose(np.array(got.left)[0], left, atol=1e-5)
    np.testing.assert_allclose(np.array(got.right)[0], right, atol=1e-5)
    valid = (np.arange(45) >= 4) & (np.arange(45) <= 41)
    assert np.array_equal(np.array(got.valid)[0], valid)
    want = valid & (np.maximum(left, right) >= 1.2 * np.minimum(left, right))
    assert np.array_equal(np.array(got.labels)[0], want) and 0 < want.sum() < valid.sum()


@pytest.fixture
def predictor_file(tmp_path):
    args = PredictorArgs(channels=32, heads=4, window=4, hidden=16)
    return str(save_predictor(_random_predictor(args, seed=3), tmp_path / "pred"))


def test_learned_boundaries_chunk_segments_independently(predictor_file):
    learned = dict(boundaries="learned", predictor_path=predictor_file, predictor_threshold=-1e9)
    cfg = DHSAConfig(
        budget=512, block_size=32, sink=16, local=16, target_chunk=16, chunk_cap=None, **learned
    )
    seg = cfg.chunk_limit
    keys = mx.random.normal((2, 2, 3 * seg, 16))
    whole = segment_chunks(keys, cfg)
    per = [
        segment_chunks(keys[:, :, i * seg : (i + 1) * seg], cfg, offset=i * seg) for i in range(3)
    ]
    assert mx.array_equal(whole.starts, mx.concatenate([c.starts for c in per], 1)).item()
    assert mx.array_equal(whole.lengths, mx.concatenate([c.lengths for c in per], 1)).item()
    starts, lengths = np.array(whole.starts), np.array(whole.lengths)
    assert (lengths[lengths > 0] >= cfg.min_chunk).all() and (lengths > 0).sum() > 2 * 3 * 2
    # Changing the keys of segment 2 changes nothing in segments 1 and 3.
    other = keys.at[:, :, seg : 2 * seg].add(5 * mx.random.normal((2, 2, seg, 16)))
    again = np.array(segment_chunks(other, cfg).starts)
    n = seg // cfg.target_chunk
    assert (again[:, :n] == starts[:, :n]).all() and (again[:, 2 * n :] == starts[:, 2 * n :]).all()
    # A high threshold keeps only the segment starts.
    high = segment_chunks(keys, cfg.replace(predictor_threshold=1e9))
    assert (np.array(high.lengths) > 0).sum() == 2 * 3


def test_learned_config_validation_and_patched_model(predictor_file, tmp_path):
    with pytest.raises(ValueError, match="needs predictor_path"):
        DHSAConfig(boundaries="learned")
    with pytest.raises(ValueError, match="predictor_path is not a file"):
        DHSAConfig(boundaries="learned", predictor_path=str(tmp_path / "missing.safetensors"))
    cfg = small_config(boundaries="learned", predictor_path=predictor_file, min_chunk=4,
                       boundary_window=4, max_chunk=32, dense_below=0)  # fmt: skip
    model = tiny_gemma2(n_layers=2, num_key_value_heads=1)  # keys: 1 x 32 = 32 channels
    out = patch(model, cfg)(mx.random.randint(0, 1024, (1, 80)))
    assert out.shape == (1, 80, 1024) and mx.isfinite(out).all().item()
    with pytest.raises(ValueError, match="min_chunk"):
        chunk_boundaries(mx.zeros((1, 1, 64, 32)), cfg.replace(min_chunk=2, boundary_window=2))


def test_training_lowers_loss_on_a_synthetic_problem():
    # Keys jump to a new random direction at the labelled gaps.
    rng = np.random.default_rng(0)
    B, S, C = 4, 96, 16
    cuts = rng.random((B, S)) < 0.1
    centre = np.cumsum(cuts, 1)
    table = 3 * rng.standard_normal((B, S + 1, C))
    keys = np.take_along_axis(table, centre[..., None], 1) + 0.3 * rng.standard_normal((B, S, C))
    keys, labels = mx.array(keys[:, None].astype(np.float32)), mx.array(cuts)
    valid = mx.broadcast_to((mx.arange(S) >= 4) & (mx.arange(S) <= S - 4), (B, S))
    model = BoundaryPredictor(PredictorArgs(channels=C, heads=2, hidden=32))
    trainer = Trainer(model, learning_rate=3e-3)
    first = trainer.loss(keys, labels, valid)
    for _ in range(80):
        trainer.step(keys, labels, valid)
    assert trainer.loss(keys, labels, valid) < 0.5 * first
    logits = np.array(model.gap_logits(keys))[np.array(valid)]
    assert best_f1(logits, np.array(cuts)[np.array(valid)]).f1 > 0.8


def test_focal_bce_and_metrics():
    x, y = mx.array([2.0, -1.0, -mx.inf]), mx.array([1, 0, 1])
    m = mx.array([True, True, False])
    p = 1 / (1 + np.exp(-np.array([2.0, -1.0])))
    want = (-1.3 * (1 - p[0]) ** 2 * np.log(p[0]) - p[1] ** 2 * np.log(1 - p[1])) / 2
    assert abs(focal_bce(x, y, m).item() - want) < 1e-6
    s, lab = np.array([0.9, 0.8, 0.3, 0.2]), np.array([1, 0, 1, 0])
    g = gap_metrics(s, lab, 0.5)
    assert (g.precision, g.recall, g.density) == (0.5, 0.5, 0.5)
    assert best_f1(s, lab).f1 == pytest.approx(0.8)  # top 3: precision 2/3, recall 1


def test_packaged_gemma3_predictor_loads():
    model = load_predictor(packaged_predictor("gemma-3-270m"))
    # 1 KV head x 256; threshold -0.2 gives its 32-key average chunks (1.1 would give ~160)
    assert model.args == PredictorArgs(channels=256, threshold=-0.2)
    assert model.enc.mha.in_proj_weight.dtype == mx.float32  # stored fp16, computed fp32
    assert model.gap_logits(mx.random.normal((1, 1, 40, 256))).shape == (1, 40)
    with pytest.raises(FileNotFoundError, match="shipped"):
        packaged_predictor("no-such-model")


def test_cli_convert_predictor(tmp_path):
    from typer.testing import CliRunner

    from mlx_dhsa.cli.app import app

    sd = _state_dict(PredictorArgs(channels=32, heads=4, hidden=16))
    src = tmp_path / "released.safetensors"
    mx.save_safetensors(str(src), {k: mx.array(v) for k, v in sd.items()})
    runner = CliRunner()
    ok = runner.invoke(app, ["convert-predictor", str(src), str(tmp_path / "out"), "--heads", "4"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out.safetensors").is_file() and (tmp_path / "out.json").is_file()
    sd.pop("enc.norm.bias")
    mx.save_safetensors(str(src), {k: mx.array(v) for k, v in sd.items()})
    bad = runner.invoke(app, ["convert-predictor", str(src), str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "enc.norm.bias" in bad.output
