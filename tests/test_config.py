import pytest

from mlx_dhsa import DHSAConfig


def test_defaults_are_the_papers_but_issue_16s_selection():
    c = DHSAConfig()
    assert (c.budget, c.block_size, c.sink, c.local, c.dense_tail) == (2048, 128, 16, 128, 64)
    assert (c.boundary_window, c.nms_window, c.min_chunk, c.target_chunk) == (4, 4, 4, 8)
    assert (c.summary, c.scoring, c.local_mode) == ("mean", "paper", "window")
    assert c.key_spread == 1.0 and DHSAConfig.paper().key_spread == 0.0
    assert (
        c.chunk_limit == 4 * c.block_size and c.share_boundaries and c.dense_limit == 2 * c.budget
    )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(budget=0), "budget must be a positive integer, got 0"),
        (dict(block_size=-1), "block_size must be a positive integer"),
        (dict(sink=-3), "sink must be a non-negative integer, got -3"),
        (dict(budget=256), "budget (256) must be at least sink + local + block_size"),
        (dict(min_chunk=64), "min_chunk <= target_chunk <= max_chunk"),
        (dict(max_chunk=4, target_chunk=8), "min_chunk <= target_chunk <= max_chunk"),
        (dict(boundaries="magic"), "boundaries must be one of"),
        (dict(dense_below=-1), "dense_below must be >= 0"),
        (dict(key_spread=-0.5), "key_spread must be >= 0 (0: the paper's chunk score), got -0.5"),
        (dict(key_spread=float("inf")), "key_spread must be a finite number, got inf"),
        (dict(key_spread="1"), "key_spread must be a finite number, got '1'"),
    ],
)
def test_bad_values_name_the_value_and_rule(kwargs, words):
    with pytest.raises(ValueError) as e:
        DHSAConfig(**kwargs)
    assert words in str(e.value)


def test_from_dict_ignores_unknown_and_replace_rejects_them():
    assert DHSAConfig.from_dict({"budget": 1024, "nonsense": 1}).budget == 1024
    assert DHSAConfig().replace(budget=1024).budget == 1024
    with pytest.raises(TypeError, match="unknown DHSAConfig field"):
        DHSAConfig().replace(budgte=1024)
