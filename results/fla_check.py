"""Does the benchmark's ``fla`` implementation compute LION? (a GPU and flash-linear-attention needed)

    pip install fla-core==0.6.0 && python results/fla_check.py

``lionedu.bench``'s ``fla`` composes flash-linear-attention's causal chunk kernel
(``chunk_simple_gla``) into bidirectional masked linear attention: a forward pass, a pass over
the reversed sequence with the decays shifted by one, and the diagonal subtracted; it has no
normaliser. This script compares it, and lionedu's kernels with ``normalize=False``, against
the float64 attention form (``lionedu.vectorized.attention``) for every variant, causal and
bidirectional, in bfloat16 (B = 2, H = 4, L = 1000, D = Dv = 64): the maximum error relative to
the largest output. results/fla-check-h200.log is its output on the H200.
"""
import torch

from lionedu import bench, kernels, vectorized


def main():
    import fla

    print("fla", fla.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
    fla_layer = bench.implementation("fla")
    for variant in ("s", "d", "lit"):
        for causal in (False, True):
            q, k, v, ld = bench.make_inputs(variant, 2, 4, 1000, 64, 64, torch.bfloat16)
            with torch.no_grad():
                ref = vectorized.attention(q.double(), k.double(), v.double(), None if ld is None else ld.double(),
                                           causal=causal, normalize=False)
                composed = fla_layer(q, k, v, ld, causal)
                ours = kernels.chunkwise(q, k, v, ld, causal=causal, normalize=False, check_values=False)
            error = lambda y: ((y.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
            print(f"{variant} causal={causal}: fla-bidirectional vs float64 {error(composed):.2e}; "
                  f"lionedu (unnormalised) {error(ours):.2e}")


if __name__ == "__main__":
    main()
