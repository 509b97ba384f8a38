"""A/B: training forward (states per chunk) vs span forward (checkpoints), CUDA-graph timing."""
import sys, time, torch
from triton.testing import do_bench
from lionedu import bench, vectorized
from lionedu.kernels import autograd as A, inference as I
from lionedu.kernels.launch import ceil_div, kernel_flags
from lionedu.kernels.spans import span_record_size
sys.path.insert(0, "results")
from profile_kernels import kernel_times

def span_fwd(q, k, v, g, causal, normalize, C, G, warps_out=None, stages_out=2, warps_sums=None, stages_sums=2):
    BH, L, DK = q.shape; DV = v.shape[-1]; N = ceil_div(L, C); P = ceil_div(N, G)
    slots = 1 if causal else 2; rec = span_record_size(DK, DV)
    sums = torch.empty(slots, BH, P, rec, device=q.device, dtype=torch.float32)
    sd = torch.empty(BH, P, device=q.device, dtype=torch.float32) if g is not None else sums
    flags = kernel_flags(q, g, C); ga = q if g is None else g; bdv = min(DV, 64)
    w = 8 if max(DK, DV) > 64 else 4
    I._launch_sums((P, BH), k, v, ga, sums, sd, L, N, P, BIDIRECTIONAL=not causal, SPAN=G, DK=DK, DV=DV, BLOCK_DV=bdv,
                   num_warps=warps_sums or w, num_stages=stages_sums, **flags)
    I._launch_carries((BH, slots, ceil_div(rec, 1024)), sums, sd, P, RECORD=rec, HAS_DECAY=g is not None, BLOCK=1024,
                      num_warps=4, num_stages=2)
    out = torch.empty(BH, L, DV, device=q.device, dtype=v.dtype)
    I._launch_output((N, BH), q, k, v, ga, sums, out, L, N, P, BIDIRECTIONAL=not causal, NORMALIZE=normalize, SPAN=G,
                     DK=DK, DV=DV, BLOCK_DV=bdv, num_warps=warps_out or w, num_stages=stages_out, **flags)
    return out

def prep(variant, L, dtype=torch.bfloat16, B=4, H=16, D=64):
    q, k, v, ld = bench.make_inputs(variant, B, H, L, D, D, dtype)
    q_, k_, v_ = (A._flatten(t, 64) for t in (q, k, v))
    return (q, k, v, ld), (q_, k_, v_)

def t(fn):
    with torch.no_grad():
        return do_bench(bench.graph_replay(fn), warmup=25, rep=100, return_mode="median")

bw = bench.copy_bandwidth_tbps()
print(torch.cuda.get_device_name(), torch.__version__, "copy", round(bw, 3), "TB/s", flush=True)

# ---- correctness against float64 (bf16 and fp32), both paths --------------------------------
for dtype in (torch.bfloat16, torch.float32):
    for variant in ("s", "d", "lit"):
        for causal in (False, True):
            for L in (1000, 4096):
                (q, k, v, ld), _ = prep(variant, L, dtype, B=2, H=4)
                with torch.no_grad():
                    ref = vectorized.attention(q.double(), k.double(), v.double(), None if ld is None else ld.double(), causal=causal)
                    y_tr = A.attention_forward(q, k, v, ld, causal, True, 64, 64)[0]
                    errs = [(y_tr.double() - ref).abs().max().item() / ref.abs().max().item()]
                    for G in (1, 2, 4, 8):
                        y = I.inference_forward(q, k, v, ld, causal, True, 64, 64, span_chunks=G)
                        errs.append((y.double() - ref).abs().max().item() / ref.abs().max().item())
                print("err", dtype, variant, causal, L, "train %.2e" % errs[0], "span G=1,2,4,8", " ".join("%.2e" % e for e in errs[1:]), flush=True)

# ---- timing -------------------------------------------------------------------------------
for L in (1024, 4096, 16384):
    for variant, causal in (("s", False), ("s", True), ("d", False), ("lit", False)):
        if L != 4096 and variant != "s":
            continue
        (q, k, v, ld), (q_, k_, v_) = prep(variant, L)
        g = A.chunk_log_decay_sums(ld, 4, 16, L, 64)
        floor = bench.floor_ms(variant, 4, 16, L, 64, 64, torch.bfloat16, bw)
        res = {}
        for rep in range(2):
            res.setdefault("train", []).append(t(lambda: A.attention_forward(q, k, v, ld, causal, True, 64, 64)))
            for G in (2, 4, 8, 16):
                res.setdefault(f"G{G}", []).append(t(lambda: span_fwd(q_, k_, v_, g, causal, True, 64, G)))
            res.setdefault("G4 full", []).append(t(lambda: I.inference_forward(q, k, v, ld, causal, True, 64, 64, span_chunks=4)))
        line = " ".join(f"{k_}={min(vs)*1e3:.1f}us({min(vs)/floor:.2f}x)" for k_, vs in res.items())
        print(f"L={L} {variant} causal={causal} floor={floor*1e3:.1f}us {line}", flush=True)

# ---- launch settings at 4096, LION-S bidirectional ------------------------------------------
(q, k, v, ld), (q_, k_, v_) = prep("s", 4096)
g = A.chunk_log_decay_sums(ld, 4, 16, 4096, 64)
floor = bench.floor_ms("s", 4, 16, 4096, 64, 64, torch.bfloat16, bw)
for G in (4, 8):
    for wo, so, ws, ss in ((4, 2, 4, 2), (8, 2, 4, 2), (4, 1, 4, 2), (4, 3, 4, 2), (4, 2, 8, 2), (4, 2, 4, 3), (4, 2, 4, 1)):
        ms = min(t(lambda: span_fwd(q_, k_, v_, g, False, True, 64, G, wo, so, ws, ss)) for _ in range(2))
        print(f"cfg G={G} out warps={wo} stages={so} sums warps={ws} stages={ss}: {ms*1e3:.1f}us ({ms/floor:.2f}x)", flush=True)

# ---- per-kernel GPU time ------------------------------------------------------------------
for L in (4096, 16384):
    (q, k, v, ld), (q_, k_, v_) = prep("s", L)
    for G in (4, 8):
        with torch.no_grad():
            times = kernel_times(lambda: I.inference_forward(q, k, v, ld, False, True, 64, 64, span_chunks=G))
        print(f"profile L={L} G={G}:", "; ".join(f"{n[:40]} {c:.0f}x{us:.1f}us" for n, (c, us) in times.items()), flush=True)
    with torch.no_grad():
        times = kernel_times(lambda: A.attention_forward(q, k, v, ld, False, True, 64, 64))
    print(f"profile L={L} train:", "; ".join(f"{n[:40]} {c:.0f}x{us:.1f}us" for n, (c, us) in times.items()), flush=True)

# few sequences
for L in (16384, 65536):
    (q, k, v, ld), (q_, k_, v_) = prep("s", L, B=1, H=8)
    g = A.chunk_log_decay_sums(ld, 1, 8, L, 64)
    floor = bench.floor_ms("s", 1, 8, L, 64, 64, torch.bfloat16, bw)
    r = {"train": t(lambda: A.attention_forward(q, k, v, ld, False, True, 64, 64))}
    for G in (2, 4, 8, 16):
        r[f"G{G}"] = t(lambda: span_fwd(q_, k_, v_, g, False, True, 64, G))
    print(f"few B=1 H=8 L={L}", " ".join(f"{k_}={v_*1e3:.1f}us({v_/floor:.2f}x)" for k_, v_ in r.items()), flush=True)
