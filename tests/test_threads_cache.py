"""Per-target numba caches: one cache directory shared by two "boards" never mixes their code.

numba keys every cache entry (``<module>.<func>-<line>.py311.nbi`` index, one ``.nbc`` file per
entry) by the signature and ``codegen.magic_tuple()`` = (LLVM triple, CPU name, CPU features).
Processes that compile for different CPUs (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``, as the
emulated aarch64 job and real boards do) therefore each get their own entries and each load
only their own: a cache copied between boards is a miss, never wrong code. Checked here with
x86 CPU names in subprocesses (no emulation needed): compile for A, then B (must miss, not
reuse A's code), then A and B again (both hit), all in one NUMBA_CACHE_DIR.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

platform_machine = os.uname().machine

PROBE = textwrap.dedent('''
    import json, sys
    import numpy as np
    from numba import njit

    @njit(cache=True)
    def axpy(a, x, y):
        for i in range(x.shape[0]):
            y[i] += a * x[i]

    x = np.arange(8, dtype=np.float32); y = np.ones(8, np.float32)
    axpy(np.float32(2), x, y)
    assert (y == 1 + 2 * x).all()
    st = axpy.stats
    print(json.dumps({"hits": sum(st.cache_hits.values()), "misses": sum(st.cache_misses.values()),
                      "magic": list(axpy.targetctx.codegen().magic_tuple())}))
''')

# Two CPU names LLVM accepts for the host's architecture; the host must be able to run both
# (baseline ISAs only).
TARGETS = {"x86_64": ("x86-64", "x86-64-v2"), "aarch64": ("generic", "cortex-a53")}


def _probe(tmp_path, cpu, features=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    env.update(NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_CPU_NAME=cpu)
    if features is not None:
        env["NUMBA_CPU_FEATURES"] = features
    p = subprocess.run([sys.executable, str(tmp_path / "probe_mod.py")], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform_machine not in TARGETS, reason="no CPU names known for this architecture")
def test_numba_cache_entries_are_per_cpu(tmp_path):
    a, b = TARGETS[platform_machine]
    (tmp_path / "probe_mod.py").write_text(PROBE)
    first_a = _probe(tmp_path, a)
    assert (first_a["hits"], first_a["misses"]) == (0, 1)
    assert first_a["magic"][1] == a
    first_b = _probe(tmp_path, b)
    assert first_b["magic"][1] == b
    assert (first_b["hits"], first_b["misses"]) == (0, 1), "board B reused board A's machine code"
    again_a, again_b = _probe(tmp_path, a), _probe(tmp_path, b)
    assert (again_a["hits"], again_a["misses"]) == (1, 0), "board A's entry was lost when B saved its own"
    assert (again_b["hits"], again_b["misses"]) == (1, 0)
    nbc = sorted(p.name for p in (tmp_path / "cache").rglob("*.nbc"))
    assert len(nbc) == 2, nbc


@pytest.mark.skipif(platform_machine not in TARGETS, reason="no CPU names known for this architecture")
def test_numba_cache_entries_are_per_feature_set(tmp_path):
    """Same CPU name, different feature strings (e.g. a board with an extension disabled): separate."""
    a, _ = TARGETS[platform_machine]
    feat = {"x86_64": ("+sse2", "+sse2,+sse4.1"), "aarch64": ("+neon", "+neon,+crc")}[platform_machine]
    (tmp_path / "probe_mod.py").write_text(PROBE)
    one = _probe(tmp_path, a, feat[0])
    two = _probe(tmp_path, a, feat[1])
    assert one["magic"][2] != two["magic"][2]
    assert (two["hits"], two["misses"]) == (0, 1)
    assert _probe(tmp_path, a, feat[0])["hits"] == 1
