// Experimental V:N:M (n = 2) GEMM on the sparse tensor cores (legacy warp-level mma.sp.m16n8k32), compiled at
// run time with NVRTC by vnm_compile/kernels/sparse_tc.py: y[t, o] = sum_k x[t, k] W[o, k] (+ bias[o]).
//
// Each 64-row V block is one warp row (4 m16 tiles); a warp covers NT 8-token n-tiles. Every k-step takes
// 8 groups of the block: 32 kept columns, 2:4 inside each group's 4 -> one mma.sp k32. A STAGES-deep cp.async
// pipeline brings, per (block, k-step), the pre-packed A fragments + metadata (one REC-byte record, written
// by sparse_tc.pack_sparse_tc) and the activations, as x^T (feature-major, tokens contiguous, 16-byte
// chunks XOR-swizzled so ldmatrix.trans reads them without bank conflicts). Two kernels differ in how the
// activations arrive:
// - vnm_mma_sp_gemm ("gather"): per (block, k-step) the block's 32 kept rows of x^T, gathered by cp.async
//   through indices held in shared memory (absolute input columns, so an input permutation costs nothing);
//   every V block of a CTA reads its own copy.
// - vnm_mma_sp_dense ("dense"): per k-step the 8 groups' GM candidate rows of x^T (x^T stored group-major,
//   input permutation applied by the transpose), one copy shared by the CTA's WR V blocks; each lane's
//   ldmatrix row address picks its kept column (the record's 32 local row numbers). Loads 8 GM rows per
//   k-step instead of 32 WR: less L2 traffic when WR > GM / 4.
// The epilogue adds the bias and stages the tile in shared memory for 16-byte token-major stores (or
// scatters through row_index, the output permutation). Compile-time: WR (V blocks per CTA), WN (warps
// along tokens), NT, STAGES, KSUB (k-steps per pipeline stage), MINB (launch bounds), BF16, GM (dense).
typedef unsigned int u32;
typedef unsigned short u16;

#ifndef WR
#define WR 2
#endif
#ifndef WN
#define WN 2
#endif
#ifndef NT
#define NT 8
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef BF16
#define BF16 0
#endif
#ifndef KSUB
#define KSUB 1
#endif
#ifndef ORDERED
#define ORDERED 1  // mma.sp::ordered_metadata (the two positions of a group ascending, as the packer writes)
#endif
#if ORDERED
#define SPVAR ".sp::ordered_metadata"
#else
#define SPVAR ".sp"
#endif
#ifndef MINB
#define MINB 1
#endif
#define MT 4
#define TN (8 * NT * WN)          // tokens per CTA
#define CH (TN / 8)               // 16-byte chunks per x^T row
#define SWZ (CH < 8 ? CH - 1 : 7)
#ifndef REC
#define REC 2336                  // record: A fragments 2048, metadata 256, 32 local x^T rows (dense kernel)
#endif                            // REC=2304: compact records without the local rows (no dense kernel)
#define EOFS 2048                 // the metadata: 2 words per lane, word p for m16 tiles 2p (lanes 4g, 4g + 1)
                                  // and 2p + 1 (lanes 4g + 2, 4g + 3: sparsity selector 1)
#define XB (32 * KSUB * TN * 2)   // bytes of one block's gathered x^T tile (KSUB sub-steps)
#define AB (REC * KSUB)           // bytes of one block's records per stage
#define STAGE_BYTES (WR * (XB + AB))
#define NTHREADS (WR * WN * 32)
#define XLOADS ((32 * KSUB * CH + NTHREADS - 1) / NTHREADS)  // x^T chunks per thread per block

struct u32x4 { u32 x, y, z, w; };

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
// SEL: the sparsity selector, which two lanes of each quad give the metadata (0: the first two, 1: the last two)
template <int SEL>
__device__ __forceinline__ void mma_sp(float* c, const u32x4& a, const u32* b, u32 e) {
#if BF16
    asm volatile("mma" SPVAR ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
#else
    asm volatile("mma" SPVAR ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
#endif
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
                   "n"(SEL));
}
// m16 tile mt of a 64-row block: its metadata is word mt / 2, selector mt % 2
__device__ __forceinline__ void mma_sp_tile(int mt, float* c, const u32x4& a, const u32* b, u32 e) {
    if (mt & 1)
        mma_sp<1>(c, a, b, e);
    else
        mma_sp<0>(c, a, b, e);
}
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}
__device__ __forceinline__ float from_half(u16 h) {
#if BF16
    return __int_as_float((int)(((u32)h) << 16));
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// One k-step's operands of one warp, from its record at `as` (shared): the A fragments and metadata of its
// 4 m16 tiles, and (dense kernel) the x^T row of this lane's kept column.
struct Frags {
    u32x4 a[MT];
    u32 e[MT / 2];
    int row;
};
__device__ __forceinline__ void load_frags(Frags& f, const unsigned char* as) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) f.a[mt] = reinterpret_cast<const u32x4*>(as)[mt * 32 + lane];
#pragma unroll
    for (int p = 0; p < MT / 2; ++p) f.e[p] = reinterpret_cast<const u32*>(as + EOFS)[p * 32 + lane];
#if REC > EOFS + 256
    f.row = as[EOFS + 256 + lane];
#else
    f.row = 0;  // compact records: no local rows (only the dense kernel reads them)
#endif
}
// B (k32 x n8 per n-tile) by ldmatrix.trans from the row addresses in baddr (this lane's kept column), then
// the warp's 4 x NT mma.sp.
__device__ __forceinline__ void mma_frags(float (&acc)[MT][NT][4], const Frags& f, const u32 (&baddr)[NT]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        u32 b[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                     : "r"(baddr[nt]));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_sp_tile(mt, acc[mt][nt], f.a[mt], b, f.e[mt >> 1]);
    }
}
__device__ __forceinline__ void mma_step(float (&acc)[MT][NT][4], const unsigned char* as, const u32 (&baddr)[NT]) {
    Frags f;
    load_frags(f, as);
    mma_frags(acc, f, baddr);
}

// Epilogue of one warp (V block blk, tokens tbase ..): bias, then through shared memory (`tile`, 8 NT token
// rows of 72 halfs) as [token][64 rows] so each token's 64 outputs go out as 16-byte stores (without an
// output permutation), else one element at a time through row_index.
__device__ __forceinline__ void store_tile(const float (&acc)[MT][NT][4], u16* tile, int blk, int tbase, int T,
                                           u16* __restrict__ y, int ldy, int R, const u16* __restrict__ bias,
                                           int has_bias, const int* __restrict__ row_index, int has_rows) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    float bv[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int o = blk * 64 + mt * 16 + g + 8 * h;
            int orow = o < R ? (has_rows ? row_index[o] : o) : -1;
            bv[mt][h] = (has_bias && orow >= 0) ? from_half(bias[orow]) : 0.f;
        }
    const int PITCH = 72;  // halfs per staged token row (64 + 8 pad)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 pr = pack2(acc[mt][nt][2 * h] + bv[mt][h], acc[mt][nt][2 * h + 1] + bv[mt][h]);
                const int col = mt * 16 + g + 8 * h, tk = nt * 8 + 2 * q;
                tile[tk * PITCH + col] = (u16)(pr & 0xFFFF);
                tile[(tk + 1) * PITCH + col] = (u16)(pr >> 16);
            }
    __syncwarp();
    if (!has_rows && blk * 64 + 64 <= R && (ldy & 7) == 0) {
        // 8 lanes per token row (8 x 16 bytes), 4 rows per pass
#pragma unroll
        for (int p = 0; p < 2 * NT; ++p) {
            const int tk = p * 4 + (lane >> 3), c8 = (lane & 7) * 8;
            const int t = tbase + tk;
            if (t < T)
                *reinterpret_cast<u32x4*>(y + (size_t)t * ldy + blk * 64 + c8) =
                    *reinterpret_cast<const u32x4*>(tile + tk * PITCH + c8);
        }
    } else {
        for (int p = 0; p < 8 * NT * 2; ++p) {
            const int tk = p / 2, col = (p & 1) * 32 + lane;
            const int t = tbase + tk, o = blk * 64 + col;
            if (t < T && o < R) {
                const int orow = has_rows ? row_index[o] : o;
                if (orow >= 0) y[(size_t)t * ldy + orow] = tile[tk * PITCH + col];
            }
        }
    }
}

__device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;
}

// Zeroed accumulators, and the pipeline's first STAGES - 1 stages (`load_stage(st, ks)` fills stage index
// st with k-steps ks * KSUB ..), each its own cp.async group: the start of both kernels' main loops.
template <class Load>
__device__ __forceinline__ void start_pipeline(float (&acc)[MT][NT][4], int nsteps, Load load_stage) {
    zero_acc(acc);
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < nsteps) load_stage(st, st);
        asm volatile("cp.async.commit_group;\n");
    }
}

// How a stage's records arrive (the main loop's RECS): by cp.async with the stage's x^T rows (RECS_CP_ASYNC),
// or by bulk copies completing on the stage's mbarrier (the dense kernel's BULK=1), waited for before the
// stage's first k-step (RECS_BULK) or one k-step ahead, the fragments read during the previous k-step's
// mma.sp (RECS_BULK_PF, PF=1).
#define RECS_CP_ASYNC 0
#define RECS_BULK 1
#define RECS_BULK_PF 2
// mbarrier helpers (sm_90; RECS_BULK*)
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// The main loop of both mma.sp GEMMs, after start_pipeline: STAGES - 1 stages in flight, one __syncthreads per
// stage. load_stage(st, ks) fills stage st (stage_bytes from sbase / smem) with k-steps ks * KSUB ..; this
// warp's records sit at aofs in a stage, the stages' mbarriers (RECS_BULK*) at bars, 8 bytes each;
// rows(baddr, s, sub, f) gives this warp's B row addresses for sub-step sub of the stage at shared address s;
// f is that k-step's fragments where FRAGS_FIRST (the dense kernel's rows come from the record) or PF reads
// them first, else (the gather kernel) not yet read.
// A macro, so that each kernel keeps the code it had with a loop of its own: NVRTC's code for the loop depends
// on whether a function holds it (the registers of the accumulators and loop counters come out otherwise, and
// ptxas then allocates and schedules differently), and the gather kernel's loop was in one (main_loop, below),
// the dense kernel's in the kernel itself.
#define MMA_SP_MAIN_LOOP(RECS, FRAGS_FIRST, acc, nsteps, sbase, smem, stage_bytes, aofs, bars, load_stage, rows) \
    {                                                                                                                 \
        Frags cur;                                                                                                    \
        if constexpr ((RECS) == RECS_BULK_PF) {                                                                       \
            mbar_wait(bars, 0);                                                                                       \
            load_frags(cur, smem + aofs);                                                                             \
        }                                                                                                             \
        int use = 0, fill = STAGES - 1; /* stage indices */                                                           \
        for (int ks = 0; ks < nsteps; ++ks) {                                                                         \
            asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));                                              \
            __syncthreads();                                                                                          \
            if (ks + STAGES - 1 < nsteps) load_stage(fill, ks + STAGES - 1);                                          \
            asm volatile("cp.async.commit_group;\n");                                                                 \
            fill = fill == STAGES - 1 ? 0 : fill + 1;                                                                 \
            const u32 s = sbase + use * (stage_bytes);                                                                \
            const unsigned char* sp = smem + use * (stage_bytes);                                                     \
            if constexpr ((RECS) == RECS_BULK) mbar_wait(bars + 8 * use, (ks / STAGES) & 1);                          \
            use = use == STAGES - 1 ? 0 : use + 1;                                                                    \
            _Pragma("unroll") for (int sub = 0; sub < KSUB; ++sub) {                                                  \
                const unsigned char* as = sp + aofs + sub * REC; /* this k-step's records */                          \
                u32 baddr[NT];                                                                                        \
                if constexpr ((RECS) == RECS_BULK_PF) {                                                               \
                    Frags nxt; /* the next k-step's operands, read while this one's mma.sp run */                     \
                    if (sub + 1 < KSUB) {                                                                             \
                        load_frags(nxt, sp + aofs + (sub + 1) * REC);                                                 \
                    } else if (ks + 1 < nsteps) {                                                                     \
                        mbar_wait(bars + 8 * use, ((ks + 1) / STAGES) & 1);                                           \
                        load_frags(nxt, smem + use * (stage_bytes) + aofs);                                           \
                    }                                                                                                 \
                    rows(baddr, s, sub, cur);                                                                         \
                    mma_frags(acc, cur, baddr);                                                                       \
                    cur = nxt;                                                                                        \
                } else if constexpr (FRAGS_FIRST) {                                                                   \
                    load_frags(cur, as);                                                                              \
                    rows(baddr, s, sub, cur);                                                                         \
                    mma_frags(acc, cur, baddr);                                                                       \
                } else {                                                                                              \
                    rows(baddr, s, sub, cur);                                                                         \
                    mma_step(acc, as, baddr);                                                                         \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
        asm volatile("cp.async.wait_group 0;\n");                                                                     \
        __syncthreads(); /* every bulk copy issued was waited for: the epilogue may reuse the pipeline's memory */    \
    }

// The gather kernel's pipeline: start_pipeline, then the main loop (in this function, as it always was).
template <class Load, class Rows>
__device__ __forceinline__ void main_loop(float (&acc)[MT][NT][4], int nsteps, u32 sbase, unsigned char* smem,
                                          int stage_bytes, u32 aofs, Load load_stage, Rows rows) {
    start_pipeline(acc, nsteps, load_stage);
    MMA_SP_MAIN_LOOP(RECS_CP_ASYNC, false, acc, nsteps, sbase, smem, stage_bytes, aofs, 0, load_stage, rows)
}

#if !defined(DECODE) && !defined(WGMMA)  // the mma.sp GEMMs (tiles need NT >= 2 WN ...); not with DECODE=1 or WGMMA=1
// xt: x^T, K rows of ldx elements (tokens contiguous, ldx % 8 == 0, 16-byte aligned).
// rec: [nb][nkc] records of REC bytes; gidx: [nb][nkc][32] u16 absolute input columns.
// y: [T][ldy] (ldy % 8 == 0 for the vector store path). row_index: optional output row of each stored row.
extern "C" __global__ void __launch_bounds__(NTHREADS, MINB) vnm_mma_sp_gemm(
    const u16* __restrict__ xt, int ldx, int T, const u32x4* __restrict__ rec, const u16* __restrict__ gidx,
    int nb, int nkc, u16* __restrict__ y, int ldy, int R, const u16* __restrict__ bias, int has_bias,
    const int* __restrict__ row_index, int has_rows) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wr = warp / WN, wn = warp % WN;
    const int blk0 = blockIdx.x * WR;
    const int t0 = blockIdx.y * TN;
    const u32 sbase = smem_addr(smem);

    // the CTA's gather indices (nkc * 32 per block, u16) live in shared memory after the pipeline
    const int nsteps = nkc / KSUB;  // nkc is a multiple of KSUB (packer pads)
    u16* itab = reinterpret_cast<u16*>(smem + STAGES * STAGE_BYTES);
    {
        const u32 ib = sbase + STAGES * STAGE_BYTES;
        const int chunks = nkc * 32 * 2 / 16;  // per block
        for (int b = 0; b < WR; ++b) {
            const int blk = min(blk0 + b, nb - 1);
            const char* src = reinterpret_cast<const char*>(gidx + (size_t)blk * nkc * 32);
            for (int j = tid; j < chunks; j += NTHREADS) cp_async16(ib + (b * chunks + j) * 16, src + j * 16, 16);
        }
        asm volatile("cp.async.commit_group;\n");
        asm volatile("cp.async.wait_group 0;\n");
        __syncthreads();
    }
    // Producer constants. Thread tid copies x^T chunk ch = tid % CH (the same 8 tokens every time) of rows
    // r_i = tid / CH + i * NTHREADS / CH of every block tile, and A-record chunks tid + i * NTHREADS.
    static_assert(NTHREADS % CH == 0 && (32 * KSUB * CH) % NTHREADS == 0, "x^T chunks must split evenly");
    const int ch = tid % CH, tok = t0 + ch * 8;
    const u32 xsize = tok < T ? 16u : 0u;  // zero-fill past the last token
    const u16* xcol = xt + (tok < T ? tok : 0);
    u32 xdst[XLOADS];
    int xrow[XLOADS];
#pragma unroll
    for (int i = 0; i < XLOADS; ++i) {
        xrow[i] = tid / CH + i * (NTHREADS / CH);
        xdst[i] = xrow[i] * (TN * 2) + ((ch ^ (xrow[i] & SWZ)) << 4);
    }
    constexpr int ACH = AB / 16, ALOADS = (ACH + NTHREADS - 1) / NTHREADS;
    const u32x4* arec[WR];
#pragma unroll
    for (int b = 0; b < WR; ++b) arec[b] = rec + (size_t)min(blk0 + b, nb - 1) * nkc * (REC / 16) + tid;

    auto load_stage = [&](int st, int ks) {
        const u32 s = sbase + st * STAGE_BYTES;
#pragma unroll
        for (int b = 0; b < WR; ++b) {
            const u16* it = itab + (b * nkc + ks * KSUB) * 32;
#pragma unroll
            for (int i = 0; i < XLOADS; ++i)
                cp_async16(s + b * XB + xdst[i], xcol + (size_t)it[xrow[i]] * ldx, xsize);
            const u32x4* src = arec[b] + (size_t)ks * (AB / 16);
            const u32 as = s + WR * XB + b * AB + tid * 16;
#pragma unroll
            for (int i = 0; i < ALOADS; ++i)
                if (ACH % NTHREADS == 0 || tid + i * NTHREADS < ACH) cp_async16(as + i * NTHREADS * 16, src + i * NTHREADS, 16);
        }
    };
    // ldmatrix: lane -> kept column k' = lane of the block's tile; this warp's token chunks, swizzled
    u32 bofs[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) bofs[nt] = wr * XB + lane * (TN * 2) + (((wn * NT + nt) ^ (lane & SWZ)) << 4);
    auto rows = [&](u32 (&baddr)[NT], u32 s, int sub, const Frags&) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) baddr[nt] = s + bofs[nt] + sub * (32 * TN * 2);
    };
    float acc[MT][NT][4];
    main_loop(acc, nsteps, sbase, smem, STAGE_BYTES, WR * XB + wr * AB, load_stage, rows);

    const int blk = blk0 + wr;
    if (blk >= nb) return;
    store_tile(acc, reinterpret_cast<u16*>(smem) + warp * (8 * NT) * 72, blk, t0 + wn * 8 * NT, T, y, ldy, R,
               bias, has_bias, row_index, has_rows);
}

// The dense kernel. xt: x^T in group-major order (nkc * KR rows): k-step ks reads rows ks * KR ..
// ks * KR + KR - 1 (8 groups of GM candidate columns; zero rows where a group has fewer), ldx as above.
// rec: [nb][nkc] records; their last 32 bytes hold, for kept column l of the k-step, its row among the KR.
// BULK (sm_90): the records of a stage arrive by one bulk copy per V block (cp.async.bulk, issued by thread
// 0, completing on the stage's mbarrier) instead of 16-byte cp.async by every thread; PF (with BULK): each
// k-step's fragments are read from shared memory one k-step ahead, during the previous k-step's mma.sp.
#ifndef GM
#define GM 8
#endif
#ifndef BULK
#define BULK 0
#endif
#ifndef PF
#define PF 1
#endif
#define KR (8 * GM)                       // x^T rows per k-step
#define DXB (KR * KSUB * TN * 2)          // bytes of the stage's x^T rows
#define DSTAGE_BYTES (DXB + WR * AB)
#define EPI_BYTES (NTHREADS / 32 * 8 * NT * 144)
#define BAR_OFFSET (STAGES * DSTAGE_BYTES > EPI_BYTES ? STAGES * DSTAGE_BYTES : EPI_BYTES)  // the mbarriers

extern "C" __global__ void __launch_bounds__(NTHREADS, MINB) vnm_mma_sp_dense(
    const u16* __restrict__ xt, int ldx, int T, const u32x4* __restrict__ rec, int nb, int nkc,
    u16* __restrict__ y, int ldy, int R, const u16* __restrict__ bias, int has_bias,
    const int* __restrict__ row_index, int has_rows) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int tid = threadIdx.x, warp = tid >> 5;
    const int wr = warp / WN, wn = warp % WN;
    const int blk0 = blockIdx.x * WR;
    const int t0 = blockIdx.y * TN;
    const u32 sbase = smem_addr(smem);
    const int nsteps = nkc / KSUB;

    // Producer constants. Thread tid copies x^T chunk ch = tid % CH of rows tid / CH + i * RSTEP.
    static_assert(NTHREADS % CH == 0, "x^T chunks must split evenly over the threads");
    constexpr int XROWS = KSUB * KR, RSTEP = NTHREADS / CH, XL = (XROWS + RSTEP - 1) / RSTEP;
    const int ch = tid % CH, tok = t0 + ch * 8, row0 = tid / CH;
    const u32 xsize = tok < T ? 16u : 0u;  // zero-fill past the last token
    const u16* xsrc = xt + (tok < T ? tok : 0) + (size_t)row0 * ldx;
    const size_t xstep = (size_t)XROWS * ldx;
    u32 xdst[XL];
#pragma unroll
    for (int i = 0; i < XL; ++i) {
        const int r = row0 + i * RSTEP;
        xdst[i] = r * (TN * 2) + ((ch ^ (r & SWZ)) << 4);
    }
    constexpr int ACH = AB / 16;  // 16-byte chunks of one block's records per stage (contiguous in rec)
#if BULK
    const u32 bars = sbase + BAR_OFFSET;
    if (tid == 0) {
        for (int st = 0; st < STAGES; ++st) mbar_init(bars + 8 * st, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const u32x4* rsrc = rec + (size_t)min(blk0 + (tid < WR ? tid : 0), nb - 1) * nkc * (REC / 16);
#else
    constexpr int ATOT = WR * ACH, AL = (ATOT + NTHREADS - 1) / NTHREADS;
    const u32x4* asrc[AL];
    u32 adst[AL];
#pragma unroll
    for (int i = 0; i < AL; ++i) {
        const int id = min(tid + i * NTHREADS, ATOT - 1), b = id / ACH, j = id % ACH;
        asrc[i] = rec + (size_t)min(blk0 + b, nb - 1) * nkc * (REC / 16) + j;
        adst[i] = DXB + b * AB + j * 16;
    }
#endif
    auto load_stage = [&](int st, int ks) {
        const u32 s = sbase + st * DSTAGE_BYTES;
        const u16* src = xsrc + ks * xstep;
#pragma unroll
        for (int i = 0; i < XL; ++i)
            if (XROWS % RSTEP == 0 || row0 + i * RSTEP < XROWS) cp_async16(s + xdst[i], src + (size_t)i * RSTEP * ldx, xsize);
#if BULK
        // threads 0 .. WR - 1 each copy one block's records; thread 0 first announces the stage's bytes
        if (tid == 0) mbar_expect(bars + 8 * st, WR * AB);
        __syncwarp();
        if (tid < WR) bulk_copy(s + DXB + tid * AB, rsrc + (size_t)ks * ACH, AB, bars + 8 * st);
#else
#pragma unroll
        for (int i = 0; i < AL; ++i)
            if (ATOT % NTHREADS == 0 || tid + i * NTHREADS < ATOT) cp_async16(s + adst[i], asrc[i] + (size_t)ks * ACH, 16);
#endif
    };
    // ldmatrix: lane -> kept column l, at row sub * KR + f.row of the stage's x^T rows
    auto rows = [&](u32 (&baddr)[NT], u32 s, int sub, const Frags& f) {
        const int r = sub * KR + f.row;
        const u32 rb = s + r * (TN * 2);
        const int sw = r & SWZ;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) baddr[nt] = rb + (((wn * NT + nt) ^ sw) << 4);
    };

    float acc[MT][NT][4];
    start_pipeline(acc, nsteps, load_stage);
    const u32 aofs = DXB + wr * AB;  // this warp's records in a stage
#if BULK
    MMA_SP_MAIN_LOOP(PF ? RECS_BULK_PF : RECS_BULK, true, acc, nsteps, sbase, smem, DSTAGE_BYTES, aofs, bars,
                     load_stage, rows)
#else
    MMA_SP_MAIN_LOOP(RECS_CP_ASYNC, true, acc, nsteps, sbase, smem, DSTAGE_BYTES, aofs, 0, load_stage, rows)
#endif

    const int blk = blk0 + wr;
    if (blk >= nb) return;
    store_tile(acc, reinterpret_cast<u16*>(smem) + warp * (8 * NT) * 72, blk, t0 + wn * 8 * NT, T, y, ldy, R,
               bias, has_bias, row_index, has_rows);
}

#endif  // !DECODE && !WGMMA

// The decode kernel (few tokens, T <= 8 NT): memory-bound, so no shared-memory pipeline. grid (nb, S):
// CTA (blk, s) takes k-steps s * per .. s * per + per - 1 of V block blk, its DW warps every DW-th of them, DU
// at a time: each lane loads its A fragments and metadata straight from the records into registers (16-byte,
// lane-contiguous), the kept columns' indices, and its B fragments (lane (g, q): token nt * 8 + g, kept
// columns 2q + 8j, 2q + 8j + 1) from token-major x: XS=0 gathered from global memory (any input
// permutation), XS=1 from the k-step's kcols-wide slice of x that the warp stages in shared memory first
// (16-byte copies, no dependence on the indices; for weights whose groups keep columns of their own span), or
// XS=2 through shared memory the other way round: lane l gathers kept column l for all the tile's tokens (each
// load one token row, so the warp's 32 lanes hit one or two cache lines where XS=0's hit eight token rows),
// stores them as a 16-byte x^T row, and ldmatrix.trans hands every lane its B fragment (any input permutation).
// The warps' accumulators are summed in shared memory in warp order (deterministic). With S > 1 the S
// partials of a block are summed in CTA order, either (CL=0) through global memory: each CTA writes its fp32
// partial to `work` and the last CTA of the block to arrive (counters[blk], reset by it) sums them, or (CL=1,
// sm_90, S = DS <= 8) inside a thread-block cluster of the block's S CTAs: each CTA reads its share of the
// elements from every CTA's shared memory (no global round trips, fence or atomics; the same bits as CL=0).
// Then the bias, and y is stored (through row_index).
#ifndef DW
#define DW 4
#endif
#ifndef DU
#define DU 2
#endif
#ifndef XS
#define XS 0
#endif
#ifndef CL
#define CL 0  // 1: the S CTAs of a V block are one cluster (DS = S) and sum their partials in shared memory
#endif
#ifndef DS
#define DS 1
#endif
#ifndef DP
#define DP 0  // 1: each warp loads its next batch of k-steps while it computes the current one (XS=0 or 2)
#endif
#if DP && XS == 1
#error "DP=1 (prefetching the next batch) needs XS=0 or 2"
#endif
#define DTP (8 * NT)  // tokens of the tile
#define DPITCH 68     // floats per staged token row (64 + 4 pad)

__device__ __forceinline__ u32x4 ldg_stream(const u32x4* p) {
    u32x4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ u32 ldg_stream(const u32* p) {
    u32 r;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

// The CTA's sum at element i (token i / 64, row i % 64) of the warps' staged sums, in warp order: the same
// bits every launch.
__device__ __forceinline__ float warp_sum(const float* red, int i) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < DW; ++w) v += red[(w * DTP + (i >> 6)) * DPITCH + (i & 63)];
    return v;
}

// y[t, output row o] = v + bias (through row_index; a row mapped to -1 is not stored)
__device__ __forceinline__ void store_out(float v, int t, int o, u16* __restrict__ y, int ldy,
                                          const u16* __restrict__ bias, int has_bias,
                                          const int* __restrict__ row_index, int has_rows) {
    const int orow = has_rows ? row_index[o] : o;
    if (orow < 0) return;
    if (has_bias) v += from_half(bias[orow]);
    y[(size_t)t * ldy + orow] = (u16)(pack2(v, 0.f) & 0xFFFF);
}

#if CL
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The float at this CTA's shared address `local` in the shared memory of cluster CTA `rank`.
__device__ __forceinline__ float ld_cluster(u32 local, u32 rank) {
    u32 remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}
#define CLUSTER_DIMS __cluster_dims__(1, DS, 1)
#else
#define CLUSTER_DIMS
#endif

// shared memory: the last-CTA flag (16 bytes), then the warps' sums (DW x DTP x DPITCH floats; CL=1: then the CTA's
// sums, DTP x 64 floats) or, before them, per warp (XS=1) DU slices of DTP rows x (kcols + 8) halfs or (XS=2)
// DU x NT tiles of 32 x^T rows of 8 tokens
extern "C" __global__ void __launch_bounds__(DW * 32) CLUSTER_DIMS vnm_mma_sp_decode(
    const u16* __restrict__ x, int ldx, int T, int K, int kcols, const u32x4* __restrict__ rec,
    const u16* __restrict__ cols, int nb, int nkc, int per, float* __restrict__ work, int* __restrict__ counters,
    u16* __restrict__ y, int ldy, int R, const u16* __restrict__ bias, int has_bias,
    const int* __restrict__ row_index, int has_rows) {
    extern __shared__ __align__(16) unsigned char dsm[];
    float* red = reinterpret_cast<float*>(dsm + 16);  // per warp its sums, [warp][token][row]
    int& last = *reinterpret_cast<int*>(dsm);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
    const int blk = blockIdx.x, S = gridDim.y, s = blockIdx.y;
    const int beg = s * per, end = min(nkc, beg + per);
#if XS == 1
    const int xpitch = kcols + 8;  // halfs per staged token row
    u16* xs = reinterpret_cast<u16*>(dsm + 16) + warp * DU * DTP * xpitch;  // (the sums reuse it after the loop)
    const u32 xs_addr = smem_addr(xs);
    const int xchunks = DTP * (kcols >> 3);  // 16-byte chunks of one k-step's slice
#elif XS == 2
    const u32 xt_addr = smem_addr(dsm + 16) + warp * (DU * NT * 512) + lane * 16;  // this lane's x^T row, tile 0
#endif
    float acc[MT][NT][4];
    zero_acc(acc);
    const u32x4* brec = rec + (size_t)blk * nkc * (REC / 16);
#if XS != 2
    const u32* bcol = reinterpret_cast<const u32*>(cols + (size_t)blk * nkc * 32);  // the kept columns, in pairs
#endif
    // one batch: DU k-steps (ks0, ks0 + DW, ..) of this warp, zero operands past `end` (nothing loaded)
    struct Batch {
#if XS == 2
        u32 cp[DU][1];  // kept column `lane`
#else
        u32 cp[DU][4];  // kept columns 2q + 8j (low half), 2q + 8j + 1 (high half)
#endif
        u32x4 a[DU][MT];
        u32 e[DU][MT / 2];
    };
    auto load = [&](Batch& bt, int ks0) {
#pragma unroll
        for (int u = 0; u < DU; ++u) {
            const int ks = ks0 + u * DW;
            if (ks < end) {
#if XS == 2
                bt.cp[u][0] = __ldg(cols + ((size_t)blk * nkc + ks) * 32 + lane);
#else
#pragma unroll
                for (int j = 0; j < 4; ++j) bt.cp[u][j] = bcol[ks * 16 + q + 4 * j];
#endif
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) bt.a[u][mt] = ldg_stream(brec + (size_t)ks * (REC / 16) + mt * 32 + lane);
#pragma unroll
                for (int p = 0; p < MT / 2; ++p)
                    bt.e[u][p] = ldg_stream(reinterpret_cast<const u32*>(brec + (size_t)ks * (REC / 16) + EOFS / 16) + p * 32 + lane);
            } else {
#pragma unroll
                for (int j = 0; j < (XS == 2 ? 1 : 4); ++j) bt.cp[u][j] = 0;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) bt.a[u][mt] = {0u, 0u, 0u, 0u};
#pragma unroll
                for (int p = 0; p < MT / 2; ++p) bt.e[u][p] = 0x44444444u;
            }
        }
    };
    // the batch's B fragments (XS=0: gathered; XS=1: read from the staged slices; XS=2: transposed through
    // shared memory) and its mma.sp
    auto compute = [&](const Batch& bt, int ks0) {
#if XS == 2
        u32 v[DU][NT][4];  // this lane's x^T rows: tokens 2p, 2p + 1 of n-tile nt in v[u][nt][p]
#pragma unroll
        for (int u = 0; u < DU; ++u) {
            const bool ok = ks0 + u * DW < end;
            const u16* xc = x + bt.cp[u][0];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int p = 0; p < 4; ++p) {
                    const int t = nt * 8 + 2 * p;
                    const u32 lo = ok && t < T ? (u32)__ldg(xc + (size_t)t * ldx) : 0u;
                    const u32 hi = ok && t + 1 < T ? (u32)__ldg(xc + (size_t)(t + 1) * ldx) : 0u;
                    v[u][nt][p] = lo | (hi << 16);
                }
        }
        __syncwarp();  // every lane's ldmatrix of the previous batch is done
#pragma unroll
        for (int u = 0; u < DU; ++u)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(xt_addr + (u * NT + nt) * 512),
                             "r"(v[u][nt][0]), "r"(v[u][nt][1]), "r"(v[u][nt][2]), "r"(v[u][nt][3]) : "memory");
        __syncwarp();
#endif
#pragma unroll
        for (int u = 0; u < DU; ++u) {
            u32 b[NT][4];
#if XS == 2
            // matrix j: kept columns 8j .. 8j + 7 -> lane (g, q) gets columns 8j + 2q, + 1 of token g
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                             : "=r"(b[nt][0]), "=r"(b[nt][1]), "=r"(b[nt][2]), "=r"(b[nt][3])
                             : "r"(xt_addr + (u * NT + nt) * 512) : "memory");
#else
            const bool ok = ks0 + u * DW < end;  // else zero operands (the slice was not staged)
#if XS
            const int base = (ks0 + u * DW) * kcols;
#endif
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int t = nt * 8 + g;
#if XS
                const u16* xr = xs + (u * DTP + t) * xpitch;
#pragma unroll
                for (int j = 0; j < 4; ++j) {  // a padding group's column 0 lies outside: any slice entry
                    const u32 l0 = (bt.cp[u][j] & 0xFFFF) - base, l1 = (bt.cp[u][j] >> 16) - base;
                    const u32 lo = xr[l0 < (u32)kcols ? l0 : 0], hi = xr[l1 < (u32)kcols ? l1 : 0];
                    b[nt][j] = ok ? lo | (hi << 16) : 0u;
                }
#else
                const u16* xr = x + (size_t)(t < T ? t : 0) * ldx;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const u32 lo = t < T ? (u32)__ldg(xr + (bt.cp[u][j] & 0xFFFF)) : 0u;
                    const u32 hi = t < T ? (u32)__ldg(xr + (bt.cp[u][j] >> 16)) : 0u;
                    b[nt][j] = ok ? lo | (hi << 16) : 0u;
                }
#endif
            }
#endif
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) mma_sp_tile(mt, acc[mt][nt], bt.a[u][mt], b[nt], bt.e[u][mt >> 1]);
        }
    };
#if DP
    // the next batch's operands are loaded while this one's x is gathered and its mma.sp run
    Batch cur;
    load(cur, beg + warp);
    for (int ks0 = beg + warp; ks0 < end; ks0 += DW * DU) {
        Batch nxt;
        load(nxt, ks0 + DW * DU);
        compute(cur, ks0);
        cur = nxt;
    }
#else
    for (int ks0 = beg + warp; ks0 < end; ks0 += DW * DU) {
#if XS == 1
#pragma unroll
        for (int u = 0; u < DU; ++u) {
            const int ks = ks0 + u * DW;
            if (ks < end)
                for (int c = lane; c < xchunks; c += 32) {
                    const int t = c / (kcols >> 3), col = ks * kcols + (c - t * (kcols >> 3)) * 8;
                    const int bytes = t < T ? max(0, min(16, (K - col) * 2)) : 0;
                    cp_async16(xs_addr + ((u * DTP + t) * xpitch + col - ks * kcols) * 2,
                               bytes ? x + (size_t)t * ldx + col : x, bytes);
                }
        }
        asm volatile("cp.async.commit_group;\n");
#endif
        Batch bt;
        load(bt, ks0);
#if XS == 1
        asm volatile("cp.async.wait_group 0;\n");
        __syncwarp();
#endif
        compute(bt, ks0);
#if XS == 1
        __syncwarp();  // the slices are read before the next iteration refills them
#endif
    }
#endif
    __syncthreads();  // (XS) every warp is done with its slices or tiles
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r)
                red[(warp * DTP + nt * 8 + 2 * q + (r & 1)) * DPITCH + mt * 16 + g + 8 * (r >> 1)] = acc[mt][nt][r];
    __syncthreads();
    constexpr int EL = DTP * 64;
#if CL
    if (DS > 1) {
        // every CTA's warp sums at csum (after the warps' sums); after the cluster barrier CTA `s` (its rank in
        // the cluster) sums its share of the elements over the DS CTAs in rank order, reading their shared
        // memory; the second barrier keeps each CTA's shared memory until those reads are done
        float* csum = red + DW * DTP * DPITCH;
        for (int i = tid; i < EL; i += DW * 32) csum[i] = warp_sum(red, i);
        cluster_sync();
        const u32 caddr = smem_addr(csum);
        constexpr int SHARE = (EL + DS - 1) / DS;
        for (int i = s * SHARE + tid; i < min(EL, s * SHARE + SHARE); i += DW * 32) {
            const int t = i >> 6, r = i & 63, o = blk * 64 + r;
            float v = 0.f;
#pragma unroll
            for (int p = 0; p < DS; ++p) v += ld_cluster(caddr + 4 * i, p);
            if (t < T && o < R) store_out(v, t, o, y, ldy, bias, has_bias, row_index, has_rows);
        }
        cluster_sync();
        return;
    }
#endif
    if (S > 1) {
        float* part = work + ((size_t)blk * S + s) * EL;
        for (int i = tid; i < EL; i += DW * 32) part[i] = warp_sum(red, i);
        __threadfence();
        __syncthreads();
        if (tid == 0) {
            const int prev = atomicAdd(counters + blk, 1);
            last = prev == S - 1;
            if (last) counters[blk] = 0;  // ready for the next launch
        }
        __syncthreads();
        if (!last) return;
        __threadfence();
    }
    const float* parts = work + (size_t)blk * S * EL;
    for (int i = tid; i < EL; i += DW * 32) {
        const int t = i >> 6, r = i & 63, o = blk * 64 + r;
        if (t >= T || o >= R) continue;
        float v = 0.f;
        if (S > 1) {
            for (int p = 0; p < S; ++p) v += __ldcg(parts + (size_t)p * EL + i);
        } else {
            v = warp_sum(red, i);
        }
        store_out(v, t, o, y, ldy, bias, has_bias, row_index, has_rows);
    }
}

// One probe mma.sp with per-lane operands and sparsity selector `sel`, to pin the fragment and metadata layouts.
extern "C" __global__ void probe_mma_sp(const u32* a, const u32* b, const u32* e, float* d, int sel) {
    int l = threadIdx.x;
    u32x4 av = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
    u32 bv[4] = {b[4 * l], b[4 * l + 1], b[4 * l + 2], b[4 * l + 3]};
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    mma_sp_tile(sel, c, av, bv, e[l]);
    for (int i = 0; i < 4; ++i) d[4 * l + i] = c[i];
}

#ifdef WGMMA
// The Hopper GEMM (WGMMA=1, sm_90a): wgmma.mma_async.sp, one warpgroup per 64-row V block (m64), WG blocks and
// TNW tokens per CTA, the same records and gather indices as vnm_mma_sp_gemm. Per k-step (32 kept columns)
// and block: A from registers (each warp's m16 tile, the record's mma.sp fragment), its metadata word (the
// warp's tile under sparsity selector 0: odd tiles' words from the lanes two further), and B, the block's 32
// gathered x^T rows in shared memory in wgmma's canonical MN-major layout with the 128-byte swizzle (per 64
// tokens a 32 x 128-byte region: row k at k * 128, 16-byte chunk c at (c ^ (k % 8)) * 16; the descriptor's
// stride between 8-row groups 1024). All threads gather with cp.async (WST stages, WST - 2 k-steps ahead; each
// thread's WXL row indices in one shared-memory load), then each warpgroup issues TNW / 64 wgmma m64n64k32
// per k-step, asynchronous: retired before the next k-step's operands are read into the registers they read.
// Where the time goes (docs/kernels.md): the gathers alone take 77-96 % of the kernel's time.
// SHARE=1 lets warpgroups 2i and 2i + 1 (the two halves of a 128-row V block, same kept columns) read one B
// tile. (Gathering through L1, cp.async.ca, so that a CTA's blocks share the rows they all keep, was slower.)
#ifndef WG
#define WG 2
#endif
#ifndef TNW
#define TNW 128
#endif
#ifndef WST
#define WST 4
#endif
#ifndef SHARE
#define SHARE 0  // 1: warpgroups 2i and 2i + 1 take the halves of one 128-row V block and share its B tiles
#endif
#define WREC REC  // the mma.sp records: A fragments 2048, metadata 256, local rows 32
#define WXB (32 * TNW * 2)
#define WTHREADS (WG * 128)
#define WCH (TNW / 8)
#define WXL (32 * WCH / WTHREADS)
#define WRCH (WREC / 16)
#define WRL ((WG * WRCH + WTHREADS - 1) / WTHREADS)
#if BF16
#define WTYPE "bf16"
#else
#define WTYPE "f16"
#endif
typedef unsigned long long u64;

__device__ __forceinline__ u64 wdesc(u32 addr, u32 lbo, u32 sbo, u32 swizzle) {
    return (u64)((addr >> 4) & 0x3FFF) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32) |
           ((u64)swizzle << 62);
}
#define WDEC(t) "%" #t "0, %" #t "1, %" #t "2, %" #t "3, %" #t "4, %" #t "5, %" #t "6, %" #t "7, %" #t "8, %" #t "9"
#define WF4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define WF16(i) WF4(i), WF4(i + 4), WF4(i + 8), WF4(i + 12)
// d (m64 x n64, 32 fp32 per thread) += A (64 x 32, 2:4: this warp's m16 tile as the mma.sp.m16n8k32
// fragment a + metadata e) B (32 x 64, tokens contiguous: bdesc; a 64-token swizzle atom)
__device__ __forceinline__ void wgmma_sp(float* d, const u32x4& a, u64 bdesc, u32 e) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %38, 0;\n"
                 "wgmma.mma_async.sp.sync.aligned.m64n64k32.f32." WTYPE "." WTYPE " {" WDEC() ", " WDEC(1) ", "
                 WDEC(2) ", %30, %31}, {%32, %33, %34, %35}, %36, %37, 0, p, 1, 1, 1;\n}\n"
                 : WF16(0), WF16(16)
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(bdesc), "r"(e), "r"(1));
}

// A thread's WXL consecutive gather indices, read from shared memory as one vector
template <int L> struct WIdx;
template <> struct WIdx<1> { typedef u16 V; union { V v; u16 h[1]; }; };
template <> struct WIdx<2> { typedef u32 V; union { V v; u16 h[2]; }; };
template <> struct WIdx<4> { typedef uint2 V; union { V v; u16 h[4]; }; };
template <> struct WIdx<8> { typedef uint4 V; union { V v; u16 h[8]; }; };

extern "C" __global__ void __launch_bounds__(WTHREADS, MINB) vnm_wgmma_sp_gemm(
    const u16* __restrict__ xt, int ldx, int T, const u32x4* __restrict__ rec, const u16* __restrict__ gidx,
    int nb, int nkc, u16* __restrict__ y, int ldy, int R, const u16* __restrict__ bias, int has_bias,
    const int* __restrict__ row_index, int has_rows) {
    extern __shared__ __align__(1024) unsigned char wsm[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2, wi = warp & 3;
    const int blk0 = blockIdx.x * WG, t0 = blockIdx.y * TNW;
    const u32 raw = smem_addr(wsm), pad = (1024u - (raw & 1023u)) & 1023u;  // swizzle atoms: 1024-aligned
    unsigned char* smem = wsm + pad;
    const u32 sbase = raw + pad;
    // B tiles [WST][WG] (WXB bytes each), records [WST][WG] (WREC), the blocks' gather indices [WG][nkc][32]
    constexpr u32 RBASE = WST * WG * WXB, IBASE = RBASE + WST * WG * WREC;
    const u16* itab = reinterpret_cast<const u16*>(smem + IBASE);
    {
        const int chunks = nkc * 4;  // 16-byte chunks of one block's indices
        for (int b = 0; b < WG; ++b) {
            const char* src = reinterpret_cast<const char*>(gidx + (size_t)min(blk0 + b, nb - 1) * nkc * 32);
            for (int j = tid; j < chunks; j += WTHREADS) cp_async16(sbase + IBASE + (b * chunks + j) * 16, src + j * 16, 16);
        }
        asm volatile("cp.async.commit_group;\n");
        asm volatile("cp.async.wait_group 0;\n");
        __syncthreads();
    }
    // Producer constants: thread tid copies token chunk ch = tid % WCH of rows (tid / WCH) * WXL + i of every
    // block's B tile (their WXL gather indices: one shared-memory load), and record chunks tid + i * WTHREADS.
    static_assert(WTHREADS % WCH == 0 && (32 * WCH) % WTHREADS == 0, "x^T chunks must split evenly");
    const int ch = tid % WCH, tok = t0 + ch * 8;
    const u32 xsize = tok < T ? 16u : 0u;  // zero-fill past the last token
    const u16* xcol = xt + (tok < T ? tok : 0);
    u32 xdst[WXL];
#pragma unroll
    for (int i = 0; i < WXL; ++i) {
        const int r = (tid / WCH) * WXL + i;
        xdst[i] = (ch >> 3) * (32 * 128) + r * 128 + (((ch & 7) ^ (r & 7)) << 4);
    }
    const int irow = (tid / WCH) * WXL;
    const u32x4* rsrc[WRL];
    u32 rdst[WRL];
#pragma unroll
    for (int i = 0; i < WRL; ++i) {
        const int id = min(tid + i * WTHREADS, WG * WRCH - 1), b = id / WRCH, j = id % WRCH;
        rsrc[i] = rec + (size_t)min(blk0 + b, nb - 1) * nkc * WRCH + j;
        rdst[i] = sbase + RBASE + b * WREC + j * 16;
    }
    auto load_stage = [&](int st, int ks) {
#pragma unroll
        for (int b = 0; b < WG; ++b) {
            if (SHARE && (b & 1)) continue;
            WIdx<WXL> idx;
            idx.v = *reinterpret_cast<const typename WIdx<WXL>::V*>(itab + (b * nkc + ks) * 32 + irow);
            const u32 s = sbase + (st * WG + b) * WXB;
#pragma unroll
            for (int i = 0; i < WXL; ++i)
                cp_async16(s + xdst[i], xcol + (size_t)idx.h[i] * ldx, xsize);
        }
#pragma unroll
        for (int i = 0; i < WRL; ++i)
            if ((WG * WRCH) % WTHREADS == 0 || tid + i * WTHREADS < WG * WRCH)
                cp_async16(rdst[i] + st * WG * WREC, rsrc[i] + (size_t)ks * WRCH, 16);
    };

    float acc[TNW / 2];
#pragma unroll
    for (int i = 0; i < TNW / 2; ++i) {
        acc[i] = 0.f;
        asm volatile("" : "+f"(acc[i])::"memory");  // zeroed here, not inside the first k-step's wgmma stage
    }
#pragma unroll
    for (int st = 0; st < WST - 2; ++st) {
        if (st < nkc) load_stage(st, st);
        asm volatile("cp.async.commit_group;\n");
    }
    // this warp's metadata word: its m16 tile's, from the lanes mma.sp's selector would read (odd tiles: 2 further)
    const u32 eofs = EOFS + ((wi >> 1) * 32 + (lane ^ ((wi & 1) << 1))) * 4;
    // One k-step into the operand registers (a, e). The wgmma read those registers until they retire, and
    // ptxas does not keep them from being reused (measured: the last wgmma of a group went wrong), so they are
    // tied to the wait that retires their last reader: every wgmma retires before the k-step's operands are
    // read (the previous k-step's run during the __syncthreads and the next loads' issue), so at that barrier
    // every warpgroup has retired the wgmma of k-step ks - 2, whose stage the loads (WST - 2 k-steps ahead)
    // refill.
    auto wait = [&](u32x4& a, u32& e) {
        asm volatile("wgmma.wait_group.sync.aligned %5;\n"
                     : "+r"(a.x), "+r"(a.y), "+r"(a.z), "+r"(a.w), "+r"(e) : "n"(0) : "memory");
    };
    auto step = [&](int ks, u32x4& a, u32& e) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(WST - 3));
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the copies, visible to the tensor cores
        __syncthreads();  // every thread's copies of k-step ks landed; every warpgroup's k-step ks - 2 retired
        {
            const int nx = ks + WST - 2;
            if (nx < nkc) load_stage(nx % WST, nx);
            asm volatile("cp.async.commit_group;\n");
        }
        wait(a, e);
        const int st = ks % WST;
        const u32 ra = sbase + RBASE + (st * WG + wg) * WREC, rb = sbase + (st * WG + (SHARE ? wg & ~1 : wg)) * WXB;
        asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(e) : "r"(ra + eofs) : "memory");
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(a.x), "=r"(a.y), "=r"(a.z), "=r"(a.w) : "r"(ra + (wi * 32 + lane) * 16) : "memory");
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int n = 0; n < TNW / 64; ++n) wgmma_sp(acc + 32 * n, a, wdesc(rb + n * (32 * 128), 4096, 1024, 1), e);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    };
    static_assert(TNW % 64 == 0, "TNW must be a multiple of 64 (tokens per wgmma)");
    u32x4 a0 = {0, 0, 0, 0};
    u32 e0 = 0;
    for (int ks = 0; ks < nkc; ++ks) step(ks, a0, e0);
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    asm volatile("cp.async.wait_group 0;\n");
    __syncthreads();

    // Epilogue: bias, the warpgroup's tile staged in shared memory as [token][64 rows] (72-half pitch), then
    // 16-byte token-major stores (without an output permutation), else one element at a time via row_index.
    const int blk = blk0 + wg, g = lane >> 2, q = lane & 3, wt = tid & 127;
    u16* tile = reinterpret_cast<u16*>(smem) + wg * TNW * 72;
    float bv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int o = blk * 64 + wi * 16 + g + 8 * h;
        const int orow = (blk < nb && o < R) ? (has_rows ? row_index[o] : o) : -1;
        bv[h] = (has_bias && orow >= 0) ? from_half(bias[orow]) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < TNW / 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 pr = pack2(acc[4 * j + 2 * h] + bv[h], acc[4 * j + 2 * h + 1] + bv[h]);
            const int col = wi * 16 + g + 8 * h, tk = 8 * j + 2 * q;
            tile[tk * 72 + col] = (u16)(pr & 0xFFFF);
            tile[(tk + 1) * 72 + col] = (u16)(pr >> 16);
        }
    asm volatile("bar.sync %0, 128;\n" ::"r"(wg + 1));
    if (blk >= nb) return;
    if (!has_rows && blk * 64 + 64 <= R && (ldy & 7) == 0) {
#pragma unroll 4
        for (int p = 0; p < TNW / 16; ++p) {  // 8 threads per token row (8 x 16 bytes), 16 rows per pass
            const int tk = p * 16 + (wt >> 3), c8 = (wt & 7) * 8, t = t0 + tk;
            if (t < T)
                *reinterpret_cast<u32x4*>(y + (size_t)t * ldy + blk * 64 + c8) =
                    *reinterpret_cast<const u32x4*>(tile + tk * 72 + c8);
        }
    } else {
        for (int p = wt; p < TNW * 64; p += 128) {
            const int tk = p >> 6, col = p & 63, t = t0 + tk, o = blk * 64 + col;
            if (t < T && o < R) {
                const int orow = has_rows ? row_index[o] : o;
                if (orow >= 0) y[(size_t)t * ldy + orow] = tile[tk * 72 + col];
            }
        }
    }
}
#endif  // WGMMA
