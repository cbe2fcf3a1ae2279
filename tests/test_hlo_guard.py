"""Regression guard on the compiled LoRA/DoRA/IA3 train steps (CPU, deterministic: it compiles, it does not time).

Autodiff of ``s·(x·A)·B`` contracts ``dA = xᵀ·dh`` over the token axes, and XLA materialises ``xᵀ`` first: one
activation-sized transpose + copy per adapted layer per step, which made the LoRA step 1.36x the frozen floor on a
2-core CPU at 1.03x its FLOPs. ``jaxpeft.ops.lowrank_chain`` orders the backward contractions so that only rank-r
matrices are transposed. These tests count the activation-sized transposes and copies in the compiled step of the
Llama example model (examples/benchmarks/train_step.py) and compare them with the frozen floor's.

Recorded on CPU, jax 0.10.2, shape ``SMALL`` below (activation-sized = at least half of batch·seq·width elements),
as ``floor / lora / dora / ia3`` transposes + copies:

- before ``lowrank_chain`` (autodiff of two dots): 46 / 77 / 102 / 53  (LoRA: 31 more than the floor)
- with ``lowrank_chain``:                          46 / 51 / 70 / 53   (LoRA: 5 more: its extra residual buffers)

XLA FLOPs, lora/floor: 1.034 before, 1.031 after (r/d = 2/128 here; 1.032 at the benchmark's 16/512).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxpeft
import jaxpeft.linen
from examples.benchmarks.train_step import PRESETS, TARGETS, LlamaForCausalLM, compile_step, hlo_op_counts

SMALL = dataclasses.replace(
    PRESETS["tiny"], width=128, ffn=256, layers=2, heads=4, kv_heads=4, vocab=512, batch=2, seq=64, rank=2
)
BIG = SMALL.batch * SMALL.seq * min(SMALL.width, SMALL.ffn) // 2
# Bounds on (mode's activation-sized transposes + copies) - (the floor's): measured + a small margin.
EXTRA_BOUND = {"lora": 5 + 3, "dora": 24 + 4, "ia3": 7 + 2}


@pytest.fixture(scope="module")
def compiled():
    model = LlamaForCausalLM(SMALL.llama())
    ids = jnp.zeros((SMALL.batch, SMALL.seq), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    out = {}
    for mode in ("floor", "lora", "dora", "ia3"):
        step, _ = compile_step(mode, SMALL, params, ids)
        cost = step.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        counts = hlo_op_counts(step.as_text(), BIG)
        out[mode] = (counts.get("transpose", 0) + counts.get("copy", 0), float(cost["flops"]))
    return out


@pytest.mark.parametrize("mode", sorted(EXTRA_BOUND))
def test_adapters_add_few_activation_sized_transposes_or_copies_to_the_floor(compiled, mode):
    extra = compiled[mode][0] - compiled["floor"][0]
    assert extra <= EXTRA_BOUND[mode], f"{mode}: {extra} activation-sized transposes/copies more than the floor"


def test_lora_flops_stay_near_the_floor(compiled):
    assert compiled["lora"][1] / compiled["floor"][1] <= 1.05  # 1.031 measured


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AutodiffLora(jaxpeft.LoraWeights):
    """LoRA whose branch is two plain dots differentiated by autodiff (what jaxpeft did before lowrank_chain)."""

    def forward(self, call):
        y = call.base(call.x)
        h = jnp.tensordot(call.x, self.a.astype(y.dtype), axes=1) * self.scale
        return y + jnp.tensordot(h, self.b.astype(y.dtype), axes=1)


def test_the_guard_fails_on_autodiff_of_the_plain_branch(compiled):
    """The same LoRA step with the autodiff branch transposes activations for every adapter: the guard sees it."""
    model = LlamaForCausalLM(SMALL.llama())
    ids = jnp.zeros((SMALL.batch, SMALL.seq), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    cfg = jaxpeft.LoraConfig(rank=SMALL.rank, alpha=2 * SMALL.rank, targets=TARGETS)
    lora = jaxpeft.linen.init(cfg, model, params, ids, key=jax.random.key(1))
    plain = jax.tree.map(
        lambda n: AutodiffLora(**{f.name: getattr(n, f.name) for f in dataclasses.fields(n)}),
        lora,
        is_leaf=lambda n: isinstance(n, jaxpeft.LoraWeights),
    )

    def step(adapters, params, ids):
        def loss(a):
            logits = jaxpeft.linen.apply(model, {"params": params}, a, ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        return jax.grad(loss)(adapters)

    counts = hlo_op_counts(jax.jit(step).lower(plain, params, ids).compile().as_text(), BIG)
    extra = counts.get("transpose", 0) + counts.get("copy", 0) - compiled["floor"][0]
    assert extra > EXTRA_BOUND["lora"]
