// Overhead probe for libvgpu.so: empty-kernel launch cost and cudaMalloc+cudaFree of 1 MiB.
// Built by bench/gpu_memory.sh with nvcc; run natively, with the shim preloaded and no
// limits (pass-through), and with an active quota.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

__global__ void empty_kernel() {}

static double now_us()
{
    using namespace std::chrono;
    return duration<double, std::micro>(steady_clock::now().time_since_epoch()).count();
}

#define CHECK(call)                                                                     \
    do {                                                                                \
        cudaError_t e_ = (call);                                                        \
        if (e_ != cudaSuccess) {                                                        \
            std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(e_));     \
            return 1;                                                                   \
        }                                                                               \
    } while (0)

int main(int argc, char **argv)
{
    int launches = argc > 1 ? std::atoi(argv[1]) : 200000;
    int mallocs = argc > 2 ? std::atoi(argv[2]) : 5000;
    CHECK(cudaFree(nullptr));
    for (int i = 0; i < 1000; i++)
        empty_kernel<<<1, 1>>>();
    CHECK(cudaDeviceSynchronize());

    double t0 = now_us();
    for (int i = 0; i < launches; i++)
        empty_kernel<<<1, 1>>>();
    CHECK(cudaDeviceSynchronize());
    double launch_us = (now_us() - t0) / launches;

    t0 = now_us();
    for (int i = 0; i < 2000; i++) {
        empty_kernel<<<1, 1>>>();
        CHECK(cudaDeviceSynchronize());
    }
    double launch_sync_us = (now_us() - t0) / 2000;

    void *p = nullptr;
    for (int i = 0; i < 100; i++) {
        CHECK(cudaMalloc(&p, 1 << 20));
        CHECK(cudaFree(p));
    }
    t0 = now_us();
    for (int i = 0; i < mallocs; i++) {
        CHECK(cudaMalloc(&p, 1 << 20));
        CHECK(cudaFree(p));
    }
    double malloc_us = (now_us() - t0) / mallocs;
    std::printf("launch_us %.4f\nlaunch_sync_us %.4f\nmalloc_free_us %.4f\n", launch_us,
                launch_sync_us, malloc_us);
    return 0;
}
