// Host interface of the KV4 attention kernels (csrc/attention/kv4_*.cu), shared with
// the torch bindings (csrc/attention/bindings.cpp).  Plain C++, no torch headers.
//
// The cache layout is the one of vllm_qoq/reference/kv4.py (the spec):
//   cache uint8 [num_blocks, 2 (K, V), num_kv_heads, block_size * (D/2 + 4)]
//   region of one (block, K|V, head): codes [block_size][D/2] (even dim in the low
//   nibble), then (scale, zero) fp16 pairs [block_size][2].
//
// No CUDA headers here: bindings.cpp is plain C++ (the CI build check compiles .cpp
// files with g++ only), so streams travel as void* (a cudaStream_t).
#pragma once

#include <cstdint>

namespace qoq {
namespace kv4 {

enum class DType : int { F16 = 0, BF16 = 1 };

struct CacheWriteArgs {
  const void* key;             // [T, Hkv, D], strides below
  const void* value;
  int64_t key_stride_t, key_stride_h;      // in elements; the last dim is contiguous
  int64_t value_stride_t, value_stride_h;
  uint8_t* cache;              // contiguous KV4 cache
  const int64_t* slot_mapping; // [T], -1 = padding (not written)
  int num_tokens, num_kv_heads, head_size, block_size;
};

struct AttnArgs {
  void* out;                   // [T, Hq, D]
  const void* q;               // [T, Hq, D]
  int64_t q_stride_t, q_stride_h, out_stride_t, out_stride_h;  // elements
  const uint8_t* cache;
  const int32_t* block_table;  // [B, bt_stride]
  int64_t bt_stride;
  const int32_t* seq_lens;     // [B]
  const int32_t* query_start_loc;  // [B + 1]
  int num_seqs, num_tokens, num_q_heads, num_kv_heads, head_size, block_size;
  int block_size_log2;         // log2(block_size), or -1 when it is not a power of two
  int max_query_len;           // host bound: launch shape (row tiles)
  float scale;                 // softmax scale
  int num_splits;              // split-KV factor (>= 1), see attention_num_splits
  float* ws_out;               // [num_splits, T, Hq, D] when num_splits > 1
  float* ws_lse;               // [num_splits, T, Hq]
};

// Gather + dequantize (csrc/attention/kv4_dequant.cu): tokens [0, len_b) of sequence b
// (len_b = cu_seqlens_k[b+1] - cu_seqlens_k[b]) -> rows cu_seqlens_k[b] + t of k_out/v_out.
struct GatherArgs {
  const uint8_t* cache;        // contiguous KV4 cache
  const int32_t* block_table;  // [B, bt_stride]
  int64_t bt_stride;
  const int32_t* cu_seqlens_k; // [B + 1]
  void* k_out;                 // [total, Hkv, D] contiguous, 16-byte aligned
  void* v_out;
  int num_seqs, num_kv_heads, head_size, block_size;
  int max_seqlen_k;            // host bound on len_b: launch shape
};

// Split-KV factor for a launch: enough CTAs to fill the GPU, at least 128 keys per
// split, and a bounded workspace.  Depends on host values only (CUDA-graph safe).
int attention_num_splits(int num_seqs, int num_kv_heads, int num_q_heads, int head_size,
                         int max_query_len, int max_seq_len, int num_tokens, int num_sms);

bool head_size_supported(int head_size);
int num_sms(int device);

// stream: the cudaStream_t to launch on.
void cache_write(const CacheWriteArgs& a, DType dt, void* stream);
void attention(const AttnArgs& a, DType dt, void* stream);
void gather_dequant(const GatherArgs& a, DType dt, void* stream);

}  // namespace kv4
}  // namespace qoq
