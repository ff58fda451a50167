import triton, triton.language as tl
from dashq_vllm.kernels.triton_kernels import _tile_ids, _plane_words, _group_row, _store_out

@triton.jit
def paired_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KX, stride_xm, stride_ym, SPLIT_K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, 1)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    kk = tl.arange(0, 32)
    xoff = (kk % 2) * 64 + kk // 2  # logical k' = 2r + t  <->  chunk c + 4t, row r
    k_tiles = K // 128
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum(per_split * (pid_k + 1), k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ones = tl.full((32, BLOCK_N), 1.0, tl.float16)
    for t in range(per_split * pid_k, t_end):
        k0 = t * 128
        w = _plane_words(qw_ptr, t, 0, 4, offs_n, mask_n, N)
        s = _group_row(s_ptr, k0, 128, offs_n, mask_n, N)
        z = _group_row(z_ptr, k0, 128, offs_n, mask_n, N)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sxz = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(4):
            v = ((w >> (4 * c)) & 0x000F000F) | 0x64006400
            lo = v.to(tl.int16).to(tl.float16, bitcast=True)
            hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True)
            q = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (32, BLOCK_N))
            offs_k = k0 + c * 16 + xoff
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < KX), other=0.0)
            part = tl.dot(x, q, part)
            sxz = tl.dot(x, ones, sxz)
        acc += part * s + sxz * (z - 1024.0 * s)
    _store_out(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, pid_k, False, ATOMIC)
