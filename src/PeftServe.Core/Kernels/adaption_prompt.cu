// LLaMA-Adapter's gated attention over each row's adaption prompt, at one layer, in one kernel (the tensor-op
// path gathers the slots' keys, values, mask and gate and runs about fifteen ops):
//   out[b][t][h * hd + i] = gate[s] * sum_l softmax_l(q[b][h][t] . K[s][l][kv] / sqrt(hd) + mask[s][l]) * V[s][l][kv][i]
// with s = index[b], kv = h / (nq / nkv), over l < lengths[s]. Scores and the softmax are float32 (the online form:
// one pass over the prompt); the result is rounded once to T. Rows without an adapter read the neutral slot (gate 0).
// The pool is as long as the longest prompt allowed (128 by default) while adapters are usually about 10 long; the
// positions past a slot's length are masked, so skipping them changes no value (each would multiply the running sums
// by exp(0) and add a weight of exactly 0). Reading all of them was 128/10 times the work: 3.2 ms a prefill launch in
// the H200 profile of the nine-kind mix (docs/gpu-runs/2026-12-03/decode-5/kernels-mix.txt).
// keys, values: [S, L, nkv, hd]; mask: [S, L]; gate: [S]; lengths: int [S]; q: [B, nq, Tq, hd] with strides (q_b, q_h, q_t) and
// unit stride over hd; out: [B, Tq, nq * hd] contiguous.
// One warp per (row, head), AP_WARPS heads per block: grid (B * Tq, ceil(nq / AP_WARPS)); hd <= 32 * AP_DIMS.
#include "common.cuh"

#define AP_WARPS 4
#define AP_DIMS 8
#define AP_UNROLL 4

extern "C" __global__ void __launch_bounds__(AP_WARPS * 32, 4) adaption_prompt_attention(
    const T* __restrict__ q, long long q_b, long long q_h, long long q_t,
    const T* __restrict__ keys, const T* __restrict__ values, const T* __restrict__ mask, const T* __restrict__ gate,
    const int* __restrict__ lengths, const long long* __restrict__ index, T* __restrict__ out, int Tq, int nq, int nkv, int hd, int L, float scale)
{
    wait_for_prior_kernels();
    const int row = blockIdx.x, b = row / Tq, t = row - b * Tq;
    const int h = blockIdx.y * AP_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (h >= nq) return;
    const long long s = index[b];
    const int kv = h / (nq / nkv);
    const T* qr = q + b * q_b + h * q_h + t * q_t;
    float qv[AP_DIMS], acc[AP_DIMS];
    #pragma unroll
    for (int j = 0; j < AP_DIMS; j++)
    {
        const int i = lane + 32 * j;
        qv[j] = i < hd ? to_f32(qr[i]) : 0.0f;
        acc[j] = 0.0f;
    }
    float best = NEG_INF, total = 0.0f;
    const int live = max(1, min(L, lengths[s]));
    // Positions in runs of AP_UNROLL: a run's keys, values and mask entries are all loaded (positions past the prompt
    // clamped to its last) before the first is used, then the positions are taken one by one as before, so the sums
    // are the same to the bit; one position at a time was a chain of load latencies as long as the prompt.
    for (int l0 = 0; l0 < live; l0 += AP_UNROLL)
    {
        float kx[AP_UNROLL][AP_DIMS], vx[AP_UNROLL][AP_DIMS], mk[AP_UNROLL];
        #pragma unroll
        for (int u = 0; u < AP_UNROLL; u++)
        {
            const int l = min(l0 + u, live - 1);
            const long long base = ((s * L + l) * nkv + kv) * (long long)hd;
            #pragma unroll
            for (int j = 0; j < AP_DIMS; j++)
            {
                const int i = lane + 32 * j;
                kx[u][j] = i < hd ? to_f32(keys[base + i]) : 0.0f;
                vx[u][j] = i < hd ? to_f32(values[base + i]) : 0.0f;
            }
            mk[u] = to_f32(mask[s * L + l]);
        }
        #pragma unroll
        for (int u = 0; u < AP_UNROLL; u++)
        {
            if (l0 + u >= live) break;
            float dot = 0.0f;
            #pragma unroll
            for (int j = 0; j < AP_DIMS; j++)
                if (lane + 32 * j < hd) dot = fmaf(qv[j], kx[u][j], dot);
            const float score = warp_sum(dot) * scale + mk[u];
            const float next = fmaxf(best, score);
            const float shrink = expf(best - next), weight = expf(score - next);
            total = total * shrink + weight;
            #pragma unroll
            for (int j = 0; j < AP_DIMS; j++)
                acc[j] = acc[j] * shrink + (lane + 32 * j < hd ? weight * vx[u][j] : 0.0f);
            best = next;
        }
    }
    const float g = to_f32(gate[s]) / total;
    T* o = out + (long long)row * nq * hd + (long long)h * hd;
    #pragma unroll
    for (int j = 0; j < AP_DIMS; j++)
    {
        const int i = lane + 32 * j;
        if (i < hd) o[i] = from_f32<T>(acc[j] * g);
    }
}
