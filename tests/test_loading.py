import huggingface_hub.constants
import pytest

import mlx_dhsa
from mlx_dhsa.loading import MODEL_ALIASES, ModelNotFoundError, resolve


def test_aliases_resolve_and_paths_pass_through(tmp_path):
    assert resolve("gemma-2-2b") == MODEL_ALIASES["gemma-2-2b"]
    assert resolve("someone/some-model") == "someone/some-model"
    assert resolve(str(tmp_path)) == str(tmp_path)


def test_unknown_alias_lists_the_aliases():
    with pytest.raises(ModelNotFoundError, match="gemma-2-2b-it") as e:
        mlx_dhsa.load("gemma-2-3b")
    assert "unknown model 'gemma-2-3b'" in str(e.value)


def test_uncached_model_offline_names_repo_cache_and_variable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as e:
        mlx_dhsa.load("mlx-dhsa-tests/no-such-model")
    msg = str(e.value)
    assert "'mlx-dhsa-tests/no-such-model'" in msg and "HF_HUB_OFFLINE" in msg
    assert huggingface_hub.constants.HF_HUB_CACHE in msg


def test_load_rejects_unknown_overrides_before_loading():
    with pytest.raises(TypeError, match="unknown DHSAConfig field"):
        mlx_dhsa.load("gemma-2-2b", budgte=1024)
