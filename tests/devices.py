"""Where the tests run the Triton kernels."""
import torch

# A CUDA GPU if there is one, else the CPU, where the kernels run through Triton's interpreter
# (conftest.py switches it on before triton is imported).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
