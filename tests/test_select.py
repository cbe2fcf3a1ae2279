"""Target selection: module-name suffixes, regexes, predicates, all-linear, exclude, layouts, errors."""

import jax
import jax.numpy as jnp
import pytest

import jaxpeft
from jaxpeft._select import select_targets

PARAMS = {
    "layers_0": {
        "attn": {
            "q_proj": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)},
            "v_proj": {"kernel": jnp.zeros((8, 8))},
        },
        "norm": {"scale": jnp.zeros(8)},
    },
    "embed": {"embedding": jnp.zeros((16, 8))},
    "lm_head": {"kernel": jnp.zeros((8, 16))},
}


def paths(targets, exclude=(), layouts=None, params=PARAMS):
    return [p for p, _, _ in select_targets(params, targets, exclude, layouts)]


def test_module_name_suffixes_pick_weights_not_biases():
    assert paths(["q_proj"]) == ["layers_0/attn/q_proj/kernel"]
    assert paths(["attn/q_proj", "v_proj"]) == ["layers_0/attn/q_proj/kernel", "layers_0/attn/v_proj/kernel"]
    assert paths(["embed"]) == ["embed/embedding"]


def test_suffix_matches_whole_components_only():
    with pytest.raises(ValueError, match="matched no parameter"):
        paths(["proj"])


def test_regex_and_predicate_targets():
    assert paths(r"v_proj/kernel$") == ["layers_0/attn/v_proj/kernel"]
    assert paths(lambda path, leaf: leaf.shape == (8, 16)) == ["lm_head/kernel"]


def test_all_linear_skips_head_and_embeddings_and_vectors():
    assert paths("all-linear") == ["layers_0/attn/q_proj/kernel", "layers_0/attn/v_proj/kernel"]


def test_exclude_removes_targets():
    assert paths("all-linear", exclude=["v_proj"]) == ["layers_0/attn/q_proj/kernel"]
    assert paths("all-linear", exclude=r"q_proj") == ["layers_0/attn/v_proj/kernel"]


def test_empty_match_error_names_example_paths():
    with pytest.raises(ValueError, match=r"`targets`=\['query'\] matched no parameter. Paths look like 'embed/embed"):
        paths(["query"])


def test_vector_target_is_an_error():
    with pytest.raises(ValueError, match=r"selected 'layers_0/attn/q_proj/bias' of shape \(8,\); only leaves"):
        paths(r"q_proj/")


def test_unknown_layout_for_3d_kernel_is_an_error():
    params = {"dg": {"kernel": jnp.zeros((3, 4, 5))}}
    with pytest.raises(ValueError, match=r"'dg/kernel' has shape \(3, 4, 5\); from a params tree alone"):
        paths(["dg"], params=params)
    layout = jaxpeft.Layout(stack=1, fan_in=1, fan_out=1)
    assert paths(["dg"], params=params, layouts={"dg/kernel": layout}) == ["dg/kernel"]


def test_layout_of_wrong_rank_and_unsupported_kind():
    params = {"dg": {"kernel": jnp.zeros((3, 4, 5))}}
    with pytest.raises(ValueError, match="describes 2 axes"):
        paths(["dg"], params=params, layouts={"dg/kernel": jaxpeft.Layout()})
    bad = jaxpeft.Unsupported("grouped convolutions are not supported.")
    with pytest.raises(ValueError, match=r"'dg/kernel' cannot be adapted: grouped convolutions.*Add it to `exclude`"):
        paths(["dg"], params=params, layouts={"dg/kernel": bad})


def test_invalid_regex_and_bad_specs():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        paths("q_proj(")
    with pytest.raises(ValueError, match='`exclude`="all-linear" is not allowed'):
        paths("all-linear", exclude="all-linear")
    with pytest.raises(ValueError, match="must be non-empty module names"):
        paths(["q_proj", ""])


def test_layout_validation():
    with pytest.raises(ValueError, match="is invalid"):
        jaxpeft.Layout(fan_in=0)
    with pytest.raises(ValueError, match="`kind`='lstm' is not one of"):
        jaxpeft.Layout(kind="lstm")


def test_selection_is_sorted_and_works_on_abstract_params():
    abstract = jax.eval_shape(lambda: PARAMS)
    assert paths("all-linear", params=abstract) == sorted(paths("all-linear", params=abstract))


def test_exclude_removing_every_target_blames_exclude():
    params = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((3, 2))}}
    with pytest.raises(
        ValueError, match=r"`exclude`=\('a', 'b'\) removed all 2 parameters that `targets`=\('a', 'b'\)"
    ):
        jaxpeft.plan(jaxpeft.LoraConfig(targets=["a", "b"], exclude=["a", "b"]), params)
