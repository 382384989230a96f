// The grouping primitive on its own (src/grouping/cuda.rs): group_by_key and
// scan_exclusive, as the lookup backward and the routing plan call them.
#include <optional>

#include "bundle.h"
#include "grouping.h"
#include "ops.h"

namespace harness {

void grouping_op(const std::string& op, const Bundle& in, Bundle& out) {
  if (op == "scan") {
    DeviceBuffer<uint32_t> data = clone_htod(in.get<uint32_t>("data"));
    scan_exclusive(data);
    out.put("data", data.to_host());
    return;
  }
  if (op != "grouping") throw std::runtime_error("unknown op " + op);
  const std::vector<uint32_t> keys_host = in.get<uint32_t>("keys");
  DeviceBuffer<uint32_t> keys = clone_htod(keys_host);
  std::optional<uint32_t> sentinel;
  if (in.has("sentinel")) sentinel = in.scalar<uint32_t>("sentinel");
  DeviceGroups groups = group_by_key(keys.ptr(), keys.len(), in.scalar<uint64_t>("key_bound"), sentinel);
  const uint32_t count = groups.count[0];
  out.put("order", groups.order.to_host());
  out.put("sorted", groups.sorted.to_host());
  out.put("count", groups.count.to_host());
  out.put("group_keys", groups.keys.to_host(count));
  out.put("starts", groups.starts.to_host(size_t{count} + 1));
}

}  // namespace harness
