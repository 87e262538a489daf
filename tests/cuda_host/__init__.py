"""CUDA's execution model on the host, for running pgext's CUDA kernels in the tests (see cuda_host.h)."""
