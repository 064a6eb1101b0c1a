"""Static kernel report: registers, spills, stack and shared memory of every CUDA kernel.

Compiles each translation unit of the instantiation table (``instantiations.py``, trimmed by
``--kernels`` / ``GK_KERNELS``) for each target arch with ``nvcc -cubin -Xptxas -v`` and prints
what ptxas says per kernel. Any spill fails the report (exit 1): on a GPU a spill is a trip to
local memory in the inner loop, and no test without a GPU would notice it.

Where ``cuobjdump`` is found (PATH, the CUDA toolkit next to nvcc, or the PyPI packages
``nvidia-cuda-cuobjdump`` + ``nvidia-cuda-nvdisasm``), the SASS of each cubin adds per-kernel
instruction counts: HMMA (tensor cores), LDSM (ldmatrix), LDGSTS (cp.async) and 128-bit global
loads/stores, so a kernel that silently lost its tensor cores or its vector accesses shows.

Dynamic shared memory is chosen at launch, so ptxas cannot know it. A kernel header may state
its maximum with a comment line ``// kernel-report: dynamic-smem <kernel name> <bytes>``; the
report shows "-" otherwise.

Exit codes: 0 clean, 1 a kernel spills, 2 nvcc (or the source tree) not found, 3 a TU failed
to compile.

    python -m genkernels.tools.kernel_report [--archs "80;90"] [--kernels REGEX] [-j N] [--json PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

EXIT_OK, EXIT_SPILLS, EXIT_NO_TOOL, EXIT_COMPILE_ERROR = 0, 1, 2, 3
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr"]
SASS_COLUMNS = ("hmma", "ldsm", "ldgsts", "ld128", "st128")
CUOBJDUMP_HINT = "cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"


class ReportError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class KernelStats:
    tu: str
    arch: str
    mangled: str
    kernel: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0
    cmem: int | None = None  # not printed by every ptxas (sm_90 puts params elsewhere)
    barriers: int = 0
    dynamic_smem: int | None = None
    sass: dict[str, int] = field(default_factory=dict)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


# ------------------------------------------------------------------ locating things
def _is_source_tree(d: Path) -> bool:
    return (d / "csrc").is_dir() and (d / "CMakeLists.txt").is_file()


def find_source_dir(explicit: str | None = None) -> Path:
    """The genkernels source tree: `explicit`, else the first folder holding ``csrc/`` and
    ``CMakeLists.txt`` above this file (an editable install), else above the working folder."""
    if explicit:
        d = Path(explicit).resolve()
        if not _is_source_tree(d):
            raise ReportError(f"--source-dir {d} has no csrc/ and CMakeLists.txt", EXIT_NO_TOOL)
        return d
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for d in (start, *start.parents):
            if _is_source_tree(d):
                return d
    raise ReportError(
        "genkernels source tree not found (a folder with csrc/ and CMakeLists.txt) above "
        f"{Path(__file__).resolve().parent} or {Path.cwd()}: the kernel report compiles the "
        "CUDA sources, which an installed wheel does not ship; run it from a checkout or pass "
        "--source-dir",
        EXIT_NO_TOOL,
    )


def find_nvcc(explicit: str | None = None) -> str:
    candidates = [explicit] if explicit else [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not explicit and cuda_home:
        candidates.append(str(Path(cuda_home) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise ReportError(
        "nvcc not found (looked at --nvcc, $CUDACXX, PATH, $CUDA_HOME/bin): install the CUDA "
        "toolkit or put nvcc on PATH",
        EXIT_NO_TOOL,
    )


def _nvidia_wheel_bins() -> list[Path]:
    """bin/ folders of the ``nvidia-*`` PyPI wheels (``nvidia/cu13/bin``, ``nvidia/cuda_*/bin``)."""
    found = []
    try:
        import nvidia  # namespace package of the NVIDIA wheels
    except ImportError:
        return found
    for root in getattr(nvidia, "__path__", []):
        found += sorted(Path(root).glob("*/bin"))
    return found


def _tool_dirs(nvcc: str) -> list[Path]:
    cuda_bin = Path(nvcc).resolve().parent
    return [cuda_bin, *_nvidia_wheel_bins()]


def find_cuobjdump(nvcc: str, explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else None
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    for d in _tool_dirs(nvcc):
        if (d / "cuobjdump").is_file():
            return str(d / "cuobjdump")
    return None


def _tool_env(nvcc: str) -> dict[str, str]:
    # cuobjdump -sass runs nvdisasm, which the wheels install in their own bin/ folders
    env = dict(os.environ)
    extra = [str(d) for d in _tool_dirs(nvcc) if (d / "nvdisasm").is_file()]
    env["PATH"] = os.pathsep.join([*extra, env.get("PATH", "")])
    return env


def parse_archs(text: str) -> list[str]:
    """``"80;90"``, ``"80,90-real"``, ``"sm_90a"`` -> ``["sm_80", "sm_90"]`` etc."""
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        item = re.sub(r"-(real|virtual)$", "", item)
        item = re.sub(r"^(sm_|compute_)", "", item)
        if not re.fullmatch(r"\d+[af]?", item):
            raise ReportError(f"bad arch {item!r} in {text!r}: expected numbers such as 80;90", EXIT_NO_TOOL)
        archs.append(f"sm_{item}")
    if not archs:
        raise ReportError("no target arch given", EXIT_NO_TOOL)
    return list(dict.fromkeys(archs))


def _load_instantiations(source_dir: Path):
    """The table of the tree being reported on (which may not be the imported package)."""
    path = source_dir / "python" / "genkernels" / "tools" / "instantiations.py"
    if not path.is_file():
        from . import instantiations

        return instantiations
    spec = importlib.util.spec_from_file_location("_gk_report_instantiations", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ parsing
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str, tu: str = "", arch: str = "") -> list[KernelStats]:
    """Per entry function of one ``-Xptxas -v`` log. Non-entry functions that ptxas reports
    (non-inlined device functions) are folded into nothing: their frames show in the callers'."""
    kernels: dict[str, KernelStats] = {}
    current: KernelStats | None = None  # the function the following lines describe
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = kernels.setdefault(m.group(1), KernelStats(tu=tu, arch=arch or m.group(2), mangled=m.group(1)))
        elif m := _PROPS.search(line):
            current = kernels.get(m.group(1))
        elif current is not None and (m := _FRAME.search(line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            if b := re.search(r"used (\d+) barriers", line):
                current.barriers = int(b.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current.smem = int(s.group(1))
            if cmem := re.findall(r"(\d+) bytes cmem\[\d+\]", line):
                current.cmem = sum(map(int, cmem))
    return list(kernels.values())


_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)")


def _classify(opcode: str) -> str | None:
    base, *mods = opcode.split(".")
    if base == "HMMA":
        return "hmma"
    if base == "LDSM":
        return "ldsm"
    if base == "LDGSTS":
        return "ldgsts"
    if base == "LDG" and "128" in mods:
        return "ld128"
    if base == "STG" and "128" in mods:
        return "st128"
    return None


def parse_sass(text: str) -> dict[str, dict[str, int]]:
    """Counts of the SASS_COLUMNS instructions per (mangled) function of a ``cuobjdump -sass``."""
    counts: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if m := _SASS_FUNCTION.match(line):
            current = counts.setdefault(m.group(1), dict.fromkeys(SASS_COLUMNS, 0))
        elif current is not None and (m := _SASS_INSTR.match(line)):
            if kind := _classify(m.group(1)):
                current[kind] += 1
    return counts


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable (``merge_attention_states_kernel<bf16_t,8>``); mangled names stay
    as they are without ``c++filt``."""
    cxxfilt = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    plain = dict(zip(names, names))
    if cxxfilt and names:
        try:
            out = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
            lines = out.splitlines()
            if len(lines) == len(names):
                plain = dict(zip(names, lines))
        except (OSError, subprocess.CalledProcessError):
            pass
    return {k: shorten(v) for k, v in plain.items()}


def shorten(name: str) -> str:
    """``void gk::cuda::k<gk::bf16_t, 8>(gk::MergeStatesParams)`` -> ``k<bf16_t,8>``."""
    if name.endswith(")"):  # drop the parameter list: the last balanced (...) at the end
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\b(gk::cuda_emu::|gk::cuda::|gk::|\(anonymous namespace\)::)", "", name)
    return name.replace(", ", ",")


_DYN_SMEM = re.compile(r"//\s*kernel-report:\s*dynamic-smem\s+(\w+)\s+(\d+)")


def read_dynamic_smem_annotations(paths: list[Path]) -> dict[str, int]:
    found = {}
    for p in paths:
        if p.is_file():
            for m in _DYN_SMEM.finditer(p.read_text(errors="replace")):
                found[m.group(1)] = int(m.group(2))
    return found


# ------------------------------------------------------------------ compiling
@dataclass
class Job:
    tu: Path
    arch: str


def _compile(job: Job, nvcc: str, include: Path, out_dir: Path, cuobjdump: str | None, env) -> tuple:
    """Returns (kernels, sass_note, error) for one (TU, arch)."""
    cubin = out_dir / f"{job.tu.stem}.{job.arch}.cubin"
    cmd = [nvcc, *NVCC_FLAGS, "-I", str(include), f"-arch={job.arch}", "-cubin", "-Xptxas", "-v", "-o", str(cubin), str(job.tu)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        return [], None, f"{job.tu.name} [{job.arch}] failed to compile:\n  {' '.join(cmd)}\n{log.strip()}"
    kernels = parse_ptxas(log, job.tu.stem, job.arch)
    note = None
    if cuobjdump:
        d = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
        if d.returncode == 0:
            counts = parse_sass(d.stdout)
            for k in kernels:
                k.sass = counts.get(k.mangled, {})
        else:
            first = (d.stderr.strip() or d.stdout.strip()).splitlines()[:1]
            note = f"cuobjdump failed on {cubin.name}: {first[0] if first else d.returncode}"
    return kernels, note, None


def collect(
    source_dir: Path,
    archs: list[str],
    pattern: str | None,
    jobs: int,
    nvcc: str,
    cuobjdump: str | None,
    extra_sources: list[Path] = (),
    progress=None,
) -> tuple[list[KernelStats], list[str], list[str]]:
    """Compiles every selected TU for every arch. Returns (kernels, notes, compile errors)."""
    inst = _load_instantiations(source_dir)
    env = _tool_env(nvcc)
    with tempfile.TemporaryDirectory(prefix="gk-kernel-report-") as tmp:
        tmp_dir = Path(tmp)
        tus = [p for p in inst.write(tmp_dir / "src", pattern) if p.suffix == ".cu"]
        tus += [Path(p).resolve() for p in extra_sources]
        work = [Job(tu, a) for tu in tus for a in archs]
        headers = [source_dir / "csrc" / r.header for r in inst.selected(pattern)]
        annotations = read_dynamic_smem_annotations(headers + [Path(p) for p in extra_sources])
        results = []
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [pool.submit(_compile, j, nvcc, source_dir / "csrc", tmp_dir, cuobjdump, env) for j in work]
            for i, (job, fut) in enumerate(zip(work, futures), 1):
                results.append(fut.result())
                if progress:
                    progress(f"[{i}/{len(work)}] {job.tu.stem} {job.arch}")
    kernels = [k for ks, _, _ in results for k in ks]
    notes = sorted({n for _, n, _ in results if n})
    errors = [e for _, _, e in results if e]
    readable = demangle(sorted({k.mangled for k in kernels}))
    for k in kernels:
        k.kernel = readable[k.mangled]
        base = re.sub(r"<.*$", "", k.kernel).split("::")[-1]
        k.dynamic_smem = annotations.get(base)
    kernels.sort(key=lambda k: (k.kernel, k.arch))
    return kernels, notes, errors


# ------------------------------------------------------------------ output
def format_table(kernels: list[KernelStats], with_sass: bool) -> str:
    head = ["kernel", "arch", "regs", "spill st/ld", "stack", "smem", "dyn smem", "cmem"]
    if with_sass:
        head += ["HMMA", "LDSM", "LDGSTS", "vec ld/st"]
    rows = []
    # a kernel instantiated in several TUs (e.g. a helper of each head-dim TU) is listed once
    seen: dict[tuple, int] = {}
    for k in kernels:
        key = (k.kernel, k.arch, k.registers, k.spill_stores, k.spill_loads, k.stack, k.smem)
        seen[key] = seen.get(key, 0) + 1
    printed = set()
    for k in kernels:
        key = (k.kernel, k.arch, k.registers, k.spill_stores, k.spill_loads, k.stack, k.smem)
        if key in printed:
            continue
        printed.add(key)
        row = [
            k.kernel + (f" (x{seen[key]} TUs)" if seen[key] > 1 else ""), k.arch, str(k.registers), f"{k.spill_stores}/{k.spill_loads}", str(k.stack),
            str(k.smem), "-" if k.dynamic_smem is None else str(k.dynamic_smem), "-" if k.cmem is None else str(k.cmem),
        ]  # fmt: skip
        if with_sass:
            s = k.sass
            row += [str(s.get("hmma", "-")), str(s.get("ldsm", "-")), str(s.get("ldgsts", "-"))]
            row += [f"{s['ld128']}/{s['st128']}" if s else "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genkernels.tools.kernel_report", description=__doc__.splitlines()[0])
    ap.add_argument("--source-dir", help="genkernels checkout (default: found above this file, then the cwd)")
    ap.add_argument("--archs", default=os.environ.get("GK_CUDA_ARCHS") or "80;90", help='e.g. "80;90" (default $GK_CUDA_ARCHS or 80;90)')
    ap.add_argument("--kernels", default=os.environ.get("GK_KERNELS", ""), help="regular expression over instantiation names (default $GK_KERNELS)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel nvcc processes")
    ap.add_argument("--json", type=Path, help="also write the report as JSON")
    ap.add_argument("--nvcc", help="nvcc to use (default $CUDACXX, PATH, $CUDA_HOME/bin)")
    ap.add_argument("--cuobjdump", help="cuobjdump to use (default: PATH, toolkit, nvidia-* wheels)")
    ap.add_argument("--no-sass", action="store_true", help="skip the cuobjdump instruction counts")
    ap.add_argument("--extra-source", action="append", default=[], type=Path, metavar="FILE", help="also report on this .cu (tests)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)

    try:
        source_dir = find_source_dir(args.source_dir)
        nvcc = find_nvcc(args.nvcc)
        archs = parse_archs(args.archs)
        if args.kernels:
            re.compile(args.kernels)
    except ReportError as e:
        print(f"kernel_report: {e}", file=sys.stderr)
        return e.code
    except re.error as e:
        print(f"kernel_report: bad --kernels regular expression {args.kernels!r}: {e}", file=sys.stderr)
        return EXIT_NO_TOOL
    cuobjdump = None if args.no_sass else find_cuobjdump(nvcc, args.cuobjdump)
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    kernels, notes, errors = collect(
        source_dir, archs, args.kernels or None, args.jobs, nvcc, cuobjdump, args.extra_source, progress
    )

    with_sass = any(k.sass for k in kernels)
    print(format_table(kernels, with_sass))
    print()
    if args.no_sass:
        print("SASS counts: skipped (--no-sass)")
    elif cuobjdump is None:
        print(f"SASS counts: {CUOBJDUMP_HINT}")
    else:
        print(f"SASS counts: {cuobjdump}")
    for n in notes:
        print(f"note: {n}")
    spilling = [k for k in kernels if k.spills]
    tus = len({k.tu for k in kernels})
    print(
        f"{len(kernels)} kernels from {tus} TUs for {', '.join(archs)}; "
        f"max registers {max((k.registers for k in kernels), default=0)}; "
        f"max stack {max((k.stack for k in kernels), default=0)} B; {len(spilling)} spilling"
    )
    for e in errors:
        print(e, file=sys.stderr)
    for k in spilling:
        print(f"SPILL: {k.kernel} [{k.arch}] {k.spill_stores} B stores / {k.spill_loads} B loads ({k.tu})")

    if args.json:
        doc = {
            "nvcc": nvcc,
            "nvcc_flags": NVCC_FLAGS,
            "archs": archs,
            "cuobjdump": cuobjdump,
            "kernels": [{**asdict(k), "spills": k.spills} for k in kernels],
            "errors": errors,
            "notes": notes,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
    if errors:
        return EXIT_COMPILE_ERROR
    return EXIT_SPILLS if spilling else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
