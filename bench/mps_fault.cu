// A client whose kernel writes through a bad pointer: an illegal-address fault, the kind
// that under MPS tears down every client of the server (bench/observer_bench.py, fault).
#include <cstdio>

__global__ void bad(int *p) { *p = 1; }

int main()
{
    bad<<<1, 1>>>(reinterpret_cast<int *>(0x10));
    cudaError_t e = cudaDeviceSynchronize();
    printf("faulting client: %s\n", cudaGetErrorString(e));
    return 0;
}
