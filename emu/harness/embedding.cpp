// src/ops/embedding/{mod,cuda}.rs on the emulator: forward (copy-unit choice,
// tiled launch, status -> IndexOutOfRange), backward (keys -> grouping ->
// status and group count -> values) and the sparse updates (row check, then
// densify / SGD / Adagrad reading the status).
#include <optional>

#include "bundle.h"
#include "device.h"
#include "grouping.h"
#include "kernels.h"
#include "ops.h"

namespace harness {
namespace {

constexpr uint64_t kForwardUnitsPerBlock = 2048;  // FORWARD_UNITS_PER_BLOCK

struct TableShape {
  uint64_t heads, num_rows, width;
  uint64_t table_len() const { return heads * num_rows * width; }
};

TableShape table_shape(const Bundle& in) {
  TableShape s{in.scalar<uint64_t>("heads"), in.scalar<uint64_t>("num_rows"), in.scalar<uint64_t>("width")};
  if (s.heads == 0 || s.num_rows == 0 || s.width == 0) {
    throw OpError{"ShapeMismatch", "table: [H, V, D] with every size >= 1"};
  }
  if (s.num_rows > 0xffffffffull) throw invalid("table", "ids are u32, V must be < 2^32");
  return s;
}

std::optional<uint32_t> padding_of(const Bundle& in) {
  if (!in.has("padding")) return std::nullopt;
  return in.scalar<uint32_t>("padding");
}

// padding_arg: a u64 that no u32 id equals when there is no padding. It is
// pushed as a u64 whatever the kernel's parameter type.
uint64_t padding_arg(std::optional<uint32_t> padding) { return padding ? uint64_t{*padding} : ~0ull; }

// copy_unit: the widest unit (bytes) dividing the row and both base pointers.
size_t copy_unit(size_t row_bytes, const void* table, const void* out, size_t element_bytes) {
  for (size_t unit : {16, 8, 4, 2}) {
    if (unit < element_bytes) continue;
    if (row_bytes % unit == 0 && reinterpret_cast<uintptr_t>(table) % unit == 0 &&
        reinterpret_cast<uintptr_t>(out) % unit == 0) {
      return unit;
    }
  }
  return element_bytes;
}

OpError id_error(const std::vector<uint32_t>& ids, uint64_t position, uint64_t num_rows) {
  OpError e{"IndexOutOfRange", "ids: position " + std::to_string(position) + " is out of range for " +
                                   std::to_string(num_rows) + " rows"};
  e.position = position;
  e.index = ids[position];
  return e;
}

// embedding::forward with a CUDA table. `table_offset` / `out_offset` view the
// buffers at an element offset (a sub-view), which can lower the copy unit.
template <class T>
void forward(const Bundle& in, Bundle& out) {
  const TableShape shape = table_shape(in);
  const std::vector<uint32_t> ids_host = in.get<uint32_t>("ids");
  const std::optional<uint32_t> padding = padding_of(in);
  const size_t table_offset = in.scalar<uint64_t>("table_offset", 0);
  const size_t out_offset = in.scalar<uint64_t>("out_offset", 0);
  if (ids_host.size() >= 0xffffffffull) throw invalid("ids", "T must be < 2^32 - 1");  // check_token_count

  std::vector<T> table_host(table_offset, poison_value<T>());
  for (T v : bits_vector<T>(in, "table")) table_host.push_back(v);
  DeviceBuffer<T> table_buffer = clone_htod(table_host);
  DeviceBuffer<uint32_t> ids = clone_htod(ids_host);
  const size_t out_len = ids_host.size() * shape.heads * shape.width;
  DeviceBuffer<T> out_buffer = alloc_uninit<T>(out_len + out_offset);
  DeviceBuffer<unsigned long long> status = new_status();
  const T* table = table_buffer.ptr() + table_offset;
  T* y = out_buffer.ptr() + out_offset;

  // cuda::forward
  check_len("table", table_buffer.len() - table_offset, shape.table_len());
  uint64_t unit = 0;
  if (!ids_host.empty()) {
    const size_t element_bytes = sizeof(T);
    const size_t row_bytes = shape.width * element_bytes;
    unit = copy_unit(row_bytes, table, y, element_bytes);
    const uint32_t units_per_row = u32_arg("width", row_bytes / unit);
    u32_arg("heads * width", shape.heads * shape.width);
    const uint64_t num_tokens = ids_host.size();
    const uint32_t heads_arg = u32_arg("heads", shape.heads);
    const uint32_t rows_arg = u32_arg("num_rows", shape.num_rows);
    const uint64_t padding_pushed = padding_arg(padding);
    const emu::LaunchConfig config = tiled_config(num_tokens * shape.heads * units_per_row, kForwardUnitsPerBlock);
    const uint32_t* id_ptr = ids.ptr();
    switch (unit) {
      case 16:
        EMU_LAUNCH(embedding_forward_u128, config, table, id_ptr, padding_pushed, num_tokens, heads_arg, rows_arg,
                   units_per_row, y, status.ptr());
        break;
      case 8:
        EMU_LAUNCH(embedding_forward_u64, config, table, id_ptr, padding_pushed, num_tokens, heads_arg, rows_arg,
                   units_per_row, y, status.ptr());
        break;
      case 4:
        EMU_LAUNCH(embedding_forward_u32, config, table, id_ptr, padding_pushed, num_tokens, heads_arg, rows_arg,
                   units_per_row, y, status.ptr());
        break;
      default:
        EMU_LAUNCH(embedding_forward_u16, config, table, id_ptr, padding_pushed, num_tokens, heads_arg, rows_arg,
                   units_per_row, y, status.ptr());
        break;
    }
  }
  out.put_scalar<uint64_t>("unit", unit);
  out.put("status", status.to_host());
  // The whole output buffer, so the test sees writes outside the view too.
  out.put("out_buffer", bits_of<uint16_or_32<T>>(out_buffer));
  out.put_scalar<uint64_t>("out_offset", out_offset);
  // embedding::forward: the one synchronisation.
  if (status[0] != kStatusClean) throw id_error(ids_host, status[0], shape.num_rows);
}

// embedding::backward with CUDA ids.
void backward(const Bundle& in, Bundle& out) {
  const TableShape shape = table_shape(in);
  const std::vector<uint32_t> ids_host = in.get<uint32_t>("ids");
  const std::optional<uint32_t> padding = padding_of(in);
  const std::vector<float> dy_host = in.get<float>("dy");
  check_len("dy", dy_host.size(), ids_host.size() * shape.heads * shape.width);
  DeviceBuffer<uint32_t> ids = clone_htod(ids_host);
  DeviceBuffer<float> dy = clone_htod(dy_host);
  DeviceBuffer<unsigned long long> status = new_status();

  // cuda::backward_group
  const uint32_t num_tokens = u32_arg("ids length", ids_host.size());
  const uint32_t num_rows = u32_arg("num_rows", shape.num_rows);
  DeviceBuffer<uint32_t> keys = alloc_uninit<uint32_t>(ids_host.size());
  const uint64_t padding_pushed = padding_arg(padding);
  EMU_LAUNCH(embedding_backward_keys, grid_stride_config(num_tokens), static_cast<const uint32_t*>(ids.ptr()),
             num_tokens, padding_pushed, num_rows, keys.ptr(), status.ptr());
  DeviceGroups groups = group_by_key(keys.ptr(), keys.len(), uint64_t{num_rows} + 1, num_rows);

  // embedding::backward: the one synchronisation (id check, group count).
  out.put("status", status.to_host());
  out.put("keys", keys.to_host());
  if (status[0] != kStatusClean) throw id_error(ids_host, status[0], shape.num_rows);
  const size_t unique = groups.count[0];
  DeviceBuffer<uint32_t> rows = alloc_uninit<uint32_t>(unique);
  if (unique > 0) std::memcpy(rows.ptr(), groups.keys.ptr(), unique * sizeof(uint32_t));
  DeviceBuffer<float> values = alloc_uninit<float>(shape.heads * unique * shape.width);

  // cuda::backward_values
  check_len("values", values.len(), shape.heads * unique * shape.width);
  if (unique > groups.order.len()) throw invalid("unique_rows", "more groups than tokens");
  if (values.len() > 0) {
    const uint32_t heads_arg = u32_arg("heads", shape.heads);
    const uint32_t width_arg = u32_arg("width", shape.width);
    const uint32_t unique_arg = u32_arg("unique_rows", unique);
    EMU_LAUNCH(embedding_backward_values, grid_stride_config(values.len()), static_cast<const float*>(dy.ptr()),
               static_cast<const uint32_t*>(groups.order.ptr()), static_cast<const uint32_t*>(groups.starts.ptr()),
               heads_arg, width_arg, unique_arg, values.ptr());
  }
  out.put("rows", rows.to_host());
  out.put("values", values.to_host());
  out.put("order", groups.order.to_host());
}

OpError row_error(uint64_t position, uint32_t row, uint64_t num_rows) {
  OpError e{row >= num_rows ? "IndexOutOfRange" : "InvalidArgument",
            "grad.rows: row " + std::to_string(row) + " at position " + std::to_string(position)};
  e.position = position;
  e.index = row;
  return e;
}

// SparseGrad::densify / embedding::sgd / embedding::adagrad with CUDA tensors
// (apply_on_cuda -> cuda::apply_sparse). The table, the state and the dense
// gradient are returned even on Err: an Err must leave them untouched.
template <class T>
void update(const Bundle& in, Bundle& out) {
  const TableShape shape = table_shape(in);
  const std::string kind = in.text("kind");
  const std::vector<uint32_t> rows_host = in.get<uint32_t>("rows");
  DeviceBuffer<uint32_t> rows = clone_htod(rows_host);
  DeviceBuffer<float> values = clone_htod(in.get<float>("values"));
  const float lr = in.scalar<float>("lr", 0.0f);
  const float eps = in.scalar<float>("eps", 0.0f);
  DeviceBuffer<T> table;
  DeviceBuffer<float> state;
  DeviceBuffer<float> dense;
  if (kind == "densify") {
    dense = alloc_zeros<float>(shape.table_len());
  } else {
    table = clone_htod(bits_vector<T>(in, "table"));
    check_len("table", table.len(), shape.table_len());
  }
  if (kind == "adagrad") {
    state = clone_htod(in.get<float>("state"));
    check_len("state", state.len(), shape.heads * shape.num_rows);
  }
  DeviceBuffer<unsigned long long> status = new_status();

  // cuda::apply_sparse
  check_len("values", values.len(), shape.heads * rows.len() * shape.width);
  const uint32_t unique = u32_arg("rows length", rows.len());
  const uint32_t num_rows_arg = u32_arg("num_rows", shape.num_rows);
  const uint32_t heads_arg = u32_arg("heads", shape.heads);
  const uint32_t width_arg = u32_arg("width", shape.width);
  if (unique > 0) {
    EMU_LAUNCH(embedding_check_rows, grid_stride_config(unique), static_cast<const uint32_t*>(rows.ptr()), unique,
               num_rows_arg, status.ptr());
    const unsigned long long* status_view = status.ptr();
    const uint64_t elements = values.len();
    const uint32_t* r = rows.ptr();
    const float* v = values.ptr();
    if (kind == "densify") {
      EMU_LAUNCH(embedding_densify, grid_stride_config(elements), r, v, heads_arg, unique, num_rows_arg, width_arg,
                 dense.ptr(), status_view);
    } else if (kind == "sgd") {
      if constexpr (std::is_same<T, float>::value) {
        EMU_LAUNCH(embedding_sgd_f32, grid_stride_config(elements), table.ptr(), r, v, heads_arg, unique, num_rows_arg,
                   width_arg, lr, status_view);
      } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        EMU_LAUNCH(embedding_sgd_bf16, grid_stride_config(elements), table.ptr(), r, v, heads_arg, unique,
                   num_rows_arg, width_arg, lr, status_view);
      } else {
        EMU_LAUNCH(embedding_sgd_f16, grid_stride_config(elements), table.ptr(), r, v, heads_arg, unique, num_rows_arg,
                   width_arg, lr, status_view);
      }
    } else if (kind == "adagrad") {
      const emu::LaunchConfig config = grid_stride_config(uint64_t{heads_arg} * unique * 32);
      if constexpr (std::is_same<T, float>::value) {
        EMU_LAUNCH(embedding_adagrad_f32, config, table.ptr(), state.ptr(), r, v, heads_arg, unique, num_rows_arg,
                   width_arg, lr, eps, status_view);
      } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        EMU_LAUNCH(embedding_adagrad_bf16, config, table.ptr(), state.ptr(), r, v, heads_arg, unique, num_rows_arg,
                   width_arg, lr, eps, status_view);
      } else {
        EMU_LAUNCH(embedding_adagrad_f16, config, table.ptr(), state.ptr(), r, v, heads_arg, unique, num_rows_arg,
                   width_arg, lr, eps, status_view);
      }
    } else {
      throw std::runtime_error("kind: expected densify, sgd or adagrad, got " + kind);
    }
  }
  out.put("status", status.to_host());
  if (kind == "densify") out.put("dense", dense.to_host());
  if (kind != "densify") out.put("table", bits_of<uint16_or_32<T>>(table));
  if (kind == "adagrad") out.put("state", state.to_host());
  // apply_on_cuda: the one synchronisation.
  if (status[0] != kStatusClean) throw row_error(status[0], rows_host[status[0]], shape.num_rows);
}

}  // namespace

void embedding_op(const std::string& op, const Bundle& in, Bundle& out) {
  const std::string dtype = in.text("dtype", "f32");
  if (op == "embedding_backward") return backward(in, out);
  if (op == "embedding_forward") return dispatch_float(dtype, [&](auto tag) { forward<decltype(tag)>(in, out); });
  if (op == "embedding_update") return dispatch_float(dtype, [&](auto tag) { update<decltype(tag)>(in, out); });
  throw std::runtime_error("unknown op " + op);
}

}  // namespace harness
