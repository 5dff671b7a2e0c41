"""ARM code generation and CPU feature detection (issue 7).

The portable int8 dense kernel's LLVM IR (taken from the numba dispatchers, unoptimized:
NUMBA_OPT=0 in a subprocess) is compiled by llvmlite for aarch64-unknown-linux-gnu -- no
emulation needed -- and must contain ``sdot`` for cortex-a76 / neoverse-n1 (dot-product
extension) and none for cortex-a53 / cortex-a72 (which would SIGILL on it).
"""
import os
import re
import subprocess
import sys

import pytest

from sparsedge.kernels import cpu

_IR_SCRIPT = r"""
import numpy as np
from sparsedge.formats.quant import DenseI8
from sparsedge.kernels import int8 as K8
wf = DenseI8.from_dense(np.ones((4, 8), np.float32))
p = K8.prepare(wf, path="portable")
y = np.empty((4, 2), np.float32)
K8.run_portable(p, np.ones((8, 2), np.float32), y, None, 0, 0.0, 0.0, None)
for f in (K8.dot_i8, K8._dense_dot):
    print(f.inspect_llvm(f.signatures[0]))
    print("\n;;=====SPLIT=====")
"""


@pytest.fixture(scope="module")
def kernel_ir(tmp_path_factory):
    env = dict(os.environ, NUMBA_OPT="0", NUMBA_CACHE_DIR=str(tmp_path_factory.mktemp("numba_cache")))
    env.pop("NUMBA_CPU_NAME", None)
    env.pop("NUMBA_CPU_FEATURES", None)
    out = subprocess.run([sys.executable, "-c", _IR_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    parts = [p for p in out.stdout.split(";;=====SPLIT=====") if p.strip()]
    assert len(parts) == 2
    return {"dot_i8": parts[0], "_dense_dot": parts[1]}


def _aarch64_asm(ir_text: str, core: str) -> str:
    import llvmlite.binding as llvm
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    triple = "aarch64-unknown-linux-gnu"
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu=core, features="", opt=3)
    mod = llvm.parse_assembly(ir_text)
    mod.triple = triple
    mod.data_layout = str(tm.target_data)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)


@pytest.mark.parametrize("fn", ["dot_i8", "_dense_dot"])
def test_sdot_only_on_dotprod_cores(kernel_ir, fn):
    counts = {core: len(re.findall(r"\bsdot\b", _aarch64_asm(kernel_ir[fn], core)))
              for core in ("cortex-a76", "neoverse-n1", "cortex-a53", "cortex-a72")}
    assert counts["cortex-a76"] > 0 and counts["neoverse-n1"] > 0, counts
    assert counts["cortex-a53"] == 0 and counts["cortex-a72"] == 0, counts


def test_arm_core_table_matches_llvm():
    """Our name -> dotprod table agrees with what LLVM enables for the core."""
    import llvmlite.binding as llvm
    llvm.initialize_all_targets()
    t = llvm.Target.from_triple("aarch64-unknown-linux-gnu")
    for core in ("cortex-a53", "cortex-a72", "cortex-a55", "cortex-a76", "neoverse-n1"):
        t.create_target_machine(cpu=core)  # LLVM knows the core
        assert ("dotprod" in cpu.ARM_CORE_FEATURES[core]) == (core not in ("cortex-a53", "cortex-a72"))


@pytest.fixture
def env_cpu(monkeypatch):
    def set_(name=None, features=None):
        for k, v in (("NUMBA_CPU_NAME", name), ("NUMBA_CPU_FEATURES", features)):
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)
        return cpu.cpu_info(refresh=True)
    yield set_
    monkeypatch.undo()  # restore the environment (e.g. NUMBA_CPU_NAME under qemu) before re-detecting
    cpu.cpu_info(refresh=True)


def test_cpu_info_host(env_cpu):
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        pytest.skip("CPU overridden by the environment (emulated run)")
    info = env_cpu()
    assert info["arch"] in ("x86_64", "aarch64") or info["arch"]
    assert isinstance(info["features"], frozenset) and info["name"]
    assert cpu.cpu_info() is cpu.cpu_info()  # cached
    if info["arch"] == "x86_64":
        import llvmlite.binding as llvm
        host = {k for k, v in llvm.get_host_cpu_features().items() if v}
        assert cpu.has("avx2") == ("avx2" in host)
        assert cpu.has("avx512_vnni") == ("avx512vnni" in host)
        assert cpu.has("avx512vnni") == cpu.has("avx512_vnni")  # LLVM spelling accepted
    else:
        assert cpu.has("neon")


def test_cpu_env_override(env_cpu):
    info = env_cpu("cortex-a53")
    assert info["name"] == "cortex-a53" and info["source"] == "env"
    assert not cpu.has("dotprod") and cpu.has("neon")
    env_cpu("cortex-a76")
    assert cpu.has("dotprod")
    env_cpu("neoverse-n1")
    assert cpu.has("dotprod")
    env_cpu("cortex-a72")
    assert not cpu.has("dotprod")
    env_cpu("skylake-avx512", "+avx2,+avx512f,-avx512vnni,+fma")
    assert cpu.has("avx512f") and cpu.has("fma") and not cpu.has("avx512_vnni")
