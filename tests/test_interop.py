"""jaxpeft.hf against the real thing: torch transformers + HF PEFT, logits compared in float32 both ways.

Needs the ``interop`` extra (torch CPU, transformers, peft); skipped cleanly without it.
"""

import copy
import dataclasses
import json
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jaxpeft  # noqa: E402
import jaxpeft.hf as hf  # noqa: E402
import jaxpeft.linen  # noqa: E402
from examples.models import bert, llama  # noqa: E402
from tests._tiny_llama import tiny_llama_pair  # noqa: E402

pytestmark = [
    # Notices from transformers/peft themselves (PEFT's save_pretrained probes a deprecated transformers API and
    # announces that it saves the embedding it adapts); nothing of jaxpeft's.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    # jaxpeft writes ensure_weight_tying=True with an adapted embedding; PEFT notes when the model is untied.
    pytest.mark.filterwarnings("ignore:You have requested `ensure_weight_tying`, but no tied modules:UserWarning"),
]

TOL = 1e-4
IDS = np.random.default_rng(0).integers(1, 60, (2, 9)).astype(np.int64)


def _randomise(adapters, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.2), adapters)


def _max_diff(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs.detach().numpy())))


def _llama_pair(directory, tied):
    """A tiny torch Llama and our Flax Llama holding the same weights (through the safetensors loader)."""
    torch_model, model, params = tiny_llama_pair(directory, tied=tied)
    layouts = jaxpeft.linen.infer_layouts(model, jnp.asarray(IDS))
    with torch.no_grad():
        base = torch_model(torch.tensor(IDS)).logits
    assert _max_diff(model.apply({"params": params}, jnp.asarray(IDS)), base) < TOL
    return torch_model, model, params, layouts


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return _llama_pair(tmp_path_factory.mktemp("llama"), tied=False)


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    torch_model = transformers.BertModel(config).eval()
    directory = tmp_path_factory.mktemp("bert")
    torch_model.save_pretrained(directory)
    flax_config, params = bert.load_hf_checkpoint(directory)
    model = bert.BertModel(flax_config)
    layouts = jaxpeft.linen.infer_layouts(model, jnp.asarray(IDS))
    with torch.no_grad():
        base = torch_model(torch.tensor(IDS)).last_hidden_state
    assert _max_diff(model.apply({"params": params}, jnp.asarray(IDS)), base) < TOL
    return torch_model, model, params, layouts


def _torch_out(model, kind):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS))
    return out.logits if kind == "llama" else out.last_hidden_state


CASES = {
    "llama": dict(
        module_name=llama.hf_module_name,
        plain=dict(rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"]),
        patterns=dict(
            rank=4,
            alpha=8,
            targets=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
            rank_pattern={"down_proj": 2, "embed_tokens": 3},
            alpha_pattern={"v_proj": 5, "up_proj": 2.5},
            use_rslora=True,
        ),
    ),
    "bert": dict(
        module_name=bert.hf_module_name,
        plain=dict(rank=4, alpha=8, targets=["query", "value", "word_embeddings"]),
        patterns=dict(
            rank=4,
            alpha=16,
            targets=r"(query|key|attention/output/dense|intermediate/dense|word_embeddings)/(kernel|embedding)$",
            rank_pattern={"intermediate": 2},
            alpha_pattern={"key": 4},
            use_rslora=True,
        ),
    ),
}


@pytest.mark.parametrize("variant", ["plain", "patterns"])
@pytest.mark.parametrize("kind", ["bert"])  # Llama: tests/test_hf_codecs.py
def test_jax_adapter_loads_in_hf_peft(kind, variant, request, tmp_path):
    torch_model, model, params, layouts = request.getfixturevalue(f"{kind}_pair")
    case = CASES[kind]
    cfg = jaxpeft.LoraConfig(**case[variant])
    shapes = jax.eval_shape(lambda: jaxpeft.init(cfg, params, key=jax.random.key(0), layouts=layouts))
    adapters = _randomise(shapes, seed=2)
    ours = jaxpeft.linen.apply(model, {"params": params}, adapters, jnp.asarray(IDS))
    hf.export_adapters(tmp_path, adapters, cfg, params, case["module_name"], layouts=layouts)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
    diff = _max_diff(ours, _torch_out(peft_model, kind))
    base = _max_diff(ours, _torch_out(torch_model, kind))
    print(f"JAX -> HF {kind}/{variant}: max |logit diff| {diff:.2e} (adapter moved outputs by {base:.2f})")
    assert base > 1e-2, "the adapter should change the outputs, or the comparison proves nothing"
    assert diff < TOL


def _hf_lora_config(kind, variant):
    if kind == "llama":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"]
        extra = {"rank_pattern": {"down_proj": 2, "embed_tokens": 3}, "alpha_pattern": {"v_proj": 5}}
        if variant == "patterns":
            targets = [*targets, "gate_proj", "up_proj", "down_proj"]
    else:
        targets = ["query", "value", "word_embeddings"]
        extra = {"rank_pattern": {"intermediate.dense": 2}, "alpha_pattern": {"value": 4}}
        if variant == "patterns":
            targets = [*targets, "key", "intermediate.dense", "output.dense"]
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.1)
    if variant == "patterns":
        kwargs |= dict(extra, use_rslora=True)
    return peft.LoraConfig(**kwargs)


@pytest.mark.parametrize("variant", ["plain", "patterns"])
@pytest.mark.parametrize("kind", ["bert"])  # Llama: tests/test_hf_codecs.py
def test_hf_peft_adapter_imports_into_jax(kind, variant, request, tmp_path):
    torch_model, model, params, layouts = request.getfixturevalue(f"{kind}_pair")
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(copy.deepcopy(torch_model), _hf_lora_config(kind, variant))
    # B starts random (init_lora_weights=False); one optimizer step makes it a trained adapter.
    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    out = peft_model(input_ids=torch.tensor(IDS))
    loss = (out.logits if kind == "llama" else out.last_hidden_state).square().mean()
    loss.backward()
    optimizer.step()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    theirs = _torch_out(peft_model, kind)
    cfg, adapters = hf.import_adapters(tmp_path, params, CASES[kind]["module_name"], layouts=layouts)
    assert cfg.dropout == 0.1
    ours = jaxpeft.linen.apply(model, {"params": params}, adapters, jnp.asarray(IDS))
    diff = _max_diff(ours, theirs)
    base = _max_diff(model.apply({"params": params}, jnp.asarray(IDS)), theirs)
    print(f"HF -> JAX {kind}/{variant}: max |logit diff| {diff:.2e} (adapter moved outputs by {base:.2f})")
    assert base > 1e-2
    assert diff < TOL
    # And back: our export of the imported adapter loads in PEFT with the same outputs.
    hf.export_adapters(tmp_path / "again", adapters, cfg, params, CASES[kind]["module_name"], layouts=layouts)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "again").eval()
    assert _max_diff(ours, _torch_out(reloaded, kind)) < TOL


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning")
def test_tied_embedding_adapter_both_ways(tmp_path):
    """A tied head: jaxpeft applies the embedding adapter to `attend`; PEFT does so with ensure_weight_tying."""
    torch_model, model, params, layouts = _llama_pair(tmp_path / "base", tied=True)
    assert "lm_head" not in params
    cfg = jaxpeft.LoraConfig(rank=4, alpha=8, targets=["embed_tokens", "q_proj"])
    shapes = jax.eval_shape(lambda: jaxpeft.init(cfg, params, key=jax.random.key(0), layouts=layouts))
    adapters = _randomise(shapes, seed=8)
    ours = jaxpeft.linen.apply(model, {"params": params}, adapters, jnp.asarray(IDS))
    hf.export_adapters(
        tmp_path / "jax", adapters, cfg, params, llama.hf_module_name, layouts=layouts, tied_head="lm_head"
    )
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "jax").eval()
    diff = _max_diff(ours, _torch_out(loaded, "llama"))
    print(f"JAX -> HF tied llama: max |logit diff| {diff:.2e}")
    assert diff < TOL
    _, back = hf.import_adapters(tmp_path / "jax", params, llama.hf_module_name, layouts=layouts)
    assert sorted(back["model"]) == ["embed_tokens", "layers"]  # the head's copy is recognised and dropped

    torch.manual_seed(9)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False, ensure_weight_tying=True
    )
    trained = peft.get_peft_model(copy.deepcopy(torch_model), lora).eval()
    with torch.no_grad():  # init_lora_weights=False draws N(0, 1) factors: scale them to a trained adapter's size
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.mul_(0.2)
    trained.save_pretrained(tmp_path / "hf")  # holds lm_head.lora_A/B: the embedding factors, transposed
    _, imported = hf.import_adapters(tmp_path / "hf", params, llama.hf_module_name, layouts=layouts)
    ours = jaxpeft.linen.apply(model, {"params": params}, imported, jnp.asarray(IDS))
    diff = _max_diff(ours, _torch_out(trained, "llama"))
    print(f"HF -> JAX tied llama: max |logit diff| {diff:.2e}; max |logit| {float(np.abs(np.asarray(ours)).max()):.1f}")
    assert diff < TOL

    # DoRA: PEFT gives the tied head a DoRA of its own (a magnitude per vocabulary row); jaxpeft refuses it.
    dora = peft.LoraConfig(r=4, target_modules=["embed_tokens"], use_dora=True, ensure_weight_tying=True)
    peft.get_peft_model(copy.deepcopy(torch_model), dora).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match=r"'lm_head' is a tied output head's copy of a DoRA embedding"):
        hf.import_adapters(tmp_path / "dora", params, llama.hf_module_name, layouts=layouts)


class ConvNet(nn.Module):
    """A Conv, a DenseGeneral with two fan-out axes and one with two fan-in axes (Flax side of TorchConvNet)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 3), padding="SAME", name="conv")(x)
        h = nn.DenseGeneral((2, 4), name="proj")(h)
        return nn.DenseGeneral(5, axis=(-2, -1), name="out")(h)


def _torch_conv_net():
    class TorchConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
            self.proj = torch.nn.Linear(3, 8)
            self.out = torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.out(self.proj(self.conv(x).permute(0, 2, 3, 1)))

    torch.manual_seed(4)
    return TorchConvNet().eval()


@pytest.fixture(scope="module")
def conv_pair():
    """TorchConvNet and ConvNet holding the same weights, an input in both layouts, and the layouts."""
    torch_model = _torch_conv_net()
    w = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = {
        "conv": {"kernel": w["conv.weight"].transpose(2, 3, 1, 0), "bias": w["conv.bias"]},
        "proj": {"kernel": w["proj.weight"].T.reshape(3, 2, 4), "bias": w["proj.bias"].reshape(2, 4)},
        "out": {"kernel": w["out.weight"].T.reshape(2, 4, 5), "bias": w["out.bias"]},
    }
    params = jax.tree.map(jnp.asarray, params)
    model = ConvNet()
    x = np.random.default_rng(5).standard_normal((2, 6, 6, 2)).astype(np.float32)
    x_torch = torch.tensor(x.transpose(0, 3, 1, 2))
    layouts = jaxpeft.linen.infer_layouts(model, jnp.asarray(x))
    assert _max_diff(model.apply({"params": params}, jnp.asarray(x)), torch_model(x_torch)) < TOL
    return torch_model, model, params, layouts, jnp.asarray(x), x_torch


def test_conv_and_multi_axis_kernels_both_ways(conv_pair, tmp_path):
    torch_model, model, params, layouts, x, x_torch = conv_pair
    fn = hf.module_name_map()

    # JAX -> HF
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["conv", "proj", "out"])
    shapes = jax.eval_shape(lambda: jaxpeft.init(cfg, params, key=jax.random.key(0), layouts=layouts))
    adapters = _randomise(shapes, seed=6)
    ours = jaxpeft.linen.apply(model, {"params": params}, adapters, x)
    hf.export_adapters(tmp_path / "jax", adapters, cfg, params, fn, layouts=layouts)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "jax").eval()
    with torch.no_grad():
        diff = _max_diff(ours, loaded(x_torch))
        base = _max_diff(ours, torch_model(x_torch))
    print(f"JAX -> HF conv/DenseGeneral: max |diff| {diff:.2e} (adapter moved outputs by {base:.2f})")
    assert base > 1e-2 and diff < TOL

    # HF -> JAX
    torch.manual_seed(7)
    lora = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["conv", "proj", "out"], init_lora_weights=False)
    trained = peft.get_peft_model(copy.deepcopy(torch_model), lora).eval()
    trained.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        theirs = trained(x_torch)
    _, imported = hf.import_adapters(tmp_path / "hf", params, fn, layouts=layouts)
    ours = jaxpeft.linen.apply(model, {"params": params}, imported, x)
    diff = _max_diff(ours, theirs)
    print(f"HF -> JAX conv/DenseGeneral: max |diff| {diff:.2e}")
    assert _max_diff(model.apply({"params": params}, x), theirs) > 1e-2 and diff < TOL


# ----------------------------------------------------------------------------------------------- DoRA and IA3

METHODS = {
    "llama": {
        "dora": dict(
            rank=4,
            alpha=8,
            targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens"],
            rank_pattern={"down_proj": 2},
            use_rslora=True,
        ),
        "ia3": dict(targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], feedforward=["down_proj"]),
    },
    "bert": {
        "dora": dict(rank=4, alpha=8, targets=["query", "key", "intermediate/dense", "word_embeddings"]),
        "ia3": dict(targets=["key", "value", "intermediate/dense", "output/dense"], feedforward=["output/dense"]),
    },
    "conv": {
        "dora": dict(rank=2, alpha=4, targets=["conv", "proj", "out"]),
        "ia3": dict(targets=["conv", "proj", "out"], feedforward=["conv", "out"]),
    },
}
# The same adapters in HF PEFT terms (module names are HF's; `output.dense` marks both BERT output layers).
HF_METHODS = {
    "llama": {
        "dora": dict(r=4, lora_alpha=8, target_modules=METHODS["llama"]["dora"]["targets"], lora_dropout=0.1),
        "ia3": dict(target_modules=METHODS["llama"]["ia3"]["targets"], feedforward_modules=["down_proj"]),
    },
    "bert": {
        "dora": dict(r=4, lora_alpha=8, target_modules=["query", "key", "intermediate.dense", "word_embeddings"]),
        "ia3": dict(
            target_modules=["key", "value", "intermediate.dense", "output.dense"], feedforward_modules=["output.dense"]
        ),
    },
    "conv": {
        "dora": dict(r=2, lora_alpha=3, target_modules=["conv", "proj", "out"]),
        "ia3": dict(target_modules=["conv", "proj", "out"], feedforward_modules=["conv", "out"]),
    },
}


def _pair(kind, request):
    """``(torch model, flax model, params, layouts, jax input, torch runner, module_name)`` for a model kind."""
    if kind == "conv":
        torch_model, model, params, layouts, x, x_torch = request.getfixturevalue("conv_pair")
        return torch_model, model, params, layouts, x, lambda m: m(x_torch), hf.module_name_map()
    torch_model, model, params, layouts = request.getfixturevalue(f"{kind}_pair")
    return (
        torch_model,
        model,
        params,
        layouts,
        jnp.asarray(IDS),
        lambda m: _torch_out(m, kind),
        CASES[kind]["module_name"],
    )


def _trained_jax_adapters(cfg, params, layouts, seed):
    """Adapters with non-trivial values: LoRA factors N(0, 0.2²); DoRA magnitudes the base weight's norms (their
    initial value) times 1 + N(0, 0.3²); IA3 vectors 1 + N(0, 0.5²). Drawn with numpy: no per-shape compile."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda p: jaxpeft.init(cfg, p, key=jax.random.key(0), layouts=layouts), params)
    flat = {jaxpeft.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def draw(keypath, node):
        if isinstance(node, jaxpeft.IA3Weights):
            vector = 1.0 + 0.5 * rng.standard_normal(node.vector.shape).astype(np.float32)
            return dataclasses.replace(node, vector=jnp.asarray(vector))
        path = jaxpeft.path_str(keypath)
        noise = {f: rng.standard_normal(getattr(node, f).shape).astype(np.float32) for f in ("a", "b", "magnitude")}
        stack, fan_in, fan_out = node.layout.split(flat[path].shape)
        w = np.reshape(np.asarray(flat[path]), (math.prod(stack), math.prod(fan_in), -1))
        norms = np.reshape(np.linalg.norm(w, axis=1), (*stack, *fan_out))
        return dataclasses.replace(
            node,
            a=jnp.asarray(0.2 * noise["a"]),
            b=jnp.asarray(0.2 * noise["b"]),
            magnitude=jnp.asarray(norms * (1.0 + 0.3 * noise["magnitude"])),
        )

    return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: isinstance(x, jaxpeft.Adapter))


@pytest.mark.parametrize("method", ["dora", "ia3"])
@pytest.mark.parametrize("kind", ["bert", "conv"])  # Llama: tests/test_hf_codecs.py
def test_jax_dora_and_ia3_load_in_hf_peft(kind, method, request, tmp_path):
    torch_model, model, params, layouts, x, run, module_name = _pair(kind, request)
    cfg = (jaxpeft.DoraConfig if method == "dora" else jaxpeft.IA3Config)(**METHODS[kind][method])
    adapters = _trained_jax_adapters(cfg, params, layouts, seed=11)
    ours = jaxpeft.linen.apply(model, {"params": params}, adapters, x)
    tying = {"ensure_weight_tying": False} if method == "dora" else {}  # the heads of these models are untied
    hf.export_adapters(tmp_path, adapters, cfg, params, module_name, layouts=layouts, **tying)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
    with torch.no_grad():
        diff, base = _max_diff(ours, run(peft_model)), _max_diff(ours, run(torch_model))
    print(f"JAX -> HF {method} {kind}: max |logit diff| {diff:.2e} (adapter moved outputs by {base:.2f})")
    assert base > 1e-2, "the adapter should change the outputs, or the comparison proves nothing"
    assert diff < TOL


def _trained_peft_model(torch_model, kind, method, seed):
    """A PEFT model with non-trivial adapter values: random factors (init_lora_weights=False) scaled down,
    magnitudes times 1 + N(0, 0.2²); IA3 vectors 1 + N(0, 0.5²)."""
    torch.manual_seed(seed)
    if method == "dora":
        config = peft.LoraConfig(use_dora=True, init_lora_weights=False, **HF_METHODS[kind][method])
    else:
        config = peft.IA3Config(init_ia3_weights=False, **HF_METHODS[kind][method])
    peft_model = peft.get_peft_model(copy.deepcopy(torch_model), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in name:
                p.mul_(0.2)
            elif "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return peft_model.eval()


@pytest.mark.parametrize("method", ["dora", "ia3"])
@pytest.mark.parametrize("kind", ["bert", "conv"])  # Llama: tests/test_hf_codecs.py
def test_hf_peft_dora_and_ia3_import_into_jax(kind, method, request, tmp_path):
    torch_model, model, params, layouts, x, run, module_name = _pair(kind, request)
    trained = _trained_peft_model(torch_model, kind, method, seed=12)
    trained.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        theirs = run(trained)
    cfg, adapters = hf.import_adapters(tmp_path / "hf", params, module_name, layouts=layouts)
    assert type(cfg) is (jaxpeft.DoraConfig if method == "dora" else jaxpeft.IA3Config)
    ours = jaxpeft.linen.apply(model, {"params": params}, adapters, x)
    diff, base = _max_diff(ours, theirs), _max_diff(model.apply({"params": params}, x), theirs)
    print(f"HF -> JAX {method} {kind}: max |logit diff| {diff:.2e} (adapter moved outputs by {base:.2f})")
    assert base > 1e-2
    assert diff < TOL
    # And back: our export of the imported adapter loads in PEFT with the same outputs.
    tying = {"ensure_weight_tying": False} if method == "dora" else {}
    hf.export_adapters(tmp_path / "again", adapters, cfg, params, module_name, layouts=layouts, **tying)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "again").eval()
    with torch.no_grad():
        assert _max_diff(ours, run(reloaded)) < TOL


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_ia3_feedforward_modules_mark_the_same_modules_in_peft(nested, tmp_path):
    """PEFT tests `feedforward_modules` by bare `endswith`: "proj" would also mark "q_proj". The export picks
    names (or a regex) under which PEFT marks exactly our feed-forward modules; the 4x4 shapes cannot tell."""
    names = ("mlp.proj", "attn.q_proj") if nested else ("proj", "q_proj")

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in names:
                parent = self
                for part in name.split(".")[:-1]:
                    parent.add_module(part, torch.nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(name.split(".")[-1], torch.nn.Linear(4, 4))

    toy = Toy()
    params: dict = {}
    for name in names:
        node = params
        for part in name.split("."):
            node = node.setdefault(part, {})
        node["kernel"] = jnp.ones((4, 4))
    cfg = jaxpeft.IA3Config(targets=["proj", "q_proj"], feedforward=[names[0].replace(".", "/")])
    adapters = _trained_jax_adapters(cfg, params, None, seed=13)
    hf.export_adapters(tmp_path, adapters, cfg, params, hf.module_name_map())
    loaded = peft.PeftModel.from_pretrained(toy, tmp_path)
    marked = {
        name.removeprefix("base_model.model."): module.is_feedforward
        for name, module in loaded.named_modules()
        if isinstance(module, peft.tuners.ia3.IA3Layer)
    }
    assert marked == {names[0]: True, names[1]: False}


# ----------------------------------------------------------------------------------------------- PEFT's own rules


class _Projections(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="q_proj")(x) + nn.Dense(6, name="v_proj")(x)


class _Layers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Projections(name="layers_0")(x) + _Projections(name="layers_1")(x)


class TwoLayers(nn.Module):
    """model.layers.{0,1}.{q_proj,v_proj}: Dense(6) each, all applied to the input and summed."""

    @nn.compact
    def __call__(self, x):
        return _Layers(name="model")(x)


def _two_layers_pair():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)

    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            return sum(m(x) for layer in self.model.layers for m in (layer.q_proj, layer.v_proj))

    torch.manual_seed(14)
    torch_model = Torch().eval()
    params: dict = {"params": {"model": {}}}
    for i, layer in enumerate(torch_model.model.layers):
        for m in ("q_proj", "v_proj"):
            linear = getattr(layer, m)
            params["params"]["model"].setdefault(f"layers_{i}", {})[m] = {
                "kernel": jnp.asarray(linear.weight.detach().numpy().T),
                "bias": jnp.asarray(linear.bias.detach().numpy()),
            }
    x = np.random.default_rng(15).standard_normal((3, 8)).astype(np.float32)
    return torch_model, TwoLayers(), params, x


_two_layers_name = hf.module_name_map()


def _peft_adapted(peft_model):
    return sorted(
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )


def _edit_config(directory, **change):
    path = directory / hf.CONFIG_NAME
    config = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change",
    [
        {"target_modules": ["q_proj"]},
        {"exclude_modules": ["v_proj"]},
        {"layers_to_transform": [0], "layers_pattern": "layers"},
        {"layers_to_transform": 1},
        {"target_modules": r"model\.layers\.0\..*"},
    ],
)
def test_peft_silently_drops_tensors_its_config_does_not_select(change, tmp_path):
    """The observed PEFT behaviour jaxpeft refuses: tensors for modules the config does not select are dropped
    without a warning. A file whose tensors match the selection imports to exactly PEFT's outputs."""
    torch_model, model, params, x = _two_layers_pair()
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"])
    adapters = _randomise(jax.eval_shape(lambda: jaxpeft.init(cfg, params["params"], key=jax.random.key(0))), 16)
    hf.export_adapters(tmp_path / "all", adapters, cfg, params["params"], _two_layers_name)
    _edit_config(tmp_path / "all", **change)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: PEFT says nothing about the tensors it drops
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "all").eval()
    selected = _peft_adapted(loaded)
    assert 0 < len(selected) < 4
    with pytest.raises(ValueError, match=r"does not select them. PEFT's from_pretrained silently ignores"):
        hf.import_adapters(tmp_path / "all", params["params"], _two_layers_name)
    # The same file holding only what PEFT selects: jaxpeft imports exactly those modules, with PEFT's outputs.
    keep = sorted(p for p, _ in jaxpeft.adapter_items(adapters) if _two_layers_name(p.rpartition("/")[0]) in selected)
    sub_cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets="^(" + "|".join(keep) + ")$")
    subset: dict = {"model": {}}
    for path in keep:
        _, layer, module, _ = path.split("/")
        subset["model"].setdefault(layer, {})[module] = adapters["model"][layer][module]
    hf.export_adapters(tmp_path / "sub", subset, sub_cfg, params["params"], _two_layers_name)
    _edit_config(tmp_path / "sub", **{"target_modules": ["q_proj", "v_proj"], **change})
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "sub").eval()
    assert _peft_adapted(reloaded) == selected
    _, imported = hf.import_adapters(tmp_path / "sub", params["params"], _two_layers_name)
    ours = jaxpeft.linen.apply(model, params, imported, jnp.asarray(x))
    with torch.no_grad():
        theirs, base = reloaded(torch.tensor(x)), torch_model(torch.tensor(x))
    assert _max_diff(ours, base) > 1e-2 and _max_diff(ours, theirs) < TOL


def test_peft_behaviour_behind_the_refusals(tmp_path):
    """What PEFT does with the values jaxpeft refuses: a string "false" turns rsLoRA on, a missing config
    fails to load (loudly, as after a killed export), and unknown keys only warn."""
    torch_model, _, params, _ = _two_layers_pair()
    cfg = jaxpeft.LoraConfig(rank=4, alpha=4, targets=["q_proj"])
    adapters = _randomise(jax.eval_shape(lambda: jaxpeft.init(cfg, params["params"], key=jax.random.key(0))), 17)
    hf.export_adapters(tmp_path, adapters, cfg, params["params"], _two_layers_name)
    _edit_config(tmp_path, use_rslora="false")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path)
    assert loaded.base_model.model.model.layers[0].q_proj.scaling["default"] == 4 / math.sqrt(4)  # rsLoRA: on
    with pytest.raises(ValueError, match=r"`use_rslora`='false'; expected true or false"):
        hf.import_adapters(tmp_path, params["params"], _two_layers_name)
    _edit_config(tmp_path, use_rslora=False, my_variant={"on": 1})
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['my_variant'\]"):
        peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path)
    with pytest.raises(ValueError, match=r"sets `my_variant`=\{'on': 1\}, which PEFT 0.21.2's LoraConfig"):
        hf.import_adapters(tmp_path, params["params"], _two_layers_name)
    (tmp_path / hf.CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=r"adapter_config.json"):
        peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path)


# ----------------------------------------------------------------------------------------------- modules_to_save


@pytest.fixture(scope="module")
def bert_cls_pair(tmp_path_factory):
    """A tiny torch BertForSequenceClassification and our Flax one (encoder under `bert/`, head `classifier`)."""
    torch.manual_seed(5)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
        attn_implementation="eager",
    )
    torch_model = transformers.BertForSequenceClassification(config).eval()
    directory = tmp_path_factory.mktemp("bert_cls")
    torch_model.save_pretrained(directory)
    flax_config, params = bert.load_hf_checkpoint(directory, with_classifier=True)
    model = bert.BertForSequenceClassification(flax_config)
    with torch.no_grad():
        base = torch_model(torch.tensor(IDS)).logits
    assert _max_diff(model.apply({"params": params}, jnp.asarray(IDS)), base) < TOL
    return torch_model, model, params


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def test_trained_head_as_modules_to_save_both_ways(bert_cls_pair, tmp_path):
    """LoRA + a retrained classifier head: PEFT loads jaxpeft's export with the same logits and saves the same keys;
    PEFT's own `modules_to_save` file (task_type SEQ_CLS) imports with its head."""
    torch_model, model, params = bert_cls_pair
    cfg = jaxpeft.LoraConfig(rank=4, alpha=8, targets=["query", "value"])
    adapters = _randomise(jax.eval_shape(lambda: jaxpeft.init(cfg, params, key=jax.random.key(0))), 21)
    rng = np.random.default_rng(22)
    head = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), x.dtype), params["classifier"])
    ours = jaxpeft.linen.apply(model, {"params": {**params, "classifier": head}}, adapters, jnp.asarray(IDS))
    hf.export_adapters(
        tmp_path / "jax",
        adapters,
        cfg,
        params,
        bert.hf_module_name,
        task_type="SEQ_CLS",
        modules_to_save={"classifier": head},
    )
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "jax").eval()
    diff, moved = _max_diff(ours, _logits(loaded)), _max_diff(ours, _logits(torch_model))
    print(f"JAX -> HF LoRA + modules_to_save: max |logit diff| {diff:.2e} (adapter + head moved logits by {moved:.2f})")
    assert moved > 1e-2 and diff < TOL
    base_head = jaxpeft.linen.apply(model, {"params": params}, adapters, jnp.asarray(IDS))
    assert _max_diff(base_head, _logits(loaded)) > 1e-2  # PEFT runs our head, not the base model's
    loaded.save_pretrained(tmp_path / "resaved")  # PEFT writes exactly our keys
    with open(tmp_path / "resaved" / hf.CONFIG_NAME) as f:
        assert "classifier" in json.load(f)["modules_to_save"]
    ours_keys = set(load_file(tmp_path / "jax" / hf.WEIGHTS_NAME))
    assert ours_keys == set(load_file(tmp_path / "resaved" / hf.WEIGHTS_NAME))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= ours_keys

    torch.manual_seed(23)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS"
    )
    trained = peft.get_peft_model(copy.deepcopy(torch_model), lora).eval()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.mul_(0.2)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    trained.save_pretrained(tmp_path / "hf")
    theirs = _logits(trained)
    with pytest.raises(ValueError, match=r"holds fully trained modules .*'classifier'"):
        hf.import_adapters(tmp_path / "hf", params, bert.hf_module_name)
    like = {"classifier": params["classifier"]}
    _, imported, saved = hf.import_adapters(tmp_path / "hf", params, bert.hf_module_name, modules_to_save=like)
    ours = jaxpeft.linen.apply(model, {"params": {**params, **saved}}, imported, jnp.asarray(IDS))
    diff, moved = _max_diff(ours, theirs), _max_diff(ours, _logits(torch_model))
    print(f"HF -> JAX LoRA + modules_to_save: max |logit diff| {diff:.2e} (adapter + head moved logits by {moved:.2f})")
    assert moved > 1e-2 and diff < TOL
