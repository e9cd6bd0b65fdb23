"""DeepSpeed's compiled ops that rayft's runs load, built before the first run needs them.

DeepSpeed compiles a C++ op the first time a process loads it, into torch's extension
cache (``~/.cache/torch_extensions`` unless ``TORCH_EXTENSIONS_DIR`` says otherwise), and
later processes load the cached library. On a CPU machine every run loads the
shared-memory collectives of ``deepspeed.comm``, and a run with
``deepspeed.offload_optimizer`` loads CPUAdam. Compiled inside a run, they land in its
``setup`` time (24-28 s and 39-46 s on 2 cores in three builds, while the run's other
workers wait); ``rayft build-ops`` compiles them beforehand: ``make venv`` does, and so
can a node image's setup.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# DeepSpeed's op builder classes and what in a rayft run loads each. On CUDA the
# collectives are NCCL's, so the accelerator offers no shared-memory op and it is skipped.
OPS: tuple[tuple[str, str], ...] = (
    ("ShareMemCommBuilder", "every run on CPU (deepspeed.comm's shared-memory collectives)"),
    ("CPUAdamBuilder", "deepspeed.offload_optimizer (DeepSpeed's CPUAdam)"),
)


@dataclass
class BuiltOp:
    name: str  # DeepSpeed's name for the op (its NAME), or the builder's class name
    used_by: str
    status: str  # "ready" or why it was skipped
    seconds: float = 0.0
    path: str | None = None  # the compiled library


class OpBuildError(RuntimeError):
    """An op failed to compile; the message says what DeepSpeed needs."""


def build_ops(say: Callable[[str], None] = print) -> list[BuiltOp]:
    """Load (compiling where not cached) each op in OPS that this machine's accelerator
    provides and DeepSpeed's install found compatible."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    compatible = deepspeed.ops.__compatible_ops__
    built = []
    for class_name, used_by in OPS:
        builder = accelerator.create_op_builder(class_name)
        if builder is None:
            built.append(BuiltOp(class_name, used_by, f"none on {accelerator.device_name()}"))
            continue
        if not compatible.get(builder.NAME, False):
            built.append(BuiltOp(builder.NAME, used_by, "not compatible with this install"))
            continue
        say(f"{builder.NAME}: loading (compiling if not cached; up to a minute or two)")
        started = time.perf_counter()
        try:
            module = builder.load(verbose=False)
        except Exception as exc:  # a compiler's failure surfaces as several exception types
            raise OpBuildError(
                f"DeepSpeed's {builder.NAME} op failed to compile ({type(exc).__name__}: "
                f"{exc}). It needs a C++ compiler (g++, or the one CXX names) and Python's "
                f"headers (python3-dev); install them and run `rayft build-ops` again"
            ) from exc
        seconds = time.perf_counter() - started
        built.append(BuiltOp(builder.NAME, used_by, "ready", seconds, module.__file__))
    return built


def render(built: list[BuiltOp]) -> str:
    lines = []
    for op in built:
        if op.status == "ready":
            lines.append(
                f"{op.name}: ready in {op.seconds:.1f} s, {op.path} (used by {op.used_by})"
            )
        else:
            lines.append(f"{op.name}: skipped, {op.status} (used by {op.used_by})")
    return "\n".join(lines)
