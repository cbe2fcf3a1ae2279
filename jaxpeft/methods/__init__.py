"""The built-in PEFT methods, one file each (config, node and PEFT codec), behind the protocol of ``jaxpeft.protocol``.

``registry.BUILTIN`` is the one list of them; ``_factors`` holds what several share. The public names are exported
by ``jaxpeft`` itself (``jaxpeft.LoraConfig``, ...).
"""

from jaxpeft.methods.registry import BUILTIN

#: Deprecated alias of ``jaxpeft.methods.registry.BUILTIN``.
BUILTIN_CONFIGS = BUILTIN

__all__ = ["BUILTIN", "BUILTIN_CONFIGS"]


def __getattr__(name: str):  # deprecated: 0.2 re-exported the public names here (``jaxpeft.methods.LoraConfig``)
    import jaxpeft

    if name in jaxpeft.__all__:
        return getattr(jaxpeft, name)
    raise AttributeError(f"module 'jaxpeft.methods' has no attribute {name!r}")
