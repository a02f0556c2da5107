/*
 * llmopt's stand-in for TVM's <tvm/support/io.h>, which the apache-tvm wheel does not ship but
 * its web runtime sources include. It declares what those sources use: a byte Stream whose
 * templated Read/Write go through Serializer<T>, and serializers whose byte layout is the one
 * the TVM compiler writes (little-endian; u64 counts before strings, vectors, arrays and maps;
 * DLDataType as code:u8 bits:u8 lanes:u16; DLDevice as two i32). Written for llmopt.
 */
#ifndef LLMOPT_SHIM_TVM_SUPPORT_IO_H_
#define LLMOPT_SHIM_TVM_SUPPORT_IO_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

class Stream;

/*! \brief How a T is written to and read from a Stream (specialized below and by TVM's headers). */
template <typename T, typename Enable = void>
struct Serializer {
  static constexpr bool enabled = false;
};

/*! \brief A byte stream with typed, serializer-based reads and writes. */
class Stream {
 public:
  virtual ~Stream() = default;
  /*! \brief Read up to size bytes into ptr; returns the number read. */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \brief Write size bytes from ptr; returns the number written. */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& data) {
    Serializer<T>::Write(this, data);
  }
  template <typename T>
  bool Read(T* out) {
    return Serializer<T>::Read(this, out);
  }
  template <typename T>
  void WriteArray(const T* data, size_t count) {
    for (size_t i = 0; i < count; ++i) Write(data[i]);
  }
  template <typename T>
  bool ReadArray(T* data, size_t count) {
    for (size_t i = 0; i < count; ++i) {
      if (!Read(data + i)) return false;
    }
    return true;
  }
};

// numbers and enums: their bytes (wasm32 and x86-64 are both little-endian)
template <typename T>
struct Serializer<T, std::enable_if_t<std::is_arithmetic_v<T> || std::is_enum_v<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const T& value) { strm->Write(static_cast<const void*>(&value), sizeof(T)); }
  static bool Read(Stream* strm, T* value) {
    return strm->Read(static_cast<void*>(value), sizeof(T)) == sizeof(T);
  }
};

template <>
struct Serializer<DLDataType> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const DLDataType& t) {
    strm->Write(t.code);
    strm->Write(t.bits);
    strm->Write(t.lanes);
  }
  static bool Read(Stream* strm, DLDataType* t) {
    return strm->Read(&t->code) && strm->Read(&t->bits) && strm->Read(&t->lanes);
  }
};

template <>
struct Serializer<DLDevice> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const DLDevice& d) {
    int32_t type = static_cast<int32_t>(d.device_type), id = d.device_id;
    strm->Write(type);
    strm->Write(id);
  }
  static bool Read(Stream* strm, DLDevice* d) {
    int32_t type = 0, id = 0;
    if (!strm->Read(&type) || !strm->Read(&id)) return false;
    d->device_type = static_cast<DLDeviceType>(type);
    d->device_id = id;
    return true;
  }
};

namespace detail {
inline bool ReadCount(Stream* strm, uint64_t* count) { return strm->Read(count); }
inline bool ReadBytes(Stream* strm, std::string* out) {
  uint64_t size = 0;
  if (!ReadCount(strm, &size)) return false;
  out->resize(static_cast<size_t>(size));
  return size == 0 || strm->Read(&(*out)[0], static_cast<size_t>(size)) == size;
}
inline void WriteBytes(Stream* strm, const char* data, size_t size) {
  strm->Write(static_cast<uint64_t>(size));
  if (size != 0) strm->Write(static_cast<const void*>(data), size);
}
}  // namespace detail

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::string& s) { detail::WriteBytes(strm, s.data(), s.size()); }
  static bool Read(Stream* strm, std::string* s) { return detail::ReadBytes(strm, s); }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::String& s) { detail::WriteBytes(strm, s.data(), s.size()); }
  static bool Read(Stream* strm, ffi::String* s) {
    std::string bytes;
    if (!detail::ReadBytes(strm, &bytes)) return false;
    *s = ffi::String(bytes);
    return true;
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::pair<A, B>& p) {
    strm->Write(p.first);
    strm->Write(p.second);
  }
  static bool Read(Stream* strm, std::pair<A, B>* p) { return strm->Read(&p->first) && strm->Read(&p->second); }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::vector<T>& v) {
    strm->Write(static_cast<uint64_t>(v.size()));
    for (const T& item : v) strm->Write(item);
  }
  static bool Read(Stream* strm, std::vector<T>* v) {
    uint64_t size = 0;
    if (!detail::ReadCount(strm, &size)) return false;
    v->resize(static_cast<size_t>(size));
    for (auto& item : *v) {
      if (!strm->Read(&item)) return false;
    }
    return true;
  }
};

template <typename Container, typename K, typename V>
struct MapSerializer {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const Container& m) {
    strm->Write(static_cast<uint64_t>(m.size()));
    for (const auto& kv : m) {
      strm->Write(kv.first);
      strm->Write(kv.second);
    }
  }
  static bool Read(Stream* strm, Container* m) {
    uint64_t size = 0;
    if (!detail::ReadCount(strm, &size)) return false;
    m->clear();
    for (uint64_t i = 0; i < size; ++i) {
      K key;
      V value;
      if (!strm->Read(&key) || !strm->Read(&value)) return false;
      (*m)[key] = value;
    }
    return true;
  }
};

template <typename K, typename V>
struct Serializer<std::map<K, V>> : MapSerializer<std::map<K, V>, K, V> {};
template <typename K, typename V>
struct Serializer<std::unordered_map<K, V>> : MapSerializer<std::unordered_map<K, V>, K, V> {};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::Array<T>& a) {
    strm->Write(static_cast<uint64_t>(a.size()));
    for (size_t i = 0; i < a.size(); ++i) {
      T item = a[i];
      strm->Write(item);
    }
  }
  static bool Read(Stream* strm, ffi::Array<T>* a) {
    uint64_t size = 0;
    if (!detail::ReadCount(strm, &size)) return false;
    ffi::Array<T> result;
    for (uint64_t i = 0; i < size; ++i) {
      T item;
      if (!strm->Read(&item)) return false;
      result.push_back(item);
    }
    *a = std::move(result);
    return true;
  }
};

template <typename K, typename V>
struct Serializer<ffi::Map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::Map<K, V>& m) {
    strm->Write(static_cast<uint64_t>(m.size()));
    for (const auto& kv : m) {
      K key = kv.first;
      V value = kv.second;
      strm->Write(key);
      strm->Write(value);
    }
  }
  static bool Read(Stream* strm, ffi::Map<K, V>* m) {
    uint64_t size = 0;
    if (!detail::ReadCount(strm, &size)) return false;
    ffi::Map<K, V> result;
    for (uint64_t i = 0; i < size; ++i) {
      K key;
      V value;
      if (!strm->Read(&key) || !strm->Read(&value)) return false;
      result.Set(key, value);
    }
    *m = std::move(result);
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // LLMOPT_SHIM_TVM_SUPPORT_IO_H_
