"""zerojax.host_memory's huge pages: XLA:CPU's per-step temp buffer faulted 2 MB at a time.

Each execution of a compiled program mmaps its temp buffer afresh; with 4 KB pages every
step faults all of it in again. `glibc.malloc.hugetlb=1` (read at process start) has glibc
ask for transparent huge pages; `zerojax launch` and the step-running CLI commands set it.
"""
import os
import subprocess
import sys
import textwrap

from zerojax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program whose temp buffer is 64 MB or more: minor page faults per execution, steady state.
FAULTS_PER_CALL = textwrap.dedent("""
    import resource
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x, w1, w2: jnp.tanh(x @ w1) @ w2)     # [4096, 4096] fp32 in between
    x, w1, w2 = jnp.ones((4096, 64)), jnp.ones((64, 4096)) * 1e-3, jnp.ones((4096, 8))
    for _ in range(3):
        f(x, w1, w2).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        f(x, w1, w2).block_until_ready()
    print("FAULTS", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
""")


def _faults_per_call(env: dict) -> int:
    proc = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split("FAULTS")[1])


def _without_tunables() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("GLIBC_TUNABLES", None)
    return env


def test_the_tunable_is_added_beside_others_and_a_users_choice_stays():
    if not host_memory.huge_pages_available():
        assert host_memory.with_huge_pages({"A": "1"}) == {"A": "1"}
        return
    assert host_memory.with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert (host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    off = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}
    assert host_memory.with_huge_pages(off) == off
    assert host_memory.asks_for_huge_pages(off) and not host_memory.asks_for_huge_pages({})


def test_huge_pages_cut_the_page_faults_of_each_execution():
    plain = _without_tunables()
    asked = host_memory.with_huge_pages(plain)
    if not host_memory.huge_pages_available():
        assert asked == plain
        return
    small_pages, huge_pages = _faults_per_call(plain), _faults_per_call(asked)
    # 64 MB of temp buffer: ~16,000 faults of 4 KB; with 2 MB pages a few hundred at most.
    assert small_pages > 10_000, small_pages
    assert huge_pages * 10 < small_pages, (small_pages, huge_pages)


def test_launch_and_the_train_command_start_with_the_tunable(tmp_path):
    show = [sys.executable, "-c", "import os; print('TUNABLES', os.environ.get('GLIBC_TUNABLES'))"]
    out = tmp_path / "launched.txt"
    env = _without_tunables()
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "zerojax.cli", "launch", "--nproc", "1", "--", *show],
                              env=env, cwd=ROOT, stdout=f, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = host_memory.with_huge_pages(env).get("GLIBC_TUNABLES")
    assert f"TUNABLES {want}" in out.read_text()
    # The CLI re-executes itself for a step-running command: a bad config fails after the
    # restart, in a process that has the tunable (its error names the config, exit 2).
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    probe = ("import os, sys, zerojax.cli; sys.argv = ['zerojax', 'train', sys.argv[1]];"
             "code = zerojax.cli.main(); print('TUNABLES', os.environ.get('GLIBC_TUNABLES')); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, str(bad)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"TUNABLES {want}" in proc.stdout
