"""Building blocks for a method's HF PEFT codec: the codec types and the loops every module-adapting method shares.

A codec is a :class:`.PeftCodec` of two pure functions over :class:`.Export`/:class:`.Import` requests; the generic
work (argument and tensor checks, the field table, ``modules_to_save``, files) is done by ``jaxpeft.hf`` before and
after. A method whose tensors live on HF modules writes with :func:`write_modules` (one ``{key suffix: array}``
per HF module and layer) and reads with :func:`read_groups` (the file's modules, checked against PEFT's selection
and grouped per parameter, re-stacking ``{layer}`` templates), then :func:`build_adapters` (the nodes of the config
over the params, with the file's arrays). The built-in methods' codecs are written with these blocks alone;
``tests/_hra.py`` is a complete example of a method of one's own: HRA's codec in ~40 lines.
"""

from jaxpeft.hf._codec import Export, FieldTable, Import, PeftCodec
from jaxpeft.hf._common import (
    LAYER,
    PREFIX,
    Group,
    Target,
    adapter_dtype,
    build_adapters,
    check_rank_scale,
    conv_vector,
    exact_paths,
    group_rank_alpha,
    import_layout,
    module_of,
    per_path_args,
    read_groups,
    split_keys,
    target_modules,
    target_modules_for,
    template,
    write_modules,
)
from jaxpeft.hf._config import (
    CONFIG_NAME,
    FAN_IN_FAN_OUT,
    HARMLESS_COMMON,
    REFUSED_SAVED,
    bool_field,
    check_bias_none,
    check_selection,
    fail,
    is_int,
    is_number,
    listed,
    names_value,
    rank_value,
    rate_value,
    read_selection,
    show,
)

__all__ = [
    "CONFIG_NAME",
    "FAN_IN_FAN_OUT",
    "HARMLESS_COMMON",
    "LAYER",
    "PREFIX",
    "REFUSED_SAVED",
    "Export",
    "FieldTable",
    "Group",
    "Import",
    "PeftCodec",
    "Target",
    "adapter_dtype",
    "bool_field",
    "build_adapters",
    "check_bias_none",
    "check_rank_scale",
    "check_selection",
    "conv_vector",
    "exact_paths",
    "fail",
    "group_rank_alpha",
    "import_layout",
    "is_int",
    "is_number",
    "listed",
    "module_of",
    "names_value",
    "per_path_args",
    "rank_value",
    "rate_value",
    "read_groups",
    "read_selection",
    "show",
    "split_keys",
    "target_modules",
    "target_modules_for",
    "template",
    "write_modules",
]
