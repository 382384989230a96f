// The harness's file format (emu/driver.py writes and reads it): named flat
// arrays. "EMU1", u32 count, then per array: u32 name length, name, u32 dtype
// length, dtype ("u8" "u16" "u32" "u64" "i32" "f32" "f64" "str"), u64 byte
// count, bytes (little-endian).
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda_emu.h"

namespace harness {

template <class T>
const char* dtype_of() {
  if constexpr (std::is_same<T, float>::value) return "f32";
  else if constexpr (std::is_same<T, double>::value) return "f64";
  else if constexpr (std::is_same<T, int32_t>::value) return "i32";
  else if constexpr (sizeof(T) == 1) return "u8";
  else if constexpr (sizeof(T) == 2) return "u16";  // also bf16 / f16 bits
  else if constexpr (sizeof(T) == 4) return "u32";
  else return "u64";
}

struct Array {
  std::string dtype;
  std::vector<char> bytes;
};

class Bundle {
 public:
  static Bundle read(const char* path) {
    Bundle b;
    FILE* f = std::fopen(path, "rb");
    if (f == nullptr) throw std::runtime_error(std::string("cannot open ") + path);
    char magic[4];
    uint32_t count = 0;
    take(f, magic, 4);
    if (std::memcmp(magic, "EMU1", 4) != 0) throw std::runtime_error("not an EMU1 bundle");
    take(f, &count, 4);
    for (uint32_t i = 0; i < count; ++i) {
      std::string name = take_string(f);
      Array a;
      a.dtype = take_string(f);
      uint64_t n = 0;
      take(f, &n, 8);
      a.bytes.resize(n);
      take(f, a.bytes.data(), n);
      b.arrays_[name] = std::move(a);
    }
    std::fclose(f);
    return b;
  }

  void write(const char* path) const {
    FILE* f = std::fopen(path, "wb");
    if (f == nullptr) throw std::runtime_error(std::string("cannot open ") + path);
    const uint32_t count = static_cast<uint32_t>(arrays_.size());
    std::fwrite("EMU1", 1, 4, f);
    std::fwrite(&count, 4, 1, f);
    for (const auto& [name, a] : arrays_) {
      put_string(f, name);
      put_string(f, a.dtype);
      const uint64_t n = a.bytes.size();
      std::fwrite(&n, 8, 1, f);
      if (n) std::fwrite(a.bytes.data(), 1, n, f);
    }
    std::fclose(f);
  }

  bool has(const std::string& name) const { return arrays_.count(name) != 0; }

  // The array as elements of T: T's size must match the stored dtype's.
  template <class T>
  std::vector<T> get(const std::string& name) const {
    const Array& a = at(name);
    if (a.dtype == "str" || element_bytes(a.dtype) != sizeof(T)) {
      throw std::runtime_error("input " + name + ": stored as " + a.dtype + ", read as " + dtype_of<T>());
    }
    std::vector<T> v(a.bytes.size() / sizeof(T));
    if (!v.empty()) std::memcpy(static_cast<void*>(v.data()), a.bytes.data(), a.bytes.size());
    return v;
  }
  template <class T>
  std::optional<std::vector<T>> get_optional(const std::string& name) const {
    if (!has(name)) return std::nullopt;
    return get<T>(name);
  }
  template <class T>
  T scalar(const std::string& name) const {
    auto v = get<T>(name);
    if (v.size() != 1) throw std::runtime_error("input " + name + ": expected one element");
    return v[0];
  }
  template <class T>
  T scalar(const std::string& name, T fallback) const {
    return has(name) ? scalar<T>(name) : fallback;
  }
  std::string text(const std::string& name, const std::string& fallback = "") const {
    if (!has(name)) return fallback;
    const Array& a = at(name);
    return std::string(a.bytes.begin(), a.bytes.end());
  }

  template <class T>
  void put(const std::string& name, const std::vector<T>& v) {
    Array a;
    a.dtype = dtype_of<T>();
    a.bytes.resize(v.size() * sizeof(T));
    if (!v.empty()) std::memcpy(a.bytes.data(), static_cast<const void*>(v.data()), a.bytes.size());
    arrays_[name] = std::move(a);
  }
  template <class T>
  void put_scalar(const std::string& name, T v) {
    put(name, std::vector<T>{v});
  }
  void put_text(const std::string& name, const std::string& s) {
    Array a;
    a.dtype = "str";
    a.bytes.assign(s.begin(), s.end());
    arrays_[name] = std::move(a);
  }

 private:
  static void take(FILE* f, void* p, size_t n) {
    if (n && std::fread(p, 1, n, f) != n) throw std::runtime_error("truncated bundle");
  }
  static std::string take_string(FILE* f) {
    uint32_t n = 0;
    take(f, &n, 4);
    std::string s(n, '\0');
    take(f, s.data(), n);
    return s;
  }
  static void put_string(FILE* f, const std::string& s) {
    const uint32_t n = static_cast<uint32_t>(s.size());
    std::fwrite(&n, 4, 1, f);
    std::fwrite(s.data(), 1, n, f);
  }
  static size_t element_bytes(const std::string& dtype) {
    if (dtype == "u8") return 1;
    if (dtype == "u16") return 2;
    if (dtype == "u32" || dtype == "i32" || dtype == "f32") return 4;
    return 8;
  }
  const Array& at(const std::string& name) const {
    auto it = arrays_.find(name);
    if (it == arrays_.end()) throw std::runtime_error("missing input " + name);
    return it->second;
  }

  std::map<std::string, Array> arrays_;
};

}  // namespace harness
