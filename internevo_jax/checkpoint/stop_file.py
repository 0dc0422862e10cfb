"""``ckpt.stop_file_path`` (InternEvo's CK-07): a file whose number asks a running job to checkpoint and maybe stop."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from internevo_jax.config import local_path
from internevo_jax.monitoring.logger import get_logger


class StopFile:
    """``ckpt.stop_file_path``: a file holding an int that asks a running job to checkpoint and maybe stop.

    ``v < 0``: save a checkpoint at batch ``|v|``; ``v > 0``: save at batch ``v`` and exit cleanly (exit code 0).
    As InternEvo, process 0 writes ``0`` into the file at start (a value left from an earlier run never fires) and
    checks it at every step: one ``stat``, and the file is read only when its size or mtime changed. Unlike
    InternEvo, which acts only when the step count equals ``|v|`` exactly (a value written a moment late is missed),
    a value acts once, at the first step ``>= |v|`` after it appeared; steps are counted in batches, the number a
    checkpoint folder is named after.

    With several processes, process 0's value reaches the others through a tiny on-device sum dispatched after
    each step and read one step later, when that step's metrics are read anyway, so the check never stalls the
    device; every process therefore acts on the value process 0 saw one step earlier, at the same step.
    """

    def __init__(self, path: str):
        self.path = Path(local_path(path)).absolute()
        self.log = get_logger()
        self._stamp: tuple[int, int, int] | None = None
        self._value = 0
        self._acted: set[int] = set()
        self._pending: jax.Array | None = None
        self._multi = jax.process_count() > 1
        if jax.process_index() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("0")
            os.replace(tmp, self.path)
            self._stamp = self._stat()
        if self._multi:
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
            self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("all"))
            self._sum = jax.jit(
                lambda x: x.sum(), out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            )

    def request(self, batches_done: int) -> tuple[str, int] | None:
        """``("save" | "exit", value)`` when the file asks for it at this step, else None (same on every process)."""
        value = self._agreed()
        step = abs(value)
        if value == 0 or batches_done < step or value in self._acted:
            return None
        self._acted.add(value)
        return ("exit" if value > 0 else "save"), value

    def _agreed(self) -> int:
        local = self._poll() if jax.process_index() == 0 else 0
        if not self._multi:
            return local
        agreed = 0 if self._pending is None else int(np.asarray(self._pending.addressable_data(0)))
        data = np.zeros((jax.local_device_count(),), np.int32)
        data[0] = local  # only process 0 contributes, so the sum is its value
        x = jax.make_array_from_process_local_data(self._sharding, data, (jax.device_count(),))
        self._pending = self._sum(x)
        return agreed

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _poll(self) -> int:
        stamp = self._stat()
        if stamp == self._stamp:
            return self._value
        self._stamp = stamp
        if stamp is None:
            self._value = 0
            return 0
        try:
            text = self.path.read_text().strip()
            self._value = int(text or 0)
        except (OSError, ValueError) as e:
            self.log.warning(f"ckpt.stop_file_path {self.path}: cannot read an int from it ({e}); ignoring it")
            self._value = 0
        return self._value
