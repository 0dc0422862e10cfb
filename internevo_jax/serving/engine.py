"""Continuous batching for the server: a fixed number of decode slots, filled and freed between decode steps.

Why this layout. Every request gets one row ("slot") of a ``model.KVCache`` of ``max_length`` slots per row, and
sits in that row from slot 0 on: its prompt at positions ``[0, P)``, its n-th generated token at ``P + n``. There is
no left padding and no shared position counter; each row carries its own cache start (``KVCache.start`` [B]) and
attends only to the slots up to its own, so what other rows hold (their lengths, their padding, idle garbage) never
reaches its logits. A new request is prefilled alone, as one ``[1, bucket]`` forward (buckets: powers of two, so few
compiles), sampled, and its cache row written into a free slot; then one jitted decode step of fixed shape
``[slots, 1]`` advances every live row by a token. Because that executable never changes with the batch's
composition (idle rows just feed a dummy token at their slot 0, overwritten on the next admission), a row's
arithmetic is the same whether it runs alone or beside 15 others: greedy output does not depend on the neighbours.
Continuous rather than per-bucket batching: a request that arrives while others decode joins at the next step and
a finished one leaves at once, so short replies never wait for long ones. The price is that one decode step costs
``slots`` rows even when one is live (on a CPU, size ``slots`` to the expected concurrency).

Sampling is per row (``sample``): temperature 0 is greedy (argmax); otherwise the logits are divided by the
temperature, filtered to the ``top_k`` largest (0: all) and to the smallest set whose probability reaches ``top_p``,
and drawn with the key ``fold_in(key(seed), n)`` for the n-th token, so a seeded request is reproducible whatever its
slot or neighbours. The engine runs in its own thread; requests come in with ``submit`` and report every token
through their ``emit`` callback (called on the engine thread). A cancelled request (a client that disconnected, or a
stop string found by the caller) leaves its slot at the next step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internevo_jax.model import Decoder
from internevo_jax.model import logits as model_logits


@dataclasses.dataclass
class Request:
    """One generation: ``prompt`` ids, at most ``max_tokens`` new ones, the sampling rule, and ``emit(token,
    finish)``: called with each new token (``finish`` None), then once with ``(None, "stop" | "length" | "error:
    ...")``. ``stop_ids``: ids that end it (reported, as an EOS)."""

    prompt: Sequence[int]
    max_tokens: int
    emit: Callable[[int | None, str | None], object]  # what it returns is ignored
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    cancelled: bool = False
    generated: int = 0
    submitted: float = dataclasses.field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Frees the request's slot at the next step (thread-safe: a flag the engine reads)."""
        self.cancelled = True


def sample(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seeds: jax.Array, n: jax.Array
) -> jax.Array:
    """One token per row from ``logits`` [B, V] fp32 with the row's own temperature/top_k/top_p [B] and the key
    ``fold_in(key(seeds[b]), n[b])``; temperature 0 is argmax."""
    v = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    in_top_k = jnp.arange(v) < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the larger tokens; the first is always kept
    kept = in_top_k & (before < top_p[:, None])
    cutoff = jnp.take_along_axis(ordered, (jnp.sum(kept, axis=-1) - 1)[:, None], axis=-1)
    filtered = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, n)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


class Engine:
    """Decodes the submitted requests in ``slots`` rows of one KV cache of ``max_length`` positions per row.

    ``eos_ids`` end every request (reported as its last token, finish "stop"); a row also ends at ``max_tokens``
    or when prompt + generated fill ``max_length`` (finish "length"). ``start`` runs the loop in a daemon thread.
    """

    def __init__(self, model: Decoder, max_length: int, slots: int, eos_ids: Sequence[int] = ()):
        self.max_length, self.slots, self.eos_ids = max_length, slots, frozenset(eos_ids)
        graphdef, self.state = nnx.split(model)
        self.vocab_size = model.tok_embeddings.shape[0]
        cache = model.init_cache(slots, max_length)
        self.k, self.v = cache.k, cache.v
        self._empty_cache = lambda: tuple(model.init_cache(slots, max_length)[:2])
        init_cache = model.init_cache

        def prefill(state, k, v, tokens, length, row, temperature, top_k, top_p, seed):
            model = nnx.merge(graphdef, state)
            with model.matmul_precision():
                real = jnp.arange(tokens.shape[1]) < length
                positions = jnp.where(real, jnp.arange(tokens.shape[1]), 0)[None]
                hidden, one = model.decode(tokens, positions, real[None].astype(jnp.int32), init_cache(1, max_length))
                last = jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1)
                lg = model_logits(last, model.head_weight())[:, 0].astype(jnp.float32)
            tok = sample(lg, temperature[None], top_k[None], top_p[None], seed[None], jnp.zeros((1,), jnp.int32))
            k = jax.lax.dynamic_update_slice_in_dim(k, one.k.astype(k.dtype), row, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v, one.v.astype(v.dtype), row, axis=1)
            return k, v, tok[0]

        def step(state, k, v, tokens, slot, temperature, top_k, top_p, seeds, n):
            model = nnx.merge(graphdef, state)
            cache = cache_type(k, v, slot)
            with model.matmul_precision():
                hidden, cache = model.decode(tokens[:, None], slot[:, None], jnp.ones((slots, 1), jnp.int32), cache)
                lg = model_logits(hidden, model.head_weight())[:, 0].astype(jnp.float32)
            return cache.k, cache.v, sample(lg, temperature, top_k, top_p, seeds, n)

        cache_type = type(cache)
        # The cache buffers are donated: each call updates them in place instead of copying [L, B, S, K, H].
        self._prefill = jax.jit(prefill, donate_argnums=(1, 2))
        self._step = jax.jit(step, donate_argnums=(1, 2))
        self.rows: list[Request | None] = [None] * slots
        self.last = np.zeros(slots, np.int32)  # each row's newest token (fed at the next step)
        self.length = np.zeros(slots, np.int32)  # tokens in each row's cache
        self.waiting: deque[Request] = deque()
        self.wake = threading.Condition()
        self.steps = 0
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- the public side (any thread) -------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queues ``request``; it is admitted into the first free slot. The prompt must fit (``check``)."""
        self.check(request.prompt, request.max_tokens)
        with self.wake:
            self.waiting.append(request)
            self.wake.notify()

    def check(self, prompt: Sequence[int], max_tokens: int) -> None:
        """Raises ValueError (a client error, the message says what to change) if the request cannot run."""
        if not prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(prompt) >= self.max_length:
            raise ValueError(
                f"the prompt's {len(prompt)} tokens exceed the model's context of {self.max_length} tokens (prompt "
                "and reply together): shorten the prompt, or serve with a larger --config.generation.max_length"
            )
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.max_length:
            raise ValueError(
                f"the prompt's {len(prompt)} tokens + max_tokens={max_tokens} exceed the model's context of "
                f"{self.max_length} tokens: lower max_tokens to at most {max(self.max_length - len(prompt), 0)} "
                "or shorten the prompt"
            )

    def load(self) -> dict[str, int]:
        """Live and queued request counts (``/health``)."""
        with self.wake:
            return dict(slots=self.slots, active=sum(r is not None for r in self.rows), waiting=len(self.waiting))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="internevo-serve-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self.wake:
            self._stop = True
            self.wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def warm_up(self, prompt_lengths: Sequence[int] = (1,)) -> float:
        """Compiles the decode step and the prefill buckets of ``prompt_lengths`` before serving; returns seconds."""
        t0 = time.perf_counter()
        for n in prompt_lengths:
            self._admit(0, Request([0] * n, 1, lambda *_: None, temperature=0.0))
            self.rows[0] = None
        self._decode()
        return time.perf_counter() - t0

    # -- the engine thread -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self._stop and not self.waiting and all(r is None for r in self.rows):
                    self.wake.wait()
                if self._stop:
                    return
                admitted = []
                for row in range(self.slots):
                    if self.rows[row] is None and self.waiting:
                        admitted.append((row, self.waiting.popleft()))
            for row, request in admitted:
                try:
                    self._admit(row, request)
                except Exception as e:  # fails this request; the others too if the cache went with it
                    self.rows[row] = None
                    self._tell(request, None, f"error: {type(e).__name__}: {e}")
                    self._recover(e)
            self._free_cancelled()
            if any(r is not None for r in self.rows):
                try:
                    self._decode()
                except Exception as e:  # a failed step fails its requests, not the server
                    self._recover(e, always=True)

    def _recover(self, error: Exception, always: bool = False) -> None:
        """After a failed call: if the cache buffers were donated to it (or ``always``), every live request fails
        and the cache starts empty, so the next requests run."""
        if not (always or self.k.is_deleted() or self.v.is_deleted()):
            return
        for row, request in enumerate(self.rows):
            if request is not None:
                self._finish(row, f"error: {type(error).__name__}: {error}")
        if self.k.is_deleted() or self.v.is_deleted():
            self.k, self.v = self._empty_cache()

    @staticmethod
    def _tell(request: Request, token: int | None, finish: str | None) -> None:
        """``request.emit``; a listener that fails (its event loop closed) cancels its request, nothing more."""
        try:
            request.emit(token, finish)
        except Exception:
            request.cancelled = True

    def _free_cancelled(self) -> None:
        for row, request in enumerate(self.rows):
            if request is not None and request.cancelled:
                self.rows[row] = None

    def _admit(self, row: int, request: Request) -> None:
        if request.cancelled:
            return
        n = len(request.prompt)
        width = min(self.max_length, max(16, 1 << math.ceil(math.log2(n))))  # a bucket: few compiles
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :n] = request.prompt
        if request.seed is None:
            request.seed = int.from_bytes(os.urandom(4), "little")
        self.k, self.v, tok = self._prefill(
            self.state, self.k, self.v, tokens, np.int32(n), np.int32(row), *self._rule([request])
        )
        self.rows[row] = request
        self.length[row] = n
        self._emit(row, int(tok))

    @staticmethod
    def _rule(requests: Sequence[Request | None]) -> tuple[np.ndarray, ...]:
        """Temperature, top_k, top_p, seed per request (arrays; a single request gives scalars)."""
        live = [r or Request([0], 1, lambda *_: None) for r in requests]
        arrays = (
            np.array([r.temperature for r in live], np.float32),
            np.array([r.top_k for r in live], np.int32),
            np.array([r.top_p for r in live], np.float32),
            np.array([(r.seed or 0) % 2**32 for r in live], np.uint32),
        )
        return tuple(a[0] for a in arrays) if len(requests) == 1 else arrays

    def _decode(self) -> None:
        live = np.array([r is not None for r in self.rows])
        slot = np.where(live, self.length, 0).astype(np.int32)  # this step writes the newest token at its position
        n = np.array([r.generated if r else 0 for r in self.rows], np.int32)
        tokens = np.where(live, self.last, 0).astype(np.int32)
        self.k, self.v, toks = self._step(self.state, self.k, self.v, tokens, slot, *self._rule(self.rows), n)
        toks = np.asarray(toks)
        self.steps += 1
        for row in np.flatnonzero(live):
            self.length[row] += 1
            self._emit(int(row), int(toks[row]))

    def _emit(self, row: int, token: int) -> None:
        request = self.rows[row]
        assert request is not None, row  # called for live rows only
        if request.cancelled:
            self.rows[row] = None
            return
        request.generated += 1
        self.last[row] = token
        self._tell(request, token, None)
        if token in self.eos_ids or token in request.stop_ids:
            self._finish(row, "stop")
        elif request.generated >= request.max_tokens or self.length[row] + 1 >= self.max_length:
            self._finish(row, "length")

    def _finish(self, row: int, reason: str) -> None:
        request, self.rows[row] = self.rows[row], None
        assert request is not None, row  # called for live rows only
        self._tell(request, None, reason)
