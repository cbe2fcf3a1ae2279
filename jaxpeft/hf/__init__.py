"""Hugging Face PEFT interop: a method's adapters as ``adapter_config.json`` + ``adapter_model.safetensors``.

The files are the ones ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads (safetensors
metadata ``{"format": "pt"}``). Each method says how it reads and writes them in its codec (``cfg.codec``, a
:class:`PeftCodec` of pure functions beside the method; ``codecs()`` lists them: LoRA, DoRA and LoRA-FA share PEFT's
``LORA``, then ``IA3``, ``LOHA``, ``LOKR``, ``VERA``, ``LN_TUNING``, ``PROMPT_TUNING``, ``PREFIX_TUNING``). This
module only dispatches through the codecs (the registry's, and those of the config classes you pass), after the
checks every method shares; a method of your own with a codec exports and imports with no library edit.

Which HF module a parameter belongs to is decided by a ``module_name`` function from our module path (the
parameter path without its leaf, e.g. ``"model/layers/self_attn/q_proj"``) to the HF module name. A template
with ``{layer}`` marks a leading stack axis (``nn.scan``): such an adapter is written as one HF module per layer
and re-stacked on import. ``module_name_map`` builds such a function from a few rules; any callable (or a dict)
works. Flax kernels are ``[in, out]``, PyTorch weights ``[out, in]``: tensors are transposed both ways, and kernels
with several fan-in or fan-out axes (``DenseGeneral``, ``Einsum``) are flattened to HF's 2-D shapes. The layout of
each adapted weight is read from the adapter node, never guessed.

Whole trained modules (a classifier head, norms) travel as PEFT's ``modules_to_save``: pass
``modules_to_save={"classifier": head}`` (HF module name -> the module's Flax-named tree: ``kernel``, ``bias``,
``embedding``, ``scale``; ``jaxpeft.hf._saved``) to the export, and the same with trees of the expected structure
to the import, which then returns them as a third item.

Under faults and hostile files (``jaxpeft.hf._files``, ``jaxpeft.hf._config``): an export replaces the config/tensor
pair together or not at all and leaves other files alone; an import adapts exactly the modules PEFT's
``from_pretrained`` would, refuses a file whose tensors and config disagree, and refuses every bad value by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, overload

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxpeft._select import Layout
from jaxpeft.hf import _saved
from jaxpeft.hf._codec import Export, FieldTable, Import, PeftCodec
from jaxpeft.hf._common import LAYER, ModuleName, as_fn, check_tensors, check_tied_head, module_name_map
from jaxpeft.hf._config import CONFIG_NAME, check_fields
from jaxpeft.hf._files import WEIGHTS_NAME, read_directory, write_directory
from jaxpeft.protocol import MethodConfig, adapter_items

__all__ = [
    "CONFIG_NAME",
    "LAYER",
    "WEIGHTS_NAME",
    "Export",
    "FieldTable",
    "Import",
    "PeftCodec",
    "codecs",
    "export_adapters",
    "from_state_dict",
    "import_adapters",
    "module_name_map",
    "to_state_dict",
]


def codecs(configs: Sequence[type[MethodConfig]] = ()) -> list[PeftCodec]:
    """The codecs an import tries, in order: those of ``configs``, then the built-in methods' (the registry's)."""
    from jaxpeft.methods.registry import BUILTIN

    for cls in configs:
        if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
            raise TypeError(f"`configs` entry {cls!r} is not a method config class (a jaxpeft.MethodConfig subclass).")
    found: list[PeftCodec] = []
    for cls in (*configs, *BUILTIN):
        if cls.codec is not None and not any(cls.codec is c for c in found):  # a shared codec is tried once
            found.append(cls.codec)
    return found


def _codec_of(cfg: Any) -> PeftCodec:
    """``cfg``'s codec, or a ``TypeError`` naming what PEFT formats exist and, where there is one, the fix."""
    if not isinstance(cfg, MethodConfig):
        raise TypeError(
            f"`cfg` is a {type(cfg).__name__}; expected the method config the adapters were made with (a "
            "jaxpeft.MethodConfig subclass)."
        )
    codec = type(cfg).codec
    if codec is None:
        known = sorted({c.peft_type for c in codecs()})
        fix = type(cfg).hf_advice
        message = (
            f"`cfg` is a {type(cfg).__name__}: jaxpeft.hf does not write {cfg.method or 'its'} adapters: the method "
            f"has no PEFT codec (jaxpeft.hf writes {', '.join(known)}; a method of your own sets `codec`). {fix}"
        )
        raise TypeError(message.rstrip())
    return codec


def _import_codec(config: Mapping[str, Any], configs: Sequence[type[MethodConfig]]) -> PeftCodec:
    """The first codec that reads ``config``'s ``peft_type`` and accepts it."""
    candidates = codecs(configs)
    peft_type = config.get("peft_type")
    for codec in candidates:
        if codec.peft_type == peft_type and (codec.accepts is None or codec.accepts(config)):
            return codec
    known = sorted({c.peft_type for c in candidates})
    raise ValueError(
        f"{CONFIG_NAME} has `peft_type`={peft_type!r:.80}; jaxpeft.hf imports {', '.join(map(repr, known))}. For a "
        "method of your own, pass its config class (with a `codec`): configs=(MyConfig,)."
    )


def to_state_dict(
    adapters: Any,
    cfg: MethodConfig,
    params: Any,
    module_name: ModuleName,
    *,
    layouts: Mapping[str, Layout] | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    target_modules: str | Sequence[str] | None = None,
    ensure_weight_tying: bool | None = None,
    tied_head: str | None = None,
    modules_to_save: Mapping[str, Any] | None = None,
    parameter_order: Sequence[str] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF PEFT ``adapter_config.json`` contents and ``adapter_model.safetensors`` tensors of ``adapters``.

    ``PeftModel.from_pretrained`` on the result computes the same outputs as ``jaxpeft`` (the interop tests
    compare logits to 1e-4). LoRA/DoRA per-path ranks and alphas become HF ``rank_pattern``/``alpha_pattern``;
    IA3's feed-forward targets become ``feedforward_modules``. Every pattern and name list is checked against HF's
    matching rule before it is written. Global arrays of a multi-process job (``jax.distributed``) are gathered
    first, a collective: call it on every process.

    Args:
      adapters: the adapter tree (``jaxpeft.init``, trained or restored).
      cfg: the config the adapters were made with; its class's ``codec`` writes the files (VeRA: pass the whole
        adapter tree ``jaxpeft.init`` made, whose projections it writes as PEFT's shared ``vera_A``/``vera_B``; LN
        tuning writes each tuned norm's whole parameters, ``base + delta``, as PEFT saves them).
      params: the base params (arrays or ``jax.ShapeDtypeStruct``), read for shapes and module names; concrete
        arrays for LN tuning (the written norms are base + delta).
      module_name: our module path -> HF module name (``{layer}`` for a scan axis); a callable or a dict.
      layouts: optional; checked against the layout each adapter node carries.
      task_type: HF ``task_type`` (e.g. ``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``"FEATURE_EXTRACTION"``).
      base_model_name_or_path: recorded as HF does (e.g. the hub id of the base model).
      target_modules: overrides the written ``target_modules``; it must select every exported module. By default
        the short module names (``["q_proj", "v_proj"]``) when they select exactly the adapted modules of
        ``params``, else the full module names.
      ensure_weight_tying: LoRA/DoRA: HF's flag that makes an embedding adapter also act on a tied output head, as
        ``jaxpeft.linen`` does (through ``nn.Embed.attend``). LoRA: by default written as True when an embedding
        is adapted (PEFT then only warns if the model turns out untied). DoRA: PEFT's tied head would get a DoRA
        of its own, which differs from jaxpeft's, so a DoRA embedding is exported only with ``False`` (the model's
        head is not tied).
      tied_head: LoRA: the HF module name of an output head tied to the adapted embedding (e.g. ``"lm_head"``):
        its copy of the embedding adapter is written too, as PEFT does with ``ensure_weight_tying``.
      modules_to_save: whole modules trained beside the adapters (a classifier head, norms), as PEFT's
        ``modules_to_save``: ``{HF module name: the module's parameter tree}``, e.g.
        ``{"classifier": {"kernel": [in, out], "bias": [out]}}``. The tree may live outside ``params`` (a head on
        top of the base model) or replace a module of ``params`` (``params["classifier"]`` retrained). Flax leaves
        become torch parameters: a 2-D ``kernel`` is ``weight`` transposed, ``embedding`` and ``scale`` are
        ``weight``, ``bias`` is ``bias``, a leaf named ``weight`` is taken in torch layout; nested dicts are
        submodules (``{"dense": {...}}`` -> ``<name>.dense.weight``). Written as
        ``base_model.model.<name>.<param>`` with ``"modules_to_save": [<name>, ...]`` in the config, as PEFT's
        ``save_pretrained`` does. When ``params`` hold that module, the tree must give exactly its parameters and
        shapes (PEFT loads the whole module).
      parameter_order: LoRA: the HF parameter names of a module in the order the torch module registers them (e.g.
        ``("gate_up_proj", "down_proj")`` for transformers' MoE experts). Needed when LoRA adapts several bare
        parameters of one HF module (PEFT's ``target_parameters``, below): PEFT nests one ``ParamWrapper`` per
        parameter in that order, which decides each one's tensor keys.

    Expert weights (PEFT ``target_parameters``): a LoRA adapter whose weight has one stack axis more than its
    ``{layer}`` template (an einsum kernel ``(experts, in, out)`` such as ``examples/models/moe.py``'s) is written for
    HF's 3-D parameter ``(experts, out, in)`` that ``module_name`` names (``"model.layers.{layer}.mlp.experts.
    gate_up_proj"``: the parameter, not its module): ``lora_A.weight`` ``[r * experts, in]`` (expert-major rows) and
    ``lora_B.weight`` ``[out, r * experts]`` (rank-major columns), on the module, one ``.base_layer`` deeper per
    parameter registered after it, and ``target_parameters`` in the config; exactly PEFT 0.21.2's ``ParamWrapper``.
    PEFT refuses DoRA and ``lora_dropout`` there, so those are refused here too.

    Returns:
      ``(config_dict, {key: numpy array})``.

    Raises:
      TypeError: ``cfg`` is not one of the supported configs; ``module_name`` returned a non-string; an option of
        the wrong type.
      ValueError: the adapters do not fit ``params`` or ``cfg``; a feature HF would run differently (refused,
        never exported wrongly); a stack of more than one axis; two parameters map to one HF module; a
        ``module_name`` result that is not a torch module path (only letters, digits and underscores joined by
        single dots: no ``..``, ``/``, spaces or empty parts). For ``modules_to_save``: a leaf jaxpeft does not
        convert; an adapted module inside (or named like) a module to save (PEFT would drop its adapter); another
        module of ``params`` that PEFT's suffix rule (or ``task_type`` ``SEQ_CLS``/``TOKEN_CLS``/``QUESTION_ANS``)
        would also wrap, which would make its loader fail. A base-adjusting init (PiSSA/OLoRA): convert first.
    """
    codec = _codec_of(cfg)
    if cfg.adjusts_base:
        raise ValueError(
            f"`cfg` has {cfg.base_adjustment}: its adapters are the identity only over the residual base weights, "
            "which an HF adapter file cannot carry. Convert them first: `plain_cfg, plain = "
            "jaxpeft.to_plain_lora(cfg, trained, initial)` gives rank-2r LoRA adapters over the original weights "
            "(PEFT's path_initial_model_for_weight_conversion); export `plain` with `plain_cfg` and the original "
            "params."
        )
    for name, value in (("task_type", task_type), ("base_model_name_or_path", base_model_name_or_path)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"`{name}`={value!r}; expected a string or None.")
    given = {"ensure_weight_tying": ensure_weight_tying, "tied_head": tied_head, "parameter_order": parameter_order}
    options = {k: v for k, v in given.items() if v is not None}
    foreign = sorted(set(options) - set(codec.options))
    if not codec.modules:
        unused = {"module_name": None, "layouts": layouts, "target_modules": target_modules}
        foreign += sorted(k for k, v in {**unused, "modules_to_save": modules_to_save}.items() if v is not None)
    if foreign:
        raise ValueError(
            f"{foreign} do not apply to {type(cfg).__name__} adapters (PEFT's {codec.peft_type}"
            + (f", whose options are {list(codec.options)}" if codec.options else "")
            + "); leave them None."
        )
    fn = as_fn(module_name) if codec.modules else None
    if _global(adapters):  # global arrays of a multi-process job: every process gathers them (a collective)
        adapters = multihost_utils.process_allgather(adapters, tiled=True)
    if _global(modules_to_save):
        modules_to_save = multihost_utils.process_allgather(modules_to_save, tiled=True)
    request = Export(adapters, cfg, params, fn, layouts, target_modules, options)
    config, tensors = codec.to_hf(request)
    saved: dict[str, np.ndarray] = {}
    names: list[str] = []
    if codec.modules:
        assert fn is not None
        universe = _saved.module_universe(params, fn)
        names, saved = _saved.to_hf(modules_to_save or {}, tensors, universe, task_type, _parts())
    config.update(base_model_name_or_path=base_model_name_or_path, task_type=task_type, modules_to_save=names or None)
    # C-contiguous host arrays: safetensors writes an array's buffer as it lies in memory, so a codec's transposed
    # view would otherwise be written in the wrong order
    out = {k: np.ascontiguousarray(np.asarray(v)) for k, v in {**tensors, **saved}.items()}
    return dict(sorted(config.items())), out


def _parts() -> frozenset[str]:
    """The key components of every known method's tensors (no saved module may hold one)."""
    parts: set[str] = {"base_layer"}
    for codec in codecs():
        parts |= codec.tensor_parts
    return frozenset(parts)


def export_adapters(
    directory: str | os.PathLike[str],
    adapters: Any,
    cfg: MethodConfig,
    params: Any,
    module_name: ModuleName,
    **kwargs: Any,
) -> str:
    """Write ``adapters`` as a HF PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``). Keyword
    arguments are those of :func:`to_state_dict`.

    Guarantees: every argument error (a bad ``module_name`` result, pattern, ``tied_head``, an adapter HF cannot
    run) is raised before anything is written. The pair changes together or not at all: a new directory appears
    with both files (a staging directory renamed into place); in an existing one the old config is moved out
    first, the tensors swapped and the new config moved in last, and an error on the way puts the old pair back.
    A process killed half-way leaves the directory without ``adapter_config.json`` (loaders refuse it, naming the
    cause; never the old config with the new tensors) and both pairs in ``<directory>/.jaxpeft-export/``;
    exporting again completes it. Other files in the directory (README.md, ...) are never touched. A second
    export into the same directory while one runs is refused (a lock the kernel releases if its owner dies).

    In a multi-process job (``jax.distributed``) whose adapters are global arrays spread over several processes'
    devices, call this on every process: each gathers the adapters (a collective), process 0 writes, and every
    process returns once the files are there (the others raise ``OSError`` if process 0's write failed). Adapters
    that each process holds whole are written by whichever process calls (call it on process 0 only).

    Returns:
      The absolute directory path.

    Raises:
      ValueError, TypeError: as :func:`to_state_dict`; the target is a file; another export into it is running.
      OSError: the file system refused a write (the previous pair is kept).
    """
    global_arrays = _global(adapters) or _global(kwargs.get("modules_to_save"))
    if not global_arrays:
        config, tensors = to_state_dict(adapters, cfg, params, module_name, **kwargs)
        return write_directory(directory, config, tensors)
    # a multi-process job: every process gathers (a collective, in to_state_dict), process 0 writes, the others wait
    config, tensors = to_state_dict(adapters, cfg, params, module_name, **kwargs)
    failure = ""
    if jax.process_index() == 0:
        try:
            written = write_directory(directory, config, tensors)
        except Exception as err:  # told to the other processes, then raised here
            failure = f"{type(err).__name__}: {err}"
            raise
        finally:
            _agree_on(failure, directory)
        return written
    _agree_on(failure, directory)
    return os.path.abspath(os.fspath(directory))


def _global(tree: Any) -> bool:
    """Whether ``tree`` holds a ``jax.Array`` spread over devices of other processes (a multi-process job)."""
    return any(
        isinstance(x, jax.Array) and not x.is_fully_addressable
        for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.Array))
    )


def _agree_on(failure: str, directory: Any) -> None:
    """Every process waits for process 0's write; processes other than 0 raise if it failed."""
    flag = multihost_utils.process_allgather(np.asarray([1 if failure else 0], np.int32))
    if int(np.max(flag)) and jax.process_index() != 0:
        raise OSError(
            f"process 0 could not write the PEFT export into {os.fspath(directory)!r} (its traceback says why); "
            "nothing was changed there."
        )


@overload
def from_state_dict(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    module_name: ModuleName,
    *,
    modules_to_save: None = None,
    layouts: Mapping[str, Layout] | None = None,
    dtype: Any = None,
    base_weights: str = "check",
    configs: Sequence[type[MethodConfig]] = (),
    tie_word_embeddings: bool | None = None,
    parameter_order: Sequence[str] | None = None,
) -> tuple[MethodConfig, dict[str, Any]]: ...


@overload
def from_state_dict(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    module_name: ModuleName,
    *,
    modules_to_save: Mapping[str, Any],
    layouts: Mapping[str, Layout] | None = None,
    dtype: Any = None,
    base_weights: str = "check",
    configs: Sequence[type[MethodConfig]] = (),
    tie_word_embeddings: bool | None = None,
    parameter_order: Sequence[str] | None = None,
) -> tuple[MethodConfig, dict[str, Any], dict[str, Any]]: ...


def from_state_dict(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    module_name: ModuleName,
    *,
    modules_to_save: Mapping[str, Any] | None = None,
    layouts: Mapping[str, Layout] | None = None,
    dtype: Any = None,
    base_weights: str = "check",
    configs: Sequence[type[MethodConfig]] = (),
    tie_word_embeddings: bool | None = None,
    parameter_order: Sequence[str] | None = None,
) -> tuple[MethodConfig, dict[str, Any]] | tuple[MethodConfig, dict[str, Any], dict[str, Any]]:
    """A config and adapter tree from HF PEFT adapter config contents and tensors.

    The file goes to the first codec that reads its ``peft_type`` and accepts it: the codecs of ``configs`` (a
    method of your own; LoRA-FA's config to read a plain LoRA file as LoRA-FA), then the registry's
    (``"LORA"`` gives LoRA, or DoRA with ``use_dora``; ``"VERA"`` keeps projections that are not jaxpeft's as frozen
    arrays; LoHa/LoKr refuse ``rank_dropout``, ``module_dropout`` and CP convolutions; ``"LN_TUNING"`` files hold
    the tuned norms, so the deltas are ``saved - params``, which needs concrete params, and every parameter of each
    norm in the file is trained, as in PEFT). The returned config targets exactly the imported
    parameters (an anchored regex of their paths; LoRA, LoHa and LoKr ranks and alphas per module as
    ``rank_pattern``/``alpha_pattern``; IA3's feed-forward modules as ``feedforward``), so
    ``jaxpeft.plan(cfg, params, layouts=...)`` reproduces the adapter shapes and
    ``jaxpeft.checkpoint`` can save them. HF modules of a ``{layer}`` template are stacked along the leading axis;
    every layer must be present.

    Tied embeddings (a model whose output head is its word-embedding table, ``nn.Embed.attend``; HF's
    ``tie_word_embeddings``): ``jaxpeft.linen`` applies an embedding's adapter to the lookup and to that head. PEFT
    does the same only with ``ensure_weight_tying``: then the tied head's copy of a LoRA embedding adapter is dropped
    when ``params`` have no such head (a DoRA one is refused: PEFT's tied head has a magnitude of its own). Without
    it (PEFT's default) PEFT adapts the lookup alone and the head keeps the original table, so an adapter (or a
    ``modules_to_save`` copy) of the word embedding is refused for a tied model, naming the fix: load the model
    with an untied head (its own copy of the table, e.g. ``examples/models/llama.py``'s
    ``load_hf_checkpoint(..., untie_embeddings=True)``) and import into those params, which is then exact.

    Args:
      config: the parsed ``adapter_config.json``.
      tensors: ``{key: array}`` from ``adapter_model.safetensors``.
      params: the base params (arrays or ``jax.ShapeDtypeStruct``; concrete arrays for ``LN_TUNING``).
      module_name: our module path -> HF module name, as for :func:`to_state_dict` (unused for prompt learning).
      modules_to_save: ``{HF module name: a tree like the saved module}`` (arrays or ``jax.ShapeDtypeStruct``, in
        the Flax naming of :func:`to_state_dict`'s ``modules_to_save``) for a file with PEFT ``modules_to_save``;
        then a third item returns those modules as trees of that structure, shapes and dtypes. It must name
        exactly the modules the file saves. Without it such a file is refused, naming the modules.
      layouts: kernel layouts; only needed for kernels with several fan-in or fan-out axes.
      dtype: adapter dtype; by default the file's (float32 for HF-trained adapters).
      base_weights: for the base embedding copy HF saves when it adapts an embedding
        (``...base_layer.weight``): ``"check"`` that it equals ``params`` (needs concrete params), or
        ``"ignore"`` it.
      configs: config classes whose codecs are tried before the built-in ones.
      tie_word_embeddings: whether the model computes its logits with its word-embedding table (HF's config field;
        ``LlamaConfig.tie_word_embeddings``). None infers it: tied when the file's ``task_type`` is ``CAUSAL_LM`` or
        ``SEQ_2_SEQ_LM`` and no parameter but the table (the largest ``embedding``) spans the vocabulary. Only
        read when the file touches that table without ``ensure_weight_tying`` (see above).
      parameter_order: LoRA with ``target_parameters``: the HF parameter names of a module in registration order
        (see :func:`to_state_dict`); needed only when several parameters of one module are adapted and their
        factor shapes do not tell which nesting level is which.

    Returns:
      ``(cfg, adapters)``, or ``(cfg, adapters, {module: tree})`` when ``modules_to_save`` is given.

    Exactly the modules PEFT's ``from_pretrained`` adapts are imported, by PEFT's own rules
    (``target_modules``: a string full-matches, a list matches by ``.name`` suffix; ``exclude_modules`` likewise;
    ``layers_to_transform`` with ``layers_pattern``). Tensors for a module the config does not select are refused
    (PEFT drops them silently). A selected module of ``params`` with no tensors is left unadapted when PEFT would
    give it an identity adapter (``init_lora_weights`` true/"gaussian"/"eva"/"mica", ``init_ia3_weights`` true),
    and refused otherwise. Every field of PEFT 0.21.2's config class is supported, harmless or refused by name when
    set (the codec's ``FieldTable``); a field PEFT does not have is ignored when unset
    (null/false/empty) and refused otherwise. Values are checked: ranks whole and positive (never rounded), alphas
    finite and positive, booleans JSON booleans (PEFT reads ``"false"`` as true), regexes valid; tensors finite
    float16/bfloat16/float32/float64 arrays. Saved modules follow PEFT's rules too: every module of ``params``
    that a ``modules_to_save`` entry (or the ``task_type``'s ``classifier``/``score``/``qa_outputs``) selects by
    name suffix must have its tensors in the file, and no adapter tensor may lie inside a saved module.

    Raises:
      ValueError: a HF method or feature jaxpeft cannot represent (LoRA bias, forward-changing variants, ...);
        an untied PEFT embedding adapter for a tied model (above);
        saved modules without ``modules_to_save``, or ones that do not fit it; a config and tensors that
        disagree (selection, ranks, shapes, missing layers of a stacked module); a bad value (the message names
        the field or tensor, the value, what was expected and the fix).
      TypeError: ``config`` or ``tensors`` of the wrong Python type, ``tie_word_embeddings`` not a bool or None.
    """
    if tie_word_embeddings is not None and not isinstance(tie_word_embeddings, bool):
        raise TypeError(f"`tie_word_embeddings`={tie_word_embeddings!r}; expected True, False or None.")
    if not isinstance(config, Mapping):
        raise TypeError(f"`config` is a {type(config).__name__}; expected the parsed {CONFIG_NAME} (a dict).")
    if base_weights not in ("check", "ignore"):
        raise ValueError(f"`base_weights`={base_weights!r}; expected 'check' or 'ignore'.")
    codec = _import_codec(config, configs)
    options = {} if parameter_order is None else {"parameter_order": parameter_order}
    if options and "parameter_order" not in codec.options:
        raise ValueError(f"`parameter_order` does not apply to {codec.peft_type} adapters; leave it None.")
    if codec.modules:  # saved modules are read here, not by the codec (whose table refuses them)
        check_fields({k: v for k, v in config.items() if k != "modules_to_save"}, codec)
        config = dict(config)
    else:
        config = check_fields(config, codec)
    checked = check_tensors(tensors)
    if not codec.modules:
        if modules_to_save is not None:
            raise ValueError(f"`modules_to_save` is not supported for {codec.peft_type} adapters; pass None.")
        request = Import(config, checked, params, None, layouts, dtype, base_weights, options)
        return codec.from_hf(request)
    fn = as_fn(module_name)
    entries = _saved.read_entries(config)
    shared = {k: checked.pop(k) for k in codec.shared_keys if k in checked}
    groups, rest = _saved.split(entries, checked, _parts())
    saved = _saved.from_hf(groups, entries, modules_to_save, _saved.module_universe(params, fn))
    request = Import(
        {**config, "modules_to_save": None}, {**rest, **shared}, params, fn, layouts, dtype, base_weights, options
    )
    cfg, adapters = codec.from_hf(request)
    adapted = [path for path, _ in adapter_items(adapters)]
    check_tied_head(config, adapted, entries, params, fn, tie_word_embeddings)
    return (cfg, adapters) if modules_to_save is None else (cfg, adapters, saved)


@overload
def import_adapters(
    directory: str | os.PathLike[str],
    params: Any,
    module_name: ModuleName,
    *,
    modules_to_save: None = None,
    **kwargs: Any,
) -> tuple[MethodConfig, dict[str, Any]]: ...


@overload
def import_adapters(
    directory: str | os.PathLike[str],
    params: Any,
    module_name: ModuleName,
    *,
    modules_to_save: Mapping[str, Any],
    **kwargs: Any,
) -> tuple[MethodConfig, dict[str, Any], dict[str, Any]]: ...


def import_adapters(
    directory: str | os.PathLike[str],
    params: Any,
    module_name: ModuleName,
    *,
    modules_to_save: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[MethodConfig, dict[str, Any]] | tuple[MethodConfig, dict[str, Any], dict[str, Any]]:
    """Read a HF PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keyword arguments are those of :func:`from_state_dict`. Legacy ``adapter_model.bin`` files (pickle) are
    refused: convert them with PEFT (``save_pretrained(..., safe_serialization=True)``) first. Both files are
    checked before use: a truncated or invalid JSON config, one that is not an object, a truncated or corrupt
    safetensors file, non-float tensors, each give a ``ValueError`` naming the file; bfloat16 tensors are read.

    Returns:
      ``(cfg, adapters)``; run them with ``jaxpeft.linen.apply(model, {"params": params}, adapters, ...)``. With
      ``modules_to_save``, a third item: the saved modules (see :func:`from_state_dict`).

    Raises:
      FileNotFoundError: no such directory, or a file missing (the message says when an interrupted jaxpeft export
        is the cause, and how to recover).
      ValueError, TypeError: a damaged file, or as :func:`from_state_dict`.
    """
    config, tensors = read_directory(directory)
    if modules_to_save is None:
        return from_state_dict(config, tensors, params, module_name, **kwargs)
    return from_state_dict(config, tensors, params, module_name, modules_to_save=modules_to_save, **kwargs)
