"""CuTeDSL kernels compile for the GPU targets on this CPU-only machine (fake tensors).

Each target runs in its own process because CuTeDSL reads the target at import time."""

import shutil

import pytest

from fa4_tq.compile_check import ARCHES, run_in_subprocess

# No skip when the FA4 stack is missing: the README's test command installs it, and a silently
# skipped compile check is worse than a red one.
pytestmark = pytest.mark.compile

KERNEL_CLASS = {"sm_90a": "FlashAttentionForwardSm90", "sm_100a": "FlashAttentionForwardSm100"}


@pytest.mark.parametrize("arch", ARCHES)
def test_fa4_forward_compiles_for(arch):
    res = run_in_subprocess(arch, "fa4-fwd")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    assert len(lines) == 4, res.stdout
    assert all(ln.endswith(KERNEL_CLASS[arch]) for ln in lines), lines


def test_packed_kv_sm90_kernel_compiles_over_its_matrix():
    """Every K/V bit pair at head_dim 128, plus 64 and 256, masks, pack-GQA by cp.async, fp16 with
    float32 scales, paged (page = tile and not) and varlen: each must compile for sm_90a."""
    from fa4_tq.compile_check import tq_sm90_variants

    res = run_in_subprocess("sm_90a", "tq-sm90")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    want = [label for label, _ in tq_sm90_variants(full=True)]
    assert [ln.split(": ", 1)[1].rsplit(" -> ", 1)[0] for ln in lines] == want, lines
    assert all(ln.endswith("FlashAttentionForwardSm90TQ") for ln in lines), lines


def test_packed_kv_sm100_kernel_compiles_over_its_matrix():
    """The SM100 subclass (compile-checked only: no Blackwell GPU here): every K/V bit pair at
    head_dim 128, a subset at 64, a batch-layout cache, non-causal MHA, fp16 with float32 scales,
    each compiled for sm_100a."""
    from fa4_tq.compile_check import tq_sm100_variants

    res = run_in_subprocess("sm_100a", "tq-sm100")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    assert [ln.split(": ", 1)[1].rsplit(" -> ", 1)[0] for ln in lines] == [lb for lb, _ in tq_sm100_variants()]
    assert all(ln.endswith("FlashAttentionForwardSm100TQ") for ln in lines), lines


@pytest.mark.parametrize("arch", ARCHES)
def test_cache_write_kernel_compiles_for(arch):
    """The online cache-write kernel (every width, head_dim 64-512, fp16 + float32 scales, int64
    slots) compiles for Hopper and Blackwell."""
    from fa4_tq.compile_check import cache_write_variants

    res = run_in_subprocess(arch, "cache-write")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    assert [ln.split(": ", 1)[1].rsplit(" -> ", 1)[0] for ln in lines] == [lb for lb, _ in cache_write_variants()]
    assert all(ln.endswith("CacheWrite") for ln in lines), lines


def test_decode_split_path_compiles_for_sm90():
    """flash_attn_with_kvcache's kernels: the non-causal chunk kernel at every bit pair (and
    head_dim 64), the causal verification tail, and the split combine on bf16 partials."""
    from fa4_tq.compile_check import decode_variants

    res = run_in_subprocess("sm_90a", "decode")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    assert [ln.split(": ", 1)[1].rsplit(" -> ", 1)[0] for ln in lines] == [lb for lb, _ in decode_variants()]
    for ln, (_, kw) in zip(lines, decode_variants()):
        assert ln.endswith("SplitCombine" if kw is None else "FlashAttentionForwardSm90TQ"), ln


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
def test_decode_kernel_compiles(arch):
    """The decode kernel (kernels/decode.py; run on SM90, compile-checked for sm_100a too): every
    2/3/4/8-bit pair at head_dim 128, head_dim 64, verification rows, fp16 with float32 scales, and the split
    combine on its float32 partials; and five of them merging their splits in the kernel."""
    from fa4_tq.compile_check import decode_kernel_variants

    res = run_in_subprocess(arch, "decode-kernel")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    assert [ln.split(": ", 1)[1].rsplit(" -> ", 1)[0] for ln in lines] == [lb for lb, _ in decode_kernel_variants()]
    for ln, (_, kw) in zip(lines, decode_kernel_variants()):
        assert ln.endswith("SplitCombine" if kw is None else "PackedDecode"), ln


def test_mla_prefill_kernel_compiles_for_sm90():
    """mla's SM90 kernel: bf16 and every packed latent width, heads 16/64/128, causal and not, and
    the variants behind switches that are off by default."""
    from fa4_tq.compile_check import mla_sm90_switch_variants, mla_variants

    res = run_in_subprocess("sm_90a", "mla")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    expected = [lb for lb, _ in mla_variants() + mla_sm90_switch_variants()]
    assert [ln.split(": ", 1)[1].rsplit(" -> ", 1)[0] for ln in lines] == expected
    assert all(ln.endswith("FlashMLAForwardSm90") for ln in lines), lines


def test_mla_prefill_kernel_compiles_for_sm100():
    """mla's SM100 subclass of FA4's 2-CTA MLA forward (compile-checked only: no Blackwell GPU
    here): bf16 and every packed latent width, heads 16/64/128, causal and not, for sm_100a."""
    from fa4_tq.compile_check import mla_variants

    res = run_in_subprocess("sm_100a", "mla-sm100")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    assert [ln.split(": ", 1)[1].rsplit(" -> ", 1)[0] for ln in lines] == [lb for lb, _ in mla_variants()]
    assert all(ln.endswith("FlashMLAForwardSm100") for ln in lines), lines


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="needs ptxas (a CUDA toolkit)")
def test_ptxas_report_reads_registers_and_spills(tmp_path):
    """compile_check --ptxas's report on a kept PTX (a trivial kernel here: it uses no stack)."""
    from fa4_tq.compile_check import ptxas_report

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "k.sm_90a.ptx").write_text(
        ".version 8.0\n.target sm_90a\n.address_size 64\n.visible .entry k()\n{\n ret;\n}\n")
    line, missing = ptxas_report(str(tmp_path), "sm_90a", ["trivial", "absent"])
    assert line.startswith("PTXAS trivial: ") and "spill stores/loads 0/0 bytes" in line, line
    assert "serialised" not in line and "exit" not in line, line
    assert missing == "PTXAS absent: no PTX kept"


def test_ptxas_summary_names_serialised_wgmma():
    """The note ptxas 13.0 printed for the skip-softmax kernels while their P.V wgmma sat in a
    run-time branch: the report must name it (it once looked for C7519 only)."""
    from fa4_tq.compile_check import ptxas_summary

    text = ("ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized "
            "due to program dependence on compiler-inserted WG.AR in divergent path in the function 'k'\n"
            "ptxas info    : Used 168 registers, used 16 barriers\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    assert ptxas_summary(text) == "168 registers, spill stores/loads 0/0 bytes, wgmma serialised (C7520)"
    assert ptxas_summary(text.replace("C7520", "C7519"), 1).endswith("(C7519), ptxas exit 1")
    assert "serialised" not in ptxas_summary(text.splitlines(True)[1])


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="needs ptxas (a CUDA toolkit)")
def test_decode_kernels_keep_wgmma_asynchronous():
    """Every decode variant, skip-softmax included, compiles for sm_90a without spills and without
    serialised wgmma: a wgmma in a run-time branch (a gated P.V) serialises them all."""
    from fa4_tq.compile_check import decode_variants

    res = run_in_subprocess("sm_90a", "decode", "--ptxas")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("PTXAS")]
    assert len(lines) == len(decode_variants()) and not any("no PTX kept" in ln for ln in lines), lines
    bad = [ln for ln in lines if "serialised" in ln or "spill stores/loads 0/0 bytes" not in ln]
    assert not bad, bad
