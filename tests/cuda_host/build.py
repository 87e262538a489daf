"""Builds pgext's CUDA kernels for the host (tests/cuda_host/cuda_host.h).

The kernel files csrc/core/cuda/*.cu are compiled by the host compiler, unchanged
but for a mechanical rewrite of their copies in the build directory:

- ``kernel<<<grid, block, shmem, stream>>>(args)`` becomes
  ``::cuda_host::launch(::cuda_host::config(grid, block, shmem, stream), kernel, args)``
  (the build fails if any ``<<<`` or ``>>>`` survives);
- ``extern __shared__ T name[];`` becomes a pointer to the launch's dynamic
  shared memory, and a static ``__shared__`` declaration is followed by a call
  that fills the variable with garbage (0xff bytes) in every new block;
- ``TORCH_LIBRARY_IMPL(pgext, CUDA, m)`` registers the kernels as the CPU
  kernels of the ``pgext_cuda_host`` namespace instead, whose ops have the
  schemas of pgext's (copied from the loaded ``torch.ops.pgext``);
- ``#line`` keeps the original file names and line numbers in compiler
  messages and device-side assert reports.

c10/cuda's stream, guard and launch check come from tests/cuda_host/include.
The test-only variant of the batch reduction that lacks its barrier between
tree levels is derived from csrc/core/cuda/pg_cuda_reduce.cu the same way
(``missing_barrier_variant``), in a namespace of its own.
"""
from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "core" / "cuda"
NAMESPACE = "pgext_cuda_host"
#: pgext's kernel ops, registered in NAMESPACE by csrc/core/cuda/pg_cuda.cu (at least these).
KERNEL_OPS = ("pg_error_forward", "pg_error_backward", "pg_row_stats", "pg_grad_from_stats", "pg_merge_row_stats_")

# Comments and string literals: comments are blanked (newlines kept) before
# the launch syntax is searched, strings are left alone.
_COMMENT_OR_STRING = re.compile(r'("(?:\\.|[^"\\\n])*")|(//[^\n]*)|(/\*.*?\*/)', re.S)
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:(?:alignas|__align__)\s*\(\s*\d+\s*\)\s+)*([A-Za-z_][\w:<>, ]*?)\s*(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(
    r"\b__shared__\s+(?P<decl>[^;{}]*?\b(?P<name>[A-Za-z_]\w*)\s*(?:\[[^\];]*\]\s*)*);")
_REGISTRATION = re.compile(r"TORCH_LIBRARY_IMPL\(\s*pgext\s*,\s*CUDA\s*,")


def _blank_comments(text: str) -> str:
    def blank(m):
        if m.group(1):
            return m.group(1)
        return re.sub(r"[^\n]", " ", m.group(0))

    return _COMMENT_OR_STRING.sub(blank, text)


def _matching_paren(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses after a kernel launch")


def rewrite_launches(text: str, name: str) -> str:
    """Every ``kernel<<<config>>>(args)`` of `text` as a host launch. Line
    numbers are kept: the replacement ends with the newlines it replaced."""
    text = _blank_comments(text)
    out = []
    pos = 0
    while (i := text.find("<<<", pos)) >= 0:
        start = max(text.rfind(c, 0, i) for c in ";{}") + 1
        kernel = text[start:i]
        end_config = text.find(">>>", i)
        if end_config < 0:
            raise ValueError(f"{name}: '<<<' without '>>>'")
        config = text[i + 3:end_config]
        open_args = end_config + 3
        while text[open_args].isspace():
            open_args += 1
        if text[open_args] != "(":
            raise ValueError(f"{name}: no argument list after '>>>'")
        close_args = _matching_paren(text, open_args)
        args = text[open_args + 1:close_args]
        # the launch starts where the kernel's name did; the newlines it
        # spanned follow it
        lead = len(kernel) - len(kernel.lstrip())
        launch = (f"::cuda_host::launch(::cuda_host::config({config}), {kernel.strip()}"
                  + (f", {args}" if args.strip() else "") + ")")
        spanned = text[start + lead:close_args + 1].count("\n")
        out.append(text[pos:start + lead])
        out.append(" ".join(launch.split()) + "\n" * spanned)
        pos = close_args + 1
    out.append(text[pos:])
    result = "".join(out)
    result = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ::cuda_host::dynamic_shared<{m.group(1)}>();",
                                result)
    # a static __shared__ variable is filled with 0xff bytes when the first
    # thread of each block reaches its declaration
    result = _STATIC_SHARED.sub(
        lambda m: f"__shared__ {m.group('decl')}; ::cuda_host::shared_declared(&{m.group('name')}, "
                  f"sizeof({m.group('name')}));", result)
    for token in ("<<<", ">>>"):
        if token in result:
            raise ValueError(f"{name}: a kernel launch was not rewritten ('{token}' remains)")
    return result


def host_source(path: Path) -> str:
    """The host version of a CUDA source file."""
    text = rewrite_launches(path.read_text(), path.name)
    text, registrations = _REGISTRATION.subn(f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,", text)
    if path.name == "pg_cuda.cu" and registrations != 1:
        raise ValueError("pg_cuda.cu: expected one TORCH_LIBRARY_IMPL(pgext, CUDA, m)")
    return f'#include "cuda_host.h"\n#line 1 "{path}"\n{text}'


def missing_barrier_variant(reduce_source: str) -> str:
    """The batch reduction without the __syncthreads() between the levels of
    its shared-memory tree (the barrier inside a for loop), as
    pgext::cuda_missing_barrier::reduce_losses. Raises if there is no such
    barrier to drop (the reduction changed: update this variant)."""
    text = reduce_source
    for loop in re.finditer(r"\bfor\s*\(", text):
        body_open = text.find("{", _matching_paren(text, text.find("(", loop.start())))
        depth, j = 0, body_open
        while True:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                break
            j += 1
        body = text[body_open:j]
        if "__syncthreads();" in body:
            at = body_open + body.rindex("__syncthreads();")
            text = text[:at] + "/* barrier dropped */;" + text[at + len("__syncthreads();"):]
            break
    else:
        raise ValueError("pg_cuda_reduce.cu: no __syncthreads() inside a loop to drop for the broken variant")
    text, renamed = re.subn(r"\bnamespace cuda \{", "namespace cuda_missing_barrier {", text)
    if renamed != 1:
        raise ValueError("pg_cuda_reduce.cu: expected one 'namespace cuda {'")
    return text


def _write_if_changed(path: Path, text: str) -> str:
    # unchanged sources keep their time stamps: ninja recompiles nothing
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return str(path)


def sources(build_dir: Path) -> list:
    """The host sources of the test library, written under build_dir/src."""
    src = build_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    files = []
    for cu in sorted(CUDA_DIR.glob("*.cu")):
        text = host_source(cu)
        files.append(_write_if_changed(src / f"{cu.stem}.cpp", text))
        if cu.name == "pg_cuda_reduce.cu":
            files.append(_write_if_changed(src / "pg_cuda_reduce_missing_barrier.cpp", missing_barrier_variant(text)))
    files.append(_write_if_changed(src / "harness_ops.cpp", host_source(HERE / "harness_ops.cu")))
    files.append(str(HERE / "cuda_host.cpp"))
    # the host side shared with the CPU backend (checks, flattening)
    files.append(str(CSRC / "core" / "checks.cpp"))
    return files


def define_schemas():
    """A library fragment in NAMESPACE holding the schemas of all of pgext's
    ops, so that whatever pg_cuda.cu registers has its schema (keep the
    returned object alive)."""
    import torch

    import pgext  # noqa: F401  (registers torch.ops.pgext)

    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    names = sorted({n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("pgext::")})
    missing = set(KERNEL_OPS) - set(names)
    assert not missing, f"pgext has no op {missing}"
    for name in names:
        packet = getattr(torch.ops.pgext, name)
        for overload in packet.overloads():
            lib.define(str(getattr(packet, overload)._schema).split("::", 1)[1])
    return lib


def build(build_dir: Path, verbose: bool = False):
    """Compiles (incrementally, with ninja) and loads the test library; returns
    the schema fragment, to be kept alive while the ops are used."""
    from torch.utils.cpp_extension import load

    lib = define_schemas()
    build_dir.mkdir(parents=True, exist_ok=True)
    load(
        name=NAMESPACE,
        sources=sources(build_dir),
        extra_cflags=["-O2", "-std=c++20", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"],
        extra_include_paths=[str(HERE / "include"), str(HERE), str(CUDA_DIR), str(CSRC)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return lib
