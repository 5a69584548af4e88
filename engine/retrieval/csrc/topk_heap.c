/* Running exact top-k of many queries over image-major score tiles: the selection half of
 * engine/topk_cpu.py's CPU search, in C. Loaded by engine/topk_native.py through ctypes.
 *
 * Each query keeps a binary heap of its best k (score, row) entries whose root is the worst:
 * the lowest score, and among equal scores the highest row. thr[c] is the root's score once
 * the heap is full, -inf before. Tiles come in ascending rows, so an entry equal to thr[c] has
 * a higher row than every entry held and loses the tie: only entries strictly above thr[c]
 * can enter. The scan compares a whole vector of queries' scores with their thresholds at
 * once; after the first tiles almost nothing passes, so the pass costs one read of the tile.
 */
#include <stdint.h>

/* Is (va, ra) worse than (vb, rb): lower score, or equal score and higher row. */
static inline int worse(float va, int64_t ra, float vb, int64_t rb)
{
    return va < vb || (va == vb && ra > rb);
}

/* Heap slot i takes (v, r). */
static inline void put(float *hv, int64_t *hr, int64_t i, float v, int64_t r)
{
    hv[i] = v;
    hr[i] = r;
}

/* Offer (v, r), which is better than the root when the heap is full, to one query's heap. */
static void heap_offer(float *hv, int64_t *hr, int64_t k, int64_t *count, float *thr,
                       float v, int64_t r)
{
    int64_t i;
    if (*count < k) { /* not full: sift the new entry up from the end */
        for (i = (*count)++; i > 0 && worse(v, r, hv[(i - 1) / 2], hr[(i - 1) / 2]); i = (i - 1) / 2)
            put(hv, hr, i, hv[(i - 1) / 2], hr[(i - 1) / 2]);
        put(hv, hr, i, v, r);
        if (*count == k)
            *thr = hv[0];
        return;
    }
    for (i = 0;;) { /* full: replace the root and sift it down */
        int64_t child = 2 * i + 1;
        if (child >= k)
            break;
        if (child + 1 < k && worse(hv[child + 1], hr[child + 1], hv[child], hr[child]))
            child++;
        if (!worse(hv[child], hr[child], v, r))
            break;
        put(hv, hr, i, hv[child], hr[child]);
        i = child;
    }
    put(hv, hr, i, v, r);
    *thr = hv[0];
}

/* above(a, t): bit j set where a[j] > t[j], for W consecutive queries. TOPK_SCALAR (tests) takes
 * the plain C path whatever the CPU has. */
#if defined(__AVX512F__) && !defined(TOPK_SCALAR)
#include <immintrin.h>
#define W 16
static inline uint32_t above(const float *a, const float *t)
{
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(a), _mm512_loadu_ps(t), _CMP_GT_OQ);
}
#elif defined(__AVX__) && !defined(TOPK_SCALAR)
#include <immintrin.h>
#define W 8
static inline uint32_t above(const float *a, const float *t)
{
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(t), _CMP_GT_OQ));
}
#elif defined(__SSE2__) && !defined(TOPK_SCALAR)
#include <emmintrin.h>
#define W 4
static inline uint32_t above(const float *a, const float *t)
{
    return (uint32_t)_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(a), _mm_loadu_ps(t)));
}
#else
#define W 1
static inline uint32_t above(const float *a, const float *t)
{
    return *a > *t;
}
#endif

/* Scores s [n rows, m queries] (C order) of image rows r0.. against the m queries whose heaps
 * are heap_v / heap_r [m, k], sizes count [m] and thresholds thr [m]. Scores must be finite. */
void topk_heap_scan(const float *s, int64_t n, int64_t m, int64_t r0, int64_t k,
                    float *heap_v, int64_t *heap_r, int64_t *count, float *thr)
{
    for (int64_t i = 0; i < n; i++) {
        const float *row = s + i * m;
        int64_t c = 0;
        for (; c + W <= m; c += W) {
            uint32_t mask = above(row + c, thr + c);
            while (mask) { /* a query's entry changes only its own threshold */
                int64_t q = c + __builtin_ctz(mask);
                mask &= mask - 1;
                heap_offer(heap_v + q * k, heap_r + q * k, k, count + q, thr + q, row[q], r0 + i);
            }
        }
        for (; c < m; c++)
            if (row[c] > thr[c])
                heap_offer(heap_v + c * k, heap_r + c * k, k, count + c, thr + c, row[c], r0 + i);
    }
}

