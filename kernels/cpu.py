"""CPU feature detection for kernel selection (x86_64 and aarch64).

``cpu_info()`` -> dict with
  ``arch``      "x86_64" | "aarch64" | platform.machine() otherwise
  ``name``      LLVM CPU name: ``NUMBA_CPU_NAME`` if set (qemu runs set it), else
                ``llvmlite.binding.get_host_cpu_name()``
  ``features``  frozenset of normalized feature names, e.g. "avx2", "avx512f", "avx512bw",
                "avx512_vnni", "avx_vnni", "fma", "neon", "dotprod", "i8mm", "sve"
  ``source``    "env" when NUMBA_CPU_NAME / NUMBA_CPU_FEATURES decided, else "host"

Under qemu user-mode the host's /proc/cpuinfo leaks into the guest, so LLVM cannot
detect the emulated core; the CPU *name* (NUMBA_CPU_NAME, e.g. "cortex-a53",
"cortex-a76") is then mapped to its features with the table below. The result is cached;
``cpu_info(refresh=True)`` recomputes (tests use it after changing the environment).
``has("avx512_vnni")`` is what kernel selection asks.
"""
from __future__ import annotations

import os
import platform

__all__ = ["cpu_info", "has", "normalize_feature", "ARM_CORE_FEATURES"]

# LLVM feature spelling -> sparsedge name (anything else is kept as LLVM spells it).
_ALIASES = {
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "amx-int8": "amx_int8",
    "amx-tile": "amx_tile",
    "amx-bf16": "amx_bf16",
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "dotprod": "dotprod",
    "dot-prod": "dotprod",
    "asimd": "neon",
    "neon": "neon",
    "fp-armv8": "fp_armv8",
    "i8mm": "i8mm",
    "sve": "sve",
    "sve2": "sve2",
}

# aarch64 cores -> features LLVM targets for them (Armv8.2-A dotprod starts at A55/A75).
_V80 = frozenset({"neon", "fp_armv8"})
_V82_DOT = _V80 | {"dotprod", "fp16"}
ARM_CORE_FEATURES: dict[str, frozenset] = {
    "generic": _V80,
    "cortex-a35": _V80, "cortex-a53": _V80, "cortex-a57": _V80, "cortex-a72": _V80,
    "cortex-a73": _V80, "carmel": _V80 | {"fp16"},  # Jetson Xavier: v8.2 without dotprod
    "cortex-a55": _V82_DOT, "cortex-a65": _V82_DOT, "cortex-a75": _V82_DOT,
    "cortex-a76": _V82_DOT, "cortex-a77": _V82_DOT, "cortex-a78": _V82_DOT,
    "cortex-a78ae": _V82_DOT, "cortex-a78c": _V82_DOT, "cortex-x1": _V82_DOT,
    "neoverse-n1": _V82_DOT, "neoverse-e1": _V82_DOT,
    "cortex-a510": _V82_DOT | {"i8mm", "sve", "sve2"}, "cortex-a710": _V82_DOT | {"i8mm", "sve", "sve2"},
    "cortex-a715": _V82_DOT | {"i8mm", "sve", "sve2"}, "cortex-x2": _V82_DOT | {"i8mm", "sve", "sve2"},
    "neoverse-n2": _V82_DOT | {"i8mm", "sve", "sve2"}, "neoverse-v1": _V82_DOT | {"i8mm", "sve"},
    "neoverse-v2": _V82_DOT | {"i8mm", "sve", "sve2"},
    "apple-m1": _V82_DOT, "apple-m2": _V82_DOT | {"i8mm"}, "apple-m3": _V82_DOT | {"i8mm"},
}

_CACHE: dict | None = None


def normalize_feature(name: str) -> str:
    """LLVM / cpuinfo feature spelling -> sparsedge name (lower case, '+' stripped)."""
    n = name.strip().lstrip("+").lower()
    return _ALIASES.get(n, n)


def _parse_features(s: str) -> set[str]:
    """'+avx2,+fma,-avx512f' (LLVM) or 'avx2 fma' -> enabled names, normalized."""
    out: set[str] = set()
    for tok in s.replace(" ", ",").split(","):
        tok = tok.strip()
        if not tok or tok.startswith("-"):
            continue
        out.add(normalize_feature(tok))
    return out


def _arch() -> str:
    m = platform.machine().lower()
    if m in ("amd64", "x86_64", "x64"):
        return "x86_64"
    if m in ("arm64", "aarch64", "armv8l"):
        return "aarch64"
    return m


def _detect() -> dict:
    arch = _arch()
    env_name = os.environ.get("NUMBA_CPU_NAME", "").strip()
    env_feat = os.environ.get("NUMBA_CPU_FEATURES", "").strip()
    name, feats, source = "", set(), "host"
    try:
        import llvmlite.binding as llvm
        host_name = llvm.get_host_cpu_name()
        try:
            host_feats = {normalize_feature(k) for k, v in llvm.get_host_cpu_features().items() if v}
        except RuntimeError:  # LLVM cannot read features on some platforms
            host_feats = set()
    except Exception:  # pragma: no cover - llvmlite always ships with numba
        host_name, host_feats = "generic", set()
    name = host_name
    feats = host_feats
    if env_name and env_name != "host":
        name, source = env_name, "env"
        if arch == "aarch64" or env_name in ARM_CORE_FEATURES:
            feats = set(ARM_CORE_FEATURES.get(env_name, _V80 if arch == "aarch64" else set()))
        # an x86 name without explicit features: keep the host's (numba does the same)
    if env_feat:
        feats, source = _parse_features(env_feat), "env"
    if arch == "aarch64":
        feats.add("neon")  # mandatory in AArch64
        if name in ARM_CORE_FEATURES and not env_feat:
            feats |= ARM_CORE_FEATURES[name]
    return {"arch": arch, "name": name, "features": frozenset(feats), "source": source}


def cpu_info(refresh: bool = False) -> dict:
    """Cached description of the CPU kernels are compiled for (see module doc)."""
    global _CACHE
    if _CACHE is None or refresh:
        _CACHE = _detect()
    return _CACHE


def has(feature: str) -> bool:
    """True when the (possibly emulated) CPU has ``feature`` (sparsedge or LLVM spelling)."""
    return normalize_feature(feature) in cpu_info()["features"]
