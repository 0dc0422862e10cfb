"""Generation with a KV cache: InternEvo's ``generation`` section (G-01..G-06) on one jitted prefill + decode loop.

A batch of prompts is laid out right-padded, each row at its own positions (slot s of a row holds its token at
position s), so no row ever sees padding or another row's length and a prompt's tokens do not depend on its batch
neighbours (TS-15). One ``jax.jit`` runs the prefill (one forward over the prompts, filling ``model.KVCache``) and
a ``lax.while_loop`` of single-token steps over fixed-size buffers of ``max_length`` slots, so nothing recompiles per
token; a new executable is built only per prompt-length bucket (powers of two, at most ``max_length``).

Per step and row (G-05): repetition penalty (CTRL: a logit of a token already in the row, prompt included, is
multiplied by p when negative, else divided by p); length penalty (every logit except the EOS ids divided by
``cur_len ** length_penalty``, cur_len = the row's length so far: for greedy decoding it only moves non-EOS tokens
against EOS; for sampling it also acts as a temperature on the non-EOS tokens); then greedy argmax, or for sampling
``/ temperature``, ``top_k_top_p_filter`` (``min_tokens_to_keep=2``) and a draw. A row stops after an EOS id
(``eos_id`` + ``additional_eos_token_list``; the EOS is reported) or when prompt + generated reach ``max_length``.

Where we differ from InternEvo (quirk 5.14), each choice keeping a prompt's result independent of its batch:
the first token follows the same rule as the others (InternEvo always takes it greedily with EOS banned, so
``do_sample=True`` never varied it, and skips both penalties for it); ``max_length`` counts each row's own prompt
(InternEvo counts the left-padded one, so short prompts got fewer tokens); the penalties see the row's own tokens
(InternEvo's saw the BOS padding); the last token is not forced to ``eos_id[0]`` at ``max_length``; sampling draws
from the filtered softmax itself (InternEvo added 1e-12 to every probability, so filtered tokens kept a ~1e-12
chance). Sampling is deterministic: row keys derive from ``seed`` and the prompt's index, not its batch slot.

Dynamic NTK (``model.use_dynamic_ntk_rope``, M-08): the base of a row is computed for its length so far at every
step; the new token's query and key are rotated with it while the cached keys keep the rotation they were written
with, which is what Hugging Face's dynamic rope does with its KV cache (and InternEvo's inference path).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from internevo_jax import config as config_lib
from internevo_jax.errors import CheckpointError, PromptError
from internevo_jax.model import Decoder, build_model, logits


@dataclasses.dataclass(frozen=True)
class Settings:
    """The decoding rule, from the ``generation`` section; static (part of the compiled program)."""

    max_length: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    length_penalty: float
    eos_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def from_config(cls, gen: ml_collections.ConfigDict) -> Settings:
        return cls(
            max_length=gen.max_length,
            do_sample=gen.do_sample,
            temperature=float(gen.temperature),
            top_k=gen.top_k,
            top_p=float(gen.top_p),
            repetition_penalty=float(gen.repetition_penalty),
            length_penalty=float(gen.length_penalty),
            eos_ids=eos_ids(gen),
            pad_id=gen.bos_id,  # InternEvo pads with the BOS id (G-03); only finished rows' slots hold it
        )


def eos_ids(gen: ml_collections.ConfigDict) -> tuple[int, ...]:
    """``eos_id`` (an id or a list) followed by ``additional_eos_token_list``, duplicates dropped (G-06)."""
    ids: list[int] = []
    for value in (gen.eos_id, gen.additional_eos_token_list):
        ids += [] if value is None else [value] if isinstance(value, int) else list(value)
    return tuple(dict.fromkeys(ids))


# ---------------------------------------------------------------------------------------------------------------------
# Logit processing (G-05). logits: [B, V] fp32.


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL's penalty on the tokens ``seen`` [B, V] (bool): negative logits times ``penalty``, others divided."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def apply_length_penalty(logits: jax.Array, cur_len: jax.Array, penalty: float, eos: Sequence[int]) -> jax.Array:
    """Every logit except the EOS columns divided by ``cur_len ** penalty`` (cur_len [B]: the row's length so far)."""
    is_eos = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(eos, jnp.int32)].set(True)
    scaled = logits / (cur_len.astype(jnp.float32)[:, None] ** penalty)
    return jnp.where(is_eos, logits, scaled)


def top_k_top_p_filter(logits: jax.Array, top_k: int, top_p: float, min_tokens_to_keep: int = 2) -> jax.Array:
    """InternEvo's ``top_k_top_p_filtering`` (the Hugging Face algorithm it copies): removed logits become -inf.

    top-k keeps every logit >= the k-th largest (ties included), k = ``min(max(top_k, min_tokens_to_keep), V)``;
    top-p sorts descending, marks tokens whose cumulative softmax exceeds ``top_p``, unmarks the first
    ``min_tokens_to_keep``, then shifts the marks right by one so the first token past ``top_p`` is kept: at least
    ``min_tokens_to_keep + 1`` tokens survive top-p, as in InternEvo's code.
    """
    v = logits.shape[-1]
    if top_k > 0:
        k = min(max(top_k, min_tokens_to_keep), v)
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
        remove = cumulative > top_p
        if min_tokens_to_keep > 1:
            remove = remove.at[..., :min_tokens_to_keep].set(False)
        remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = jnp.where(jnp.zeros_like(remove).at[rows, order].set(remove), -jnp.inf, logits)
    return logits


def next_tokens(
    logits: jax.Array, seen: jax.Array | None, cur_len: jax.Array, keys: jax.Array, s: Settings
) -> jax.Array:
    """One token per row [B] from ``logits`` [B, V] by the rule of ``s`` (``keys``: one PRNG key per row)."""
    if s.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("next_tokens: repetition_penalty needs ``seen``, the [B, V] marks of the tokens so far")
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.length_penalty != 1.0 and s.eos_ids:
        logits = apply_length_penalty(logits, cur_len, s.length_penalty, s.eos_ids)
    if not s.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if s.temperature != 1.0:
        logits = logits / s.temperature
    logits = top_k_top_p_filter(logits, s.top_k, s.top_p, min_tokens_to_keep=2)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------------
# The jitted program


def _generate(
    graphdef: nnx.GraphDef,
    s: Settings,
    state: nnx.State,
    tokens: jax.Array,
    lengths: jax.Array,
    active: jax.Array,
    keys: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """tokens [B, P] (row b's prompt in ``[0, lengths[b])``), active [B] (False: a filler row), keys [B].

    Returns (generated [B, max_length] with ``pad_id`` past each row's count, count [B]).
    """
    model = nnx.merge(graphdef, state)
    b, p = tokens.shape
    rows = jnp.arange(b)
    eos = jnp.asarray(s.eos_ids or (-1,), jnp.int32)
    with model.matmul_precision():
        head = model.head_weight()
        real = jnp.arange(p) < lengths[:, None]
        positions = jnp.where(real, jnp.arange(p), 0)  # padding at 0: a row's max position is its own (dynamic NTK)
        cache = model.init_cache(b, s.max_length)
        hidden, cache = model.decode(tokens, positions, real.astype(jnp.int32), cache)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
        first = logits(last, head)[:, 0]
        seen = None
        if s.repetition_penalty != 1.0:
            ids = jnp.where(real, tokens, first.shape[-1])  # padding -> out of range, dropped
            seen = jnp.zeros(first.shape, bool).at[rows[:, None], ids].set(True, mode="drop")

        def pick(j, lg, seen, done, out, count):
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, j)
            tok = jnp.where(done, s.pad_id, next_tokens(lg, seen, lengths + j, step_keys, s))
            out = out.at[:, j].set(tok)
            count = count + (~done).astype(jnp.int32)
            if seen is not None:
                seen = seen.at[rows, jnp.where(done, lg.shape[-1], tok)].set(True, mode="drop")
            done = done | jnp.any(tok[:, None] == eos, axis=-1) | (lengths + j + 1 >= s.max_length)
            return tok, seen, done, out, count

        out = jnp.full((b, s.max_length), s.pad_id, jnp.int32)
        tok, seen, done, out, count = pick(0, first, seen, ~active, out, jnp.zeros((b,), jnp.int32))

        def cond(c):
            j, _, _, _, done, _, _ = c
            return (j < s.max_length) & ~jnp.all(done)

        def body(c):
            j, tok, cache, seen, done, out, count = c
            slot = jnp.minimum(lengths + j - 1, s.max_length - 1)  # finished rows idle at their last slot
            h, cache = model.decode(
                tok[:, None], slot[:, None], jnp.ones((b, 1), jnp.int32), cache._replace(start=slot)
            )
            tok, seen, done, out, count = pick(j, logits(h, head)[:, 0], seen, done, out, count)
            return j + 1, tok, cache, seen, done, out, count

        carry = (jnp.asarray(1, jnp.int32), tok, cache._replace(start=lengths), seen, done, out, count)
        *_, out, count = jax.lax.while_loop(cond, body, carry)
    return out, count


@dataclasses.dataclass
class Output:
    """One prompt's result: the generated ``tokens`` (the EOS included when it ended on one)."""

    tokens: list[int]
    finish_reason: str  # "eos" | "length"


class Generator:
    """Generates for lists of token-id prompts with a model and the ``generation`` section.

    ``generate`` runs ``batch_size`` prompts at a time where the model's params live (``load_model``: one device).
    Sampling keys derive from ``key`` (``jax.random.key(seed)``) and each prompt's index. ``compile_seconds``
    accumulates the time spent building executables (one per prompt-length bucket).
    """

    def __init__(self, model: Decoder, gen: ml_collections.ConfigDict, seed: int = 0):
        self.settings = Settings.from_config(gen)
        self.batch_size = gen.batch_size
        graphdef, self.state = nnx.split(model)
        self.vocab_size = model.tok_embeddings.shape[0]
        self._jit = jax.jit(lambda *a: _generate(graphdef, self.settings, *a))
        self._compiled: dict[tuple[int, ...], Any] = {}
        self.key = jax.random.key(seed)
        self.compile_seconds = 0.0

    def generate(self, prompts: Sequence[Sequence[int]], first_index: int = 0) -> list[Output]:
        """Outputs in prompt order. Prompt i draws its samples from ``(seed, first_index + i)``."""
        for i, prompt in enumerate(prompts):
            self.check(prompt, f"prompt {first_index + i}")
        outputs: list[Output] = []
        for lo in range(0, len(prompts), self.batch_size):
            outputs += self._batch(prompts[lo : lo + self.batch_size], first_index + lo)
        return outputs

    def check(self, prompt: Sequence[int], name: str) -> None:
        """Raises ``PromptError`` (naming the prompt ``name``) for a prompt that cannot be generated from."""
        max_length = self.settings.max_length
        if not len(prompt):
            raise PromptError(f"{name} is empty: generation needs at least one token (a BOS)")
        if len(prompt) >= max_length:
            raise PromptError(
                f"{name} has {len(prompt)} tokens but generation.max_length={max_length} counts the prompt "
                "too: raise generation.max_length or shorten the prompt"
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise PromptError(f"{name} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    def _batch(self, prompts: Sequence[Sequence[int]], first_index: int) -> list[Output]:
        b, n = self.batch_size, len(prompts)
        longest = max(len(p) for p in prompts)
        width = min(self.settings.max_length, max(16, 1 << math.ceil(math.log2(longest))))  # bucket: few compiles
        tokens = np.full((b, width), self.settings.pad_id, np.int32)
        lengths = np.ones((b,), np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = prompt
            lengths[i] = len(prompt)
        active = np.arange(b) < n
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(self.key, jnp.arange(first_index, first_index + b))
        args = (self.state, tokens, lengths, active, keys)
        if (b, width) not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[(b, width)] = self._jit.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
        out, count = jax.device_get(self._compiled[(b, width)](*args))
        eos = set(self.settings.eos_ids)
        results = []
        for i in range(n):
            generated = out[i, : count[i]].tolist()
            results.append(Output(generated, "eos" if generated and generated[-1] in eos else "length"))
        return results


# ---------------------------------------------------------------------------------------------------------------------
# Weights: one of our orbax checkpoints or a Hugging Face folder


# Hugging Face dtype names (config.json's ``torch_dtype``/``dtype``, safetensors codes) -> ``model.dtype``
HF_DTYPES = {
    "float32": "torch.float32",
    "bfloat16": "torch.bfloat16",
    "float16": "torch.float16",
    "F32": "torch.float32",
    "BF16": "torch.bfloat16",
    "F16": "torch.float16",
}


def hf_compute_dtype(folder: Any) -> str:
    """``model.dtype`` for an ``hf_folder.HFFolder``: its ``config.json``'s ``torch_dtype`` (``dtype`` in
    transformers 5), else the dtype its embedding is stored in, else float32 (``from_pretrained``'s default)."""
    name = folder.config.get("torch_dtype") or folder.config.get("dtype")
    if isinstance(name, str) and name.removeprefix("torch.") in HF_DTYPES:
        return HF_DTYPES[name.removeprefix("torch.")]
    for embed in ("model.embed_tokens.weight", "model.tok_embeddings.weight"):
        if embed in folder:
            return HF_DTYPES.get(folder.dtype_code(embed), "torch.float32")
    return "torch.float32"


def checkpoint_config(folder: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """A config whose model section is the checkpoint's own: the saved config of one of our checkpoints, or the one
    ``hf_config.model_overrides`` derives from an HF ``config.json`` with its dtype (``hf_compute_dtype``: the
    ``torch_dtype`` transformers would compute in, not InternEvo's fp16 default); ``--config.*`` overrides apply on
    top."""
    from internevo_jax.checkpoint.plan import find_step
    from internevo_jax.convert import hf_config, hf_folder, ours
    from internevo_jax.convert.detect import detect

    path = Path(config_lib.local_path(folder))
    if detect(path) == "hf":
        hf = hf_folder.HFFolder(path)
        model_type, model = hf_config.model_overrides(hf.config)
        values: dict[str, Any] = dict(model_type=model_type, model=model | dict(dtype=hf_compute_dtype(hf)))
        values["moe"] = hf_config.moe_overrides(hf.config)
    else:
        step_dir = find_step(path)
        try:
            saved = ours.saved_config(step_dir)
        except CheckpointError as e:
            raise config_lib.ConfigError(f"{e}; pass --config=FILE") from e
        values = dict(model_type=saved["model_type"], model=saved["model"], generation=saved["generation"])
    values.update(data=dict(seq_len=1, micro_bsz=1), ckpt=dict(enable_save_ckpt=False))
    parsed = [config_lib.parse_override(o) for o in overrides]
    return config_lib.build(values, [("generation.ckpt_folder", folder)] + parsed, source=f"{folder} (saved)")


def load_model(cfg: ml_collections.ConfigDict, folder: str | None = None) -> nnx.Module:
    """The model of ``cfg`` with the weights of ``folder`` (default ``generation.ckpt_folder``) on one device.

    An HF folder is read by ``hf_folder.load_hf`` (checked against ``cfg.model``; arrays keep the file's dtype, which
    the model casts to its compute dtype as it does the fp32 masters); one of our checkpoints (a step folder, or a
    checkpoint root: its newest verified step) by array name, params only. Nothing is allocated before the read.
    """
    from internevo_jax.checkpoint.plan import find_step
    from internevo_jax.convert import hf_folder, ours
    from internevo_jax.convert.detect import detect

    folder = folder or cfg.generation.ckpt_folder
    if folder is None:
        raise config_lib.ConfigError("set generation.ckpt_folder (one of our checkpoints or an HF model folder)")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model_type, cfg.model, nnx.Rngs(0))))
    pure = nnx.to_pure_dict(abstract)
    device = jax.devices()[0]
    if detect(folder) == "hf":
        loaded = hf_folder.load_hf(config_lib.local_path(folder), cfg.model)
        params = jax.tree.map(lambda a: jax.device_put(np.asarray(a), device), loaded)
    else:
        params = ours.read_params(find_step(folder), pure, jax.sharding.SingleDeviceSharding(device))
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)
