// Peak multiply-add throughput of one core, 12 independent accumulators held in registers:
// 512-bit float32 FMA vs AVX512-BF16 dot products (vdpbf16ps).
// Built and run by bench/cpu.py (gemm section) where a C compiler and these instructions exist:
// it shows what the hardware allows a bfloat16 matrix product at best, whatever the library.
// Output: one line per instruction, "name gflops_per_core instructions_per_second".
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#define N 50000000L
#define R12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
int main(void) {
    double t, fma, dp; float s = 0;
    {
#define D(i) __m512 a##i = _mm512_set1_ps(1e-9f * i);
        R12(D)
        __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(1e-7f);
        t = now();
        for (long n = 0; n < N; n++) {
#define F(i) a##i = _mm512_fmadd_ps(x, y, a##i);
            R12(F)
            __asm__ volatile("" : "+v"(x));
        }
        fma = now() - t;
#define S(i) s += _mm512_reduce_add_ps(a##i);
        R12(S)
    }
    {
        R12(D)
        __m512bh bx = (__m512bh)_mm512_set1_epi16(0x3f80), by = (__m512bh)_mm512_set1_epi16(0x3380);
        t = now();
        for (long n = 0; n < N; n++) {
#define B(i) a##i = _mm512_dpbf16_ps(a##i, bx, by);
            R12(B)
            __asm__ volatile("" : "+v"(bx));
        }
        dp = now() - t;
        R12(S)
    }
    double calls = (double)N * 12;
    // float32 FMA: 16 lanes x 2 flop; bf16 dot: 32 products summed into 16 lanes (64 flop)
    printf("fp32_fma %.1f %.3e\n", calls * 32 / fma / 1e9, calls / fma);
    printf("bf16_dot %.1f %.3e\n", calls * 64 / dp / 1e9, calls / dp);
    fprintf(stderr, "checksum %g\n", s);
    return 0;
}
