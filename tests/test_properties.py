"""Property-based tests: any config input either works (and round-trips through JSON) or raises a documented error.

Never anything else: no raw ``KeyError``, ``AttributeError``, ``OverflowError`` from deep inside a dependency.
"""

import json
import math

import jax
import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxpeft

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "q", "all-linear", "(", "false", "0.1", "float32", "float64", "int8", "kaiming", "x$"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4,
)
PARAMS = {"q": {"kernel": jnp.ones((4, 3))}, "down": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}


def _fields(cls):
    names = [f for f in cls.__dataclass_fields__]
    return st.dictionaries(st.sampled_from(names), VALUES, max_size=4)


def _check(cls, kwargs):
    try:
        cfg = cls(**kwargs)
    except (ValueError, TypeError) as err:
        assert str(err), "errors must say what is wrong"
        return
    hash(cfg)
    again = cls.from_json(cfg.to_json())
    assert again == cfg
    try:
        adapters = jaxpeft.init(cfg, PARAMS, key=jax.random.key(0))
    except ValueError as err:
        assert str(err)
        return
    for leaf in jax.tree.leaves(adapters):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    for _, node in jaxpeft.adapter_items(adapters):
        assert math.isfinite(getattr(node, "scale", 1.0))


@settings(max_examples=150, deadline=None)
@given(_fields(jaxpeft.LoraConfig))
def test_lora_config_inputs(kwargs):
    _check(jaxpeft.LoraConfig, kwargs)


@settings(max_examples=60, deadline=None)
@given(_fields(jaxpeft.IA3Config))
def test_ia3_config_inputs(kwargs):
    _check(jaxpeft.IA3Config, kwargs)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["method", "rank", "alpha", "targets", "feedforward", "bogus"]), VALUES))
def test_config_from_any_json_object(data):
    try:
        json.dumps(data)
    except (ValueError, TypeError):
        return
    try:
        cfg = jaxpeft.config_from_dict(data)
    except (ValueError, TypeError) as err:
        assert str(err)
        return
    assert jaxpeft.config_from_dict(cfg.to_dict()) == cfg
