// Prototypes of the kernels the harness launches, exactly as kernels/*.cu
// define them: each emu/tu/*.cpp includes this file after its kernel file,
// so a prototype that drifts from the definition is a compile error
// ("conflicting declaration of C function") rather than a silent ABI
// mismatch at link time.
#pragma once
#include "../cuda_emu.h"

extern "C" {

// kernels/grouping.cu
void grouping_iota(uint32_t* positions, uint32_t n);
void grouping_digit_histogram(const uint32_t* keys, uint32_t n, uint32_t shift, uint32_t* hist);
void grouping_digit_scatter(const uint32_t* keys_in, const uint32_t* positions_in, uint32_t n, uint32_t shift,
                            const uint32_t* tile_offsets, uint32_t* keys_out, uint32_t* positions_out);
void scan_exclusive_tiles(uint32_t* data, uint32_t n, uint32_t* tile_totals);
void scan_add_tile_offsets(uint32_t* data, uint32_t n, const uint32_t* tile_offsets);
void grouping_segment_heads(const uint32_t* sorted_keys, uint32_t n, uint32_t sentinel_key, uint32_t* heads,
                            uint32_t* segment_starts, uint32_t* segment_count);
void grouping_segment_write(const uint32_t* sorted_keys, const uint32_t* head_ranks, uint32_t n,
                            uint32_t sentinel_key, uint32_t* segment_keys, uint32_t* segment_starts,
                            uint32_t* segment_count);

// kernels/embedding.cu
#define EMU_EMBEDDING_FORWARD(name, Unit)                                                                  \
  void embedding_forward_##name(const Unit* table, const uint32_t* ids, unsigned long long padding,                \
                                unsigned long long num_tokens, uint32_t heads, uint32_t num_rows,          \
                                uint32_t units_per_row, Unit* out, unsigned long long* status);
EMU_EMBEDDING_FORWARD(u128, uint4)
EMU_EMBEDDING_FORWARD(u64, uint2)
EMU_EMBEDDING_FORWARD(u32, uint32_t)
EMU_EMBEDDING_FORWARD(u16, uint16_t)
#undef EMU_EMBEDDING_FORWARD
void embedding_backward_keys(const uint32_t* ids, uint32_t num_tokens, unsigned long long padding, uint32_t num_rows,
                             uint32_t* keys, unsigned long long* status);
void embedding_backward_values(const float* dy, const uint32_t* token_order, const uint32_t* group_starts,
                               uint32_t heads, uint32_t width, uint32_t unique_rows, float* values);
void embedding_check_rows(const uint32_t* rows, uint32_t unique_rows, uint32_t num_rows,
                          unsigned long long* status);
void embedding_densify(const uint32_t* rows, const float* values, uint32_t heads, uint32_t unique_rows,
                       uint32_t num_rows, uint32_t width, float* dense, const unsigned long long* status);
#define EMU_EMBEDDING_UPDATES(suffix, T)                                                                   \
  void embedding_sgd_##suffix(T* table, const uint32_t* rows, const float* values, uint32_t heads,         \
                              uint32_t unique_rows, uint32_t num_rows, uint32_t width, float lr,           \
                              const unsigned long long* status);                                          \
  void embedding_adagrad_##suffix(T* table, float* state, const uint32_t* rows, const float* values,       \
                                  uint32_t heads, uint32_t unique_rows, uint32_t num_rows, uint32_t width, \
                                  float lr, float eps, const unsigned long long* status);
EMU_EMBEDDING_UPDATES(f32, float)
EMU_EMBEDDING_UPDATES(bf16, __nv_bfloat16)
EMU_EMBEDDING_UPDATES(f16, __half)
#undef EMU_EMBEDDING_UPDATES

// kernels/routing.cu
#define EMU_ROUTING(suffix, T)                                                                              \
  void routing_forward_##suffix(const T* logits, const uint32_t* expert_mask, const uint32_t* token_mask,   \
                                const float* selection_bias, unsigned long long rows, uint32_t experts,     \
                                uint32_t groups, uint32_t group_experts, uint32_t k, uint32_t flags,        \
                                uint32_t group_size, uint32_t rows_per_group, uint32_t* indices,            \
                                float* weights, uint32_t* expert_keys, float* partials,                     \
                                unsigned long long* status);                                                \
  void routing_backward_##suffix(const T* logits, const uint32_t* expert_mask, const uint32_t* token_mask,  \
                                 const uint32_t* indices, const float* dweights, const float* grad_scales,  \
                                 float lb_coef, float z_coef, unsigned long long rows, uint32_t experts,    \
                                 uint32_t groups, uint32_t group_experts, uint32_t k, uint32_t flags,       \
                                 uint32_t group_size, float* dlogits, unsigned long long* status);
EMU_ROUTING(f32, float)
EMU_ROUTING(bf16, __nv_bfloat16)
EMU_ROUTING(f16, __half)
#undef EMU_ROUTING
void routing_reduce_partials(const float* partials, uint32_t blocks, uint32_t columns, float* totals);
void routing_finalize(const float* totals, const uint32_t* counts, const uint32_t* offsets,
                      const uint32_t* expert_mask, uint32_t experts, uint32_t groups, uint32_t group_experts,
                      uint32_t k, float* gate_mass, float* lb_loss, float* z_loss, float* grad_scales);
void routing_plan_counts(const uint32_t* group_keys, const uint32_t* group_starts, const uint32_t* group_count,
                         uint32_t experts, uint32_t* counts, uint32_t* offsets, unsigned long long* rows_out);
void routing_plan_rows(const uint32_t* order, uint32_t slots, uint32_t k, const uint32_t* offsets,
                       uint32_t experts, uint32_t* token_of_row, uint32_t* row_of_slot);

}  // extern "C"
