"""The Triton kernels (refinement; the blocks' qk-norm + RoPE; CUDA-only in production) run
here in Triton's CPU interpreter (``TRITON_INTERPRET=1``) against the torch path they replace.

Each check runs in a subprocess: the interpreter is chosen when a kernel is defined, so the
variable must be set before ``_knn_triton`` / ``_kmeans_triton`` are imported - and must not
leak into the other tests. Triton comes with a CUDA torch; scripts/setup_env.sh installs the
device's version (3.6.0) next to a CPU torch for these tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_interpreted(code: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lloyd_step_kernel_matches_torch_step():
    """One fused Lloyd step = the torch assignment + scatter-add sums: same labels, counts and
    (up to float32 summation order) sums, with inactive centres and invalid points."""
    out = _run_interpreted("""
        import json, torch
        from vggt4d_ros.dynamic import _kmeans_triton as km
        from vggt4d_ros.dynamic import refine_fast as rf
        torch.manual_seed(0)
        s, q, k = 3, 700, 30
        x = torch.randn(s, q, 3)
        valid = torch.rand(s, q) > 0.2
        valid[2, 10:] = False                       # 10 points: only 10 active centres
        ref = rf._LloydIterations(x.double(), valid, k, 1)
        c = x[:, :k].clone()
        own, lab, sums, counts = km.lloyd_step(x, valid, c, km.centre_penalty(ref.active),
                                               block_q=128)
        own_t, lab_t = ref.assign(c.double())
        _, sums_t, counts_t = ref.step(c.double())
        print(json.dumps({
            "labels_differ": int((lab != lab_t)[valid].sum()),
            "own_err": float((own.double() - own_t)[valid].abs().max()),
            "sums_err": float((sums.double() - sums_t).abs().max()),
            "counts_equal": bool(torch.equal(counts.double(), counts_t)),
            "inactive_empty": bool((counts[2, 10:] == 0).all()),
            "labels_active": bool(ref.active.gather(1, lab)[valid].all())}))
    """)
    assert out["labels_differ"] == 0
    assert out["own_err"] < 1e-5 and out["sums_err"] < 1e-4
    assert out["counts_equal"] and out["inactive_empty"] and out["labels_active"]


def test_batched_kmeans_through_the_kernel_matches_torch_path():
    """batched_kmeans with the Triton Lloyd step (as on CUDA) gives the torch path's clusters
    (same seeding; float32 both; labels equal up to near-ties)."""
    out = _run_interpreted("""
        import json, torch
        from vggt4d_ros.dynamic import _kmeans_triton as km
        from vggt4d_ros.dynamic import refine_fast as rf
        torch.manual_seed(1)
        s, q = 2, 600
        centres = torch.randn(s, 8, 3) * 4
        x = (centres.repeat_interleave(q // 8, 1) + 0.3 * torch.randn(s, q, 3)).float()
        valid = torch.rand(s, q) > 0.1
        def run(kernel):
            rf._triton_kmeans = (lambda pts: km) if kernel else (lambda pts: None)
            g = torch.Generator().manual_seed(3)
            return rf.batched_kmeans(x, valid, 8, g, iters=10)
        lab_k, act_k = run(True)
        lab_t, act_t = run(False)
        print(json.dumps({"agree": float((lab_k == lab_t)[valid].float().mean()),
                          "active_equal": bool(torch.equal(act_k, act_t))}))
    """)
    assert out["active_equal"]
    assert out["agree"] > 0.999


def test_knn_kernels_match_torch_path():
    """Block minima and the mean distance to the k nearest references (arg-min selection, the
    default) equal the portable torch path, with padded (far) references in one frame."""
    out = _run_interpreted("""
        import json, torch
        from vggt4d_ros.dynamic import _knn_triton as kn
        from vggt4d_ros.dynamic import refine_fast as rf
        torch.manual_seed(0)
        s, q, r = 2, 40, 512
        qs, refs = torch.randn(s, q, 3), torch.randn(s, r, 3)
        refs[1, 500:] = rf._FAR
        rb = refs.reshape(s, r // 16, 16, 3)
        bm = kn.block_min_sq_dists(qs, rb)
        bm_t = rf._block_min_sq_dists(qs, rb)
        kn.MEAN_BY_SORT = False
        mean = kn.knn_mean_from_block_min(qs, rb, bm, 20, rf._FAR_TEST)
        mean_t = rf._knn_mean_from_block_min(qs, rb, bm_t, 20)
        print(json.dumps({"block_min_err": float((bm - bm_t).abs().max()),
                          "mean_err": float((mean - mean_t).abs().max())}))
    """)
    assert out["block_min_err"] < 1e-5
    assert out["mean_err"] < 1e-5


def test_kernels_are_not_specialised_on_the_query_count():
    """The query count changes with every window; a kernel specialised on it (Triton's
    default: divisible by 16 or not) compiled again mid-stream - a 13.4 s window on the H100
    (docs/BENCHMARKS.md, run 21)."""
    from vggt4d_ros.dynamic import _kmeans_triton, _knn_triton
    from vggt4d_ros.model.layers import _qk_rope_triton
    for kernel in (_knn_triton._block_min_kernel, _knn_triton._knn_mean_kernel,
                   _kmeans_triton._lloyd_step_kernel):
        assert "num_q" in kernel.do_not_specialize, kernel
    assert "t" in _qk_rope_triton._qk_norm_rope_kernel.do_not_specialize


def test_qk_norm_rope_kernel_matches_the_block_functions():
    """The fused qk-norm + RoPE kernel = ``attention_inputs``' qk-norm and RoPE (float32:
    to rounding; bf16 in and out: to bf16 resolution), with and without RoPE tables; and a
    tiny VGGT's fused block path with the kernel gives the module path's outputs."""
    out = _run_interpreted("""
        import json, torch
        import torch.nn.functional as F
        from vggt4d_ros.model.layers import block as block_mod
        from vggt4d_ros.model.layers._qk_rope_triton import qk_norm_rope
        from vggt4d_ros.model.layers.fused import attention_inputs
        from vggt4d_ros.model.layers.rope import RotaryPositionEmbedding2D
        torch.manual_seed(0)
        b, heads, d, gh, gw, p = 2, 4, 16, 3, 5, 5
        t, c = p + gh * gw, heads * d
        x = torch.randn(b, t, c)
        nw, nb = torch.randn(c) * 0.1 + 1, torch.randn(c) * 0.1
        qkv_w, qkv_b = torch.randn(3 * c, c) * 0.2, torch.randn(3 * c) * 0.1
        qn_w, qn_b = torch.randn(d) * 0.2 + 1, torch.randn(d) * 0.1
        kn_w, kn_b = torch.randn(d) * 0.2 + 1, torch.randn(d) * 0.1
        tabs = RotaryPositionEmbedding2D(100.0).tables(gh, gw, p, d, "cpu")
        qkv = F.linear(F.layer_norm(x, (c,), nw, nb, 1e-5), qkv_w, qkv_b)
        out = {}
        for name, cos, sin in (("rope", tabs.cos, tabs.sin), ("plain", None, None)):
            want = attention_inputs(x, nw, nb, 1e-5, qkv_w, qkv_b, heads, qn_w, qn_b, kn_w,
                                    kn_b, 1e-6, cos, sin)
            got = qk_norm_rope(qkv, heads, qn_w, qn_b, kn_w, kn_b, 1e-6, cos, sin,
                               torch.float32)
            low = qk_norm_rope(qkv.bfloat16(), heads, qn_w, qn_b, kn_w, kn_b, 1e-6, cos, sin,
                               torch.bfloat16)
            out[name] = [float((g - w).abs().max()) for g, w in zip(got, want)]
            out[name + "_rel_bf16"] = max(float(((g.float() - w).abs() / (w.abs() + 1)).max())
                                          for g, w in zip(low[:2], want[:2]))
            out[name + "_dtypes"] = [str(low[0].dtype), str(got[0].dtype)]
        from vggt4d_ros.model.config import VGGTConfig
        from vggt4d_ros.model.vggt import VGGT
        from vggt4d_ros.stream.factory import TINY_VGGT_CONFIG
        model = VGGT(VGGTConfig.from_dict(TINY_VGGT_CONFIG), enable_track=False).eval()
        images = torch.rand(3, 3, 28, 42)
        calls = []
        block_mod._qk_kernel_usable = lambda x: calls.append(1) or True
        with torch.no_grad():
            plain = model(images)
            model.use_fused_blocks(True)
            model.fused_functions.qk_rope_kernel = True
            fused = model(images)
        out["calls"] = len(calls)
        out["model"] = max(float((plain[k] - fused[k]).abs().max())
                           for k in ("pose_enc", "depth", "world_points"))
        print(json.dumps(out))
    """)
    for name in ("rope", "plain"):
        assert max(out[name][:2]) < 1e-5 and out[name][2] == 0.0, out
        assert out[name + "_rel_bf16"] < 2e-2, out
        assert out[name + "_dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert out["calls"] > 0 and out["model"] < 1e-4, out
