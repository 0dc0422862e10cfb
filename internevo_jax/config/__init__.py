"""The config: one schema with every InternEvo section and default, file loading (both styles), overrides, checks.

A config file is either InternEvo-style (module-level ``model = dict(...)``, ``data = dict(...)``, upper-case helper
variables such as ``SEQ_LEN``, base files imported ``with read_base():`` from ``configs._base_``) or
ml_collections-style (a ``get_config()`` returning a dict/ConfigDict). Both are merged onto ``default_config()``, then
``--config.a.b=v`` overrides are applied, derived defaults are filled in, and the checks of each section run. The
result is one locked ``ml_collections.ConfigDict``.

The package is a leaf: it imports nothing else from ``internevo_jax`` (tests/test_structure.py holds it to that), so
every other module may import it. Its modules, in the order a load uses them:

- ``schema``: the table of sections and leaves (default, type, range, derived source) and the fixed choices;
- ``files``: executing a config file of either style (``read_base``, the ``configs._base_`` imports);
- ``merge``: merging file values and ``--config.`` overrides onto the defaults, paths and types checked;
- ``checks`` (``ckpt_keys``, ``unsupported``): the cross-field checks of each section and the derived values;
- ``load``: ``load``/``build`` tying these together, and ``to_json``;
- ``errors``, ``parsers``, ``redaction``: ``ConfigError``, parsers of string-valued keys, secrets masking.
"""

from internevo_jax.config.checks import check_pipeline
from internevo_jax.config.errors import ConfigError
from internevo_jax.config.files import (
    base_roots,
    read_base,
    read_config_file,
    resolve_config_path,
    shipped_config_names,
    shipped_configs,
)
from internevo_jax.config.load import build, load, to_json
from internevo_jax.config.merge import BareFlag, parse_override
from internevo_jax.config.parsers import batch_skipper, local_path, parse_rampup, parse_skip_batches
from internevo_jax.config.schema import (
    ATTN_IMPLS,
    CKPT_CONTENTS,
    CKPT_TYPES,
    DATA_TYPES,
    DTYPES,
    INF,
    MODEL_TYPES,
    REMAT_POLICIES,
    TENSOR_MODES,
    default_config,
    ffn_width,
    is_moe_model_type,
    jax_dtype_name,
)

__all__ = [
    "ATTN_IMPLS",
    "CKPT_CONTENTS",
    "CKPT_TYPES",
    "DATA_TYPES",
    "DTYPES",
    "INF",
    "MODEL_TYPES",
    "REMAT_POLICIES",
    "TENSOR_MODES",
    "BareFlag",
    "ConfigError",
    "base_roots",
    "batch_skipper",
    "build",
    "check_pipeline",
    "default_config",
    "ffn_width",
    "is_moe_model_type",
    "jax_dtype_name",
    "load",
    "local_path",
    "parse_override",
    "parse_rampup",
    "parse_skip_batches",
    "read_base",
    "read_config_file",
    "resolve_config_path",
    "shipped_config_names",
    "shipped_configs",
    "to_json",
]
