"""Malformed Hugging Face folders: config.json errors name the file and key; tensor shapes are checked from the
safetensors headers before anything compiles."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from internevo_jax.checkpoint.plan import plan_load
from internevo_jax.config import ffn_width
from internevo_jax.convert import hf_folder, hf_layout
from internevo_jax.convert.safetensors_io import SafetensorsFile, header
from internevo_jax.errors import CheckpointError, CheckpointMismatch
from internevo_jax.model import build_model


def save_tiny_hf(cfg, path):
    model = build_model(cfg.model_type, cfg.model, nnx.Rngs(0))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    return hf_layout.save_hf(params, cfg.model, path, dtype="float32")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: "{not json", "not readable JSON"),
        (lambda c: [c], "holds a list, not a JSON object"),
        (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "key 'hidden_size' is missing"),
        (lambda c: c | {"num_attention_heads": "4"}, "key 'num_attention_heads' is '4'; a positive number"),
        (lambda c: c | {"num_hidden_layers": 0}, "key 'num_hidden_layers' is 0"),
        (lambda c: c | {"rms_norm_eps": [1]}, r"key 'rms_norm_eps' is \[1\]"),
        (lambda c: c | {"architectures": "LlamaForCausalLM"}, "key 'architectures' is 'LlamaForCausalLM'"),
    ],
)
def test_malformed_config_json_names_the_file_and_key(tiny_config, tmp_path, edit, message):
    folder = save_tiny_hf(tiny_config("model_type='LLAMA2'"), tmp_path / "hf")
    path = folder / "config.json"
    edited = edit(json.loads(path.read_text()))
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(CheckpointError, match=f"{path}: {message}"):
        hf_folder.HFFolder(folder)


def test_tensor_shapes_are_checked_before_compiling(tiny_config, tmp_path):
    cfg = tiny_config("model_type='LLAMA2'")
    folder = save_tiny_hf(cfg, tmp_path / "hf")
    # Same bytes, transposed shape: config.json still agrees, only the header tells.
    (file,) = folder.glob("*.safetensors")
    st = SafetensorsFile(file)
    name = "model.layers.1.mlp.gate_proj.weight"
    tensors = [(n, st.read(n)) for n in st.keys()]
    entries = [(n, a.shape[::-1] if n == name else a.shape, a.dtype) for n, a in tensors]
    file.write_bytes(header(entries) + b"".join(a.tobytes() for _, a in tensors))
    cfg = tiny_config(
        "model_type='LLAMA2'", f"ckpt.load_ckpt_info=dict(path='{folder}', content=('model',), ckpt_type='hf')"
    )
    f = ffn_width(cfg.model.hidden_size, cfg.model.mlp_ratio, cfg.model.multiple_of)
    d = cfg.model.hidden_size
    want = rf"{name}: \({d}, {f}\) in the checkpoint, the config expects \({f}, {d}\)"
    with pytest.raises(CheckpointMismatch, match=want):
        plan_load(cfg, {}, "test")
