// Measurement only (benchmarks/bench_sparse_tc.py): the peak rates of the warp-level sparse and dense tensor-core
// instructions, to put the GEMMs' rates in proportion. Compiled appended to vnm_compile/kernels/csrc/vnm_mma_sp.cu
// (it uses that file's mma_sp), never by the package.
// Peak-rate probes: every warp runs `iters` x 8 independent mma on registers.
extern "C" __global__ void peak_mma_sp(float* out, int iters) {
    u32x4 a = {threadIdx.x, threadIdx.x * 3u, 7u, 9u};
    u32 b[4] = {threadIdx.x, 5u, 11u, 13u};
    u32 e = 0x44444444u;
    float c[8][4] = {};
    for (int i = 0; i < iters; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) mma_sp<0>(c[j], a, b, e);
    float s = 0.f;
    for (int j = 0; j < 8; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
extern "C" __global__ void peak_mma(float* out, int iters) {
    u32 a[4] = {threadIdx.x, threadIdx.x * 3u, 7u, 9u};
    u32 b[2] = {threadIdx.x, 5u};
    float c[8][4] = {};
    for (int i = 0; i < iters; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                         : "+f"(c[j][0]), "+f"(c[j][1]), "+f"(c[j][2]), "+f"(c[j][3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    float s = 0.f;
    for (int j = 0; j < 8; ++j) s += c[j][0] + c[j][1] + c[j][2] + c[j][3];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
