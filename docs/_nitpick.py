"""Type-annotation targets the API reference cannot link (imported by ``conf.py``; the build runs with ``-n``).

The build is offline (no intersphinx inventories), so annotations naming JAX, NumPy, Flax, optax or standard-library
types have no target, and neither do private jaxpeft helpers that appear in signatures and base-class lists. Every
other reference must resolve.
"""

nitpick_ignore_regex = [
    # JAX's own types as annotations spell them (``jax.Array`` is ``jax.jaxlib._jax.Array`` at run time).
    ("py:class", r"jax(lib)?\..*"),
    ("py:class", r"numpy\..*"),
    ("py:class", r"flax\..*"),
    ("py:class", r"optax\..*"),
    ("py:class", r"collections\.abc\..*"),
    ("py:class", r"os\.PathLike"),
    # Private jaxpeft helpers named by annotations or base-class lists (``_factors.LowRankConfig``,
    # ``_partition.PathFilter``, ``nnx._NodeSlot``, ``hf._config.Selection``) and the TypeVar of ``jaxpeft.nnx``.
    ("py:class", r"jaxpeft\.(\w+\.)*_\w+(\.\w+)*"),
    ("py:class", r"jaxpeft\.nnx\.M"),
]
