// Launch-overhead probe for the compute limiter: enqueue cost of an empty kernel.
// Built by bench/gpu_compute.sh with nvcc; run natively, preloaded at share 100 %
// (the count-only fast path) and preloaded at a share that never throttles it (the
// full GCRA path: clock read, CAS, sparse calibration events).  Prints one number:
// microseconds per launch (enqueue throughput, synchronised at the end).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

__global__ void empty_kernel() {}

int main(int argc, char **argv)
{
    int launches = argc > 1 ? std::atoi(argv[1]) : 100000;
    if (cudaFree(nullptr) != cudaSuccess)
        return 1;
    for (int i = 0; i < 2000; i++)
        empty_kernel<<<1, 1>>>();
    if (cudaDeviceSynchronize() != cudaSuccess)
        return 1;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < launches; i++)
        empty_kernel<<<1, 1>>>();
    if (cudaDeviceSynchronize() != cudaSuccess)
        return 1;
    std::chrono::duration<double, std::micro> us = std::chrono::steady_clock::now() - t0;
    std::printf("%.4f\n", us.count() / launches);
    return 0;
}
