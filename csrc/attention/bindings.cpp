// CUDA implementations of qoq::kv4_cache_write, qoq::kv4_attention and
// qoq::kv4_gather_dequant (schemas and CPU
// reference: vllm_qoq/attention/ops.py, spec: vllm_qoq/reference/kv4.py).
// Plain C++ with device-generic c10 APIs (stream, device guard), no CUDA headers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "attention/kv4.h"

namespace qoq {
namespace kv4 {
namespace {

void* current_stream(const at::Device& dev) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(dev).native_handle();
}

DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "qoq KV4: ", what, " must be float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cache(const at::Tensor& cache, int64_t head_size) {
  TORCH_CHECK(cache.scalar_type() == at::kByte && cache.dim() == 4 && cache.size(1) == 2,
              "qoq KV4: kv_cache must be uint8 [num_blocks, 2, num_kv_heads, block_size*(D/2+4)]");
  TORCH_CHECK(cache.is_contiguous(), "qoq KV4: kv_cache must be contiguous");
  TORCH_CHECK(cache.size(3) % (head_size / 2 + 4) == 0, "qoq KV4: kv_cache last dim ", cache.size(3),
              " is not a multiple of D/2+4 = ", head_size / 2 + 4);
}

void kv4_cache_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                     const at::Tensor& slot_mapping) {
  const int64_t T = slot_mapping.size(0);
  if (T == 0) return;
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "qoq KV4: key/value must be [T, Hkv, D]");
  TORCH_CHECK(key.size(0) >= T && key.stride(2) == 1 && value.stride(2) == 1,
              "qoq KV4: key/value need a contiguous last dim and >= len(slot_mapping) rows");
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), "qoq KV4: key and value dtypes differ");
  const int64_t D = key.size(2);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "qoq KV4: head_size must be 64, 128 or 256, got ", D);
  check_cache(kv_cache, D);
  TORCH_CHECK(kv_cache.size(2) == key.size(1), "qoq KV4: kv_cache has ", kv_cache.size(2),
              " KV heads, key has ", key.size(1));
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "qoq KV4: slot_mapping must be int64");
  c10::DeviceGuard guard(kv_cache.device());
  CacheWriteArgs a{};
  a.key = key.data_ptr();
  a.value = value.data_ptr();
  a.key_stride_t = key.stride(0);
  a.key_stride_h = key.stride(1);
  a.value_stride_t = value.stride(0);
  a.value_stride_h = value.stride(1);
  a.cache = kv_cache.data_ptr<uint8_t>();
  a.slot_mapping = slot_mapping.data_ptr<int64_t>();
  a.num_tokens = static_cast<int>(T);
  a.num_kv_heads = static_cast<int>(key.size(1));
  a.head_size = static_cast<int>(D);
  a.block_size = static_cast<int>(kv_cache.size(3) / (D / 2 + 4));
  cache_write(a, dtype_of(key, "key"), current_stream(kv_cache.device()));
}

void kv4_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                   const at::Tensor& block_table, const at::Tensor& seq_lens,
                   const at::Tensor& query_start_loc, int64_t max_query_len, int64_t max_seq_len,
                   double scale, int64_t num_splits) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), "qoq KV4: query/out must be [T, Hq, D]");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "qoq KV4: query/out need a contiguous last dim");
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "qoq KV4: out and query dtypes differ");
  const int64_t D = query.size(2);
  TORCH_CHECK(head_size_supported(static_cast<int>(D)), "qoq KV4 attention: head_size must be 64 or 128, got ", D);
  check_cache(kv_cache, D);
  const int64_t hkv = kv_cache.size(2), hq = query.size(1);
  TORCH_CHECK(hq % hkv == 0, "qoq KV4: ", hq, " query heads are not a multiple of ", hkv, " KV heads");
  const int64_t bs = kv_cache.size(3) / (D / 2 + 4);
  TORCH_CHECK(bs % 16 == 0, "qoq KV4 attention: block_size must be a multiple of 16, got ", bs);
  TORCH_CHECK(2 * hkv * bs * (D / 2 + 4) <= INT32_MAX, "qoq KV4 attention: one cache block holds ",
              2 * hkv * bs * (D / 2 + 4), " bytes; the kernel addresses blocks with 32-bit offsets "
              "(at most 2^31 - 1 bytes): use a smaller block_size");
  for (const at::Tensor* t : {&block_table, &seq_lens, &query_start_loc}) {
    TORCH_CHECK(t->scalar_type() == at::kInt, "qoq KV4: block_table/seq_lens/query_start_loc must be int32");
  }
  TORCH_CHECK(block_table.stride(1) == 1 && seq_lens.is_contiguous() && query_start_loc.is_contiguous(),
              "qoq KV4: block_table rows, seq_lens and query_start_loc must be contiguous");
  const int64_t B = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) >= B + 1 && block_table.size(0) >= B,
              "qoq KV4: query_start_loc needs B+1 entries and block_table B rows");
  const int64_t T = query.size(0);
  if (B == 0 || T == 0 || max_query_len <= 0) return;
  c10::DeviceGuard guard(query.device());

  AttnArgs a{};
  a.out = out.data_ptr();
  a.q = query.data_ptr();
  a.q_stride_t = query.stride(0);
  a.q_stride_h = query.stride(1);
  a.out_stride_t = out.stride(0);
  a.out_stride_h = out.stride(1);
  a.cache = kv_cache.data_ptr<uint8_t>();
  a.block_table = block_table.data_ptr<int32_t>();
  a.bt_stride = block_table.stride(0);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.query_start_loc = query_start_loc.data_ptr<int32_t>();
  a.num_seqs = static_cast<int>(B);
  a.num_tokens = static_cast<int>(T);
  a.num_q_heads = static_cast<int>(hq);
  a.num_kv_heads = static_cast<int>(hkv);
  a.head_size = static_cast<int>(D);
  a.block_size = static_cast<int>(bs);
  a.block_size_log2 = (bs & (bs - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(bs)) : -1;
  a.max_query_len = static_cast<int>(max_query_len);
  a.scale = static_cast<float>(scale);
  a.num_splits = num_splits > 0
                     ? static_cast<int>(num_splits)
                     : attention_num_splits(a.num_seqs, a.num_kv_heads, a.num_q_heads, a.head_size,
                                            a.max_query_len, static_cast<int>(max_seq_len), a.num_tokens,
                                            num_sms(query.device().index()));
  at::Tensor ws_out, ws_lse;
  if (a.num_splits > 1) {
    auto opts = query.options().dtype(at::kFloat);
    ws_out = at::empty({a.num_splits, T, hq, D}, opts);
    ws_lse = at::empty({a.num_splits, T, hq}, opts);
    a.ws_out = ws_out.data_ptr<float>();
    a.ws_lse = ws_lse.data_ptr<float>();
  }
  attention(a, dtype_of(query, "query"), current_stream(query.device()));
}

void kv4_gather_dequant(const at::Tensor& kv_cache, const at::Tensor& block_table,
                        const at::Tensor& cu_seqlens_k, int64_t max_seqlen_k, at::Tensor& k_out,
                        at::Tensor& v_out) {
  TORCH_CHECK(k_out.dim() == 3 && v_out.sizes() == k_out.sizes(), "qoq KV4 gather: k_out/v_out must be [N, Hkv, D]");
  TORCH_CHECK(k_out.is_contiguous() && v_out.is_contiguous(), "qoq KV4 gather: k_out/v_out must be contiguous");
  TORCH_CHECK(v_out.scalar_type() == k_out.scalar_type(), "qoq KV4 gather: k_out and v_out dtypes differ");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(k_out.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v_out.data_ptr()) % 16 == 0,
              "qoq KV4 gather: k_out/v_out must be 16-byte aligned");
  const int64_t D = k_out.size(2);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "qoq KV4 gather: head_size must be 64, 128 or 256, got ", D);
  check_cache(kv_cache, D);
  TORCH_CHECK(kv_cache.size(2) == k_out.size(1), "qoq KV4 gather: kv_cache has ", kv_cache.size(2),
              " KV heads, k_out has ", k_out.size(1));
  const int64_t bs = kv_cache.size(3) / (D / 2 + 4);
  TORCH_CHECK(bs % 16 == 0, "qoq KV4 gather: block_size must be a multiple of 16, got ", bs);
  TORCH_CHECK(block_table.scalar_type() == at::kInt && cu_seqlens_k.scalar_type() == at::kInt,
              "qoq KV4 gather: block_table/cu_seqlens_k must be int32");
  TORCH_CHECK(block_table.dim() == 2 && block_table.stride(1) == 1 && cu_seqlens_k.is_contiguous(),
              "qoq KV4 gather: block_table rows and cu_seqlens_k must be contiguous");
  const int64_t B = cu_seqlens_k.size(0) - 1;
  TORCH_CHECK(B >= 0 && block_table.size(0) >= B, "qoq KV4 gather: block_table needs a row per sequence");
  TORCH_CHECK(B <= 65535, "qoq KV4 gather: at most 65535 sequences per call, got ", B);
  TORCH_CHECK(max_seqlen_k <= block_table.size(1) * bs, "qoq KV4 gather: max_seqlen_k ", max_seqlen_k,
              " exceeds the block table (", block_table.size(1), " pages of ", bs, ")");
  if (B == 0 || max_seqlen_k <= 0) return;
  c10::DeviceGuard guard(kv_cache.device());
  GatherArgs a{};
  a.cache = kv_cache.data_ptr<uint8_t>();
  a.block_table = block_table.data_ptr<int32_t>();
  a.bt_stride = block_table.stride(0);
  a.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  a.k_out = k_out.data_ptr();
  a.v_out = v_out.data_ptr();
  a.num_seqs = static_cast<int>(B);
  a.num_kv_heads = static_cast<int>(kv_cache.size(2));
  a.head_size = static_cast<int>(D);
  a.block_size = static_cast<int>(bs);
  a.max_seqlen_k = static_cast<int>(max_seqlen_k);
  gather_dequant(a, dtype_of(k_out, "k_out"), current_stream(kv_cache.device()));
}

}  // namespace
}  // namespace kv4
}  // namespace qoq

TORCH_LIBRARY_IMPL(qoq, CUDA, m) {
  m.impl("kv4_cache_write", &qoq::kv4::kv4_cache_write);
  m.impl("kv4_attention", &qoq::kv4::kv4_attention);
  m.impl("kv4_gather_dequant", &qoq::kv4::kv4_gather_dequant);
}
